//! The CLI on the userspace NVMe driver's targets, through the real binary: `sim://` runs the
//! driver against the software model; `pcie://` and `rio setup` are only called here with
//! inputs they refuse before touching anything (binding happens in the VM, scripts/vm-test).

#[path = "../../core/tests/common/mod.rs"]
mod common;

use std::process::{Command, Output};

fn rio(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rio"))
        .args(args)
        .env_remove("RIO_BACKEND")
        .output()
        .expect("run rio")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit status 2 and exactly one line on stderr that contains every needle.
fn usage_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    for n in needles {
        assert!(err.contains(n), "'{err}' should mention '{n}'");
    }
}

#[test]
fn info_describes_the_model_controller() {
    let o = rio(&["info", "sim://ns=2,ns2bs=4096,size=64m"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    for want in [
        "rio software NVMe controller",
        "ns 1:",
        "ns 2:",
        "4096 B",
        "health:",
    ] {
        assert!(out.contains(want), "missing '{want}' in:\n{out}");
    }
    let o = rio(&["info", "--json", "sim://size=64m"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["namespaces"][0]["block_size"], 512);
    assert_eq!(v["namespaces"][0]["size_bytes"], 64u64 << 20);
    assert!(v["smart"]["temperature_celsius"].as_i64().is_some());
}

#[test]
fn bench_on_the_model_verifies_through_the_driver() {
    let o = rio(&[
        "bench",
        "--filename",
        "sim://size=64m,mdts=1",
        "--rw",
        "randrw",
        "--bs",
        "16k",
        "--iodepth",
        "16",
        "--runtime",
        "1",
        "--time_based",
        "--size",
        "8m",
        "--verify",
        "--output-format",
        "json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["backend"]["backend"], "sim");
    assert!(v["verified_blocks"].as_u64().unwrap() > 0, "{v}");
    assert_eq!(v["target"]["kind"]["type"], "nvme");
    assert!(v["jobs"][0]["write"]["iops"].as_f64().unwrap() > 0.0);
}

#[test]
fn bad_nvme_targets_are_one_line_errors() {
    usage_error(
        &rio(&["bench", "--filename", "sim://size=lots", "--runtime", "1"]),
        &["size"],
    );
    usage_error(
        &rio(&[
            "bench",
            "--filename",
            "sim://",
            "--backend",
            "uring",
            "--runtime",
            "1",
        ]),
        &["userspace NVMe driver"],
    );
    usage_error(
        &rio(&[
            "bench",
            "--filename",
            "pcie://0000:ff:1f.7",
            "--runtime",
            "1",
        ]),
        &["0000:ff:1f.7"],
    );
    // The spdk backend: SPDK transport IDs are its alone; the model is rio's driver's alone;
    // without the feature `spdk` it names the feature.
    usage_error(
        &rio(&[
            "bench",
            "--filename",
            "trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:4420 subnqn:nqn.x",
            "--backend",
            "uring",
            "--runtime",
            "1",
        ]),
        &["only the spdk backend serves it"],
    );
    usage_error(
        &rio(&[
            "bench",
            "--filename",
            "sim://",
            "--backend",
            "spdk",
            "--runtime",
            "1",
        ]),
        &["software controller model", "--backend vfio"],
    );
    if !cfg!(feature = "spdk") {
        usage_error(
            &rio(&[
                "bench",
                "--filename",
                "pcie://0000:ff:1f.7",
                "--backend",
                "spdk",
                "--runtime",
                "1",
            ]),
            &["built without SPDK support", "--features spdk", "SPDK_DIR"],
        );
    }
    usage_error(
        &rio(&[
            "bench",
            "--filename",
            "pcie://not-an-address",
            "--runtime",
            "1",
        ]),
        &["not-an-address"],
    );
    // Writing a PCIe namespace destroys its contents: --force first, checked before opening.
    usage_error(
        &rio(&[
            "bench",
            "--filename",
            "trtype:PCIe traddr:0000:ff:1f.7",
            "--rw",
            "randwrite",
        ]),
        &["--force"],
    );
    usage_error(
        &rio(&["bench", "--filename", "sim://", "--create", "--size", "1m"]),
        &["--create"],
    );
    usage_error(&rio(&["info", "pcie://0000:ff:1f.7"]), &["0000:ff:1f.7"]);
}

#[test]
fn setup_status_reads_only_and_bind_refuses_before_touching_anything() {
    let o = rio(&["setup", "status"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("NVMe controllers") && out.contains("Hugepages"),
        "{out}"
    );

    usage_error(&rio(&["setup", "bind", "0000:ff:1f.7"]), &["0000:ff:1f.7"]);
    usage_error(&rio(&["setup", "bind", "/dev/nvme99"]), &["nvme99"]);
    usage_error(&rio(&["setup", "unbind", "junk"]), &["junk"]);
    usage_error(
        &rio(&["setup", "bind", "0000:ff:1f.7", "--driver", "e1000"]),
        &["e1000"],
    );
    usage_error(&rio(&["setup", "hugepages", "4", "--size", "3M"]), &["3M"]);

    // A real PCI device of this host that is not an NVMe controller (a bridge, a NIC, the
    // disk's virtio function...): refused on its class, and its binding is unchanged.
    let Some((addr, class, before)) = non_nvme_pci_device() else {
        common::missing("a PCI device that is not an NVMe controller (to be refused)");
        return;
    };
    usage_error(
        &rio(&["setup", "bind", &addr]),
        &[&addr, "not an NVMe controller"],
    );
    assert_eq!(
        binding(&addr),
        before,
        "{addr} (class {class}) must be untouched"
    );
}

/// (address, class, binding) of a PCI function that is not an NVMe controller, preferring one
/// without a driver.
fn non_nvme_pci_device() -> Option<(String, String, (Option<String>, String))> {
    let mut found: Vec<_> = std::fs::read_dir("/sys/bus/pci/devices")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let addr = e.file_name().to_string_lossy().into_owned();
            let class = std::fs::read_to_string(e.path().join("class")).ok()?;
            let class = class.trim().to_string();
            (class != "0x010802").then(|| (addr.clone(), class, binding(&addr)))
        })
        .collect();
    found.sort_by_key(|(_, _, (drv, _))| drv.is_some());
    found.into_iter().next()
}

/// The driver link and driver_override of a PCI function.
fn binding(addr: &str) -> (Option<String>, String) {
    let d = std::path::Path::new("/sys/bus/pci/devices").join(addr);
    (
        std::fs::read_link(d.join("driver"))
            .ok()
            .map(|p| p.display().to_string()),
        std::fs::read_to_string(d.join("driver_override")).unwrap_or_default(),
    )
}
