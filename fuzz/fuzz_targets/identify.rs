//! What the driver reads from a device's admin pages: Identify Controller and Namespace, the
//! active namespace list, SMART / health and error log entries, completion entries. The
//! device is untrusted input: decoding and every derived value must not panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rio::nvme::Namespace;
use rio::nvme::spec::{
    CompletionEntry, ErrorLogEntry, IdentifyController, IdentifyNamespace, SmartLog, parse_ns_list,
};

fn page(data: &[u8]) -> [u8; 4096] {
    let mut p = [0u8; 4096];
    for (i, b) in data.iter().enumerate() {
        p[i % 4096] ^= b;
    }
    p
}

fuzz_target!(|data: &[u8]| {
    let p = page(data);
    let c = IdentifyController::from_bytes(&p);
    let _ = (
        c.serial(),
        c.model(),
        c.firmware(),
        c.subsystem_nqn(),
        c.version(),
    );
    for mps in [4096u64, 1 << 16, u64::MAX] {
        let _ = c.mdts_bytes(mps);
    }
    let _ = (
        c.abort_limit(),
        c.total_nvm_capacity(),
        c.sqes_min(),
        c.cqes_max(),
    );
    let _ = format!("{c:?}");
    let n = IdentifyNamespace::from_bytes(&p);
    if let Ok(Some(ns)) = Namespace::from_identify(1, &n) {
        assert!(ns.block_size.is_power_of_two() && ns.block_size >= 512);
        assert_eq!(ns.size_bytes, ns.blocks * ns.block_size as u64);
    }
    let _ = (
        n.size_bytes(),
        n.nvm_capacity(),
        n.current_format(),
        n.block_size(),
    );
    let _ = format!("{n:?}");
    let _ = parse_ns_list(data);
    if let Some(s) = SmartLog::from_prefix(&p) {
        let _ = (
            s.temperature_celsius(),
            s.bytes_read(),
            s.bytes_written(),
            s.power_on_hours(),
        );
    }
    for e in p
        .chunks_exact(ErrorLogEntry::SIZE)
        .filter_map(ErrorLogEntry::from_prefix)
    {
        let _ = (e.status(), e.is_valid());
    }
    for e in data
        .chunks_exact(CompletionEntry::SIZE)
        .filter_map(CompletionEntry::from_prefix)
    {
        let _ = format!("{e:?}");
    }
});
