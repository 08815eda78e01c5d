//! Target strings: every form `--filename` takes (paths, `pcie://ADDR[/ns=N]`, SPDK's
//! `trtype:PCIe traddr:...`, `sim://key=value,...`), and the small parsers beside them.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rio::config::{BackendChoice, OtelProtocol, parse_size};
use rio::nvme::sim::SimConfig;
use rio::target::TargetSpec;

fuzz_target!(|s: &str| {
    let _ = format!("{:?}", TargetSpec::parse(s));
    if let Ok(c) = SimConfig::parse(s) {
        // What parsed is a configuration `SimController::start` accepts or refuses in words.
        let _ = format!("{c:?}");
    }
    let _ = BackendChoice::parse(s);
    let _ = OtelProtocol::parse(s);
    let _ = parse_size(s);
    let _ = rio_cli::bench::spec::parse_duration(s);
    let _ = rio_cli::bench::RwMode::parse(s);
});
