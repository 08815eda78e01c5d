//! Controllers that need the driver to bend the rules, keyed by PCI vendor and device id, as
//! SPDK's `nvme_quirks.c` and Linux's `nvme_id_table` do.
//!
//! Only behaviours rio's driver has a use for are listed; the delays are SPDK's. The first
//! entry is QEMU's emulated controller, the one rio's own VM tests run against.

use std::time::Duration;

/// What a controller needs beyond the specification.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Quirks {
    /// Wait this long after changing CC.EN before reading CSTS.RDY (some controllers report
    /// a stale RDY right after the write).
    pub delay_before_ready_check: Duration,
    /// Wait this long after creating an I/O queue pair before ringing its doorbells.
    pub delay_after_queue_create: Duration,
    /// Identify CNS 02h (active namespace list) is not implemented: enumerate namespaces
    /// 1..=NN with Identify Namespace instead.
    pub no_active_ns_list: bool,
    /// Namespace identifiers (NGUID, EUI-64) are not unique across controllers.
    pub bogus_ns_ids: bool,
}

/// One entry: vendor, device (`None`: any), a name for the log, the quirks.
type Entry = (u16, Option<u16>, &'static str, Quirks);

const NONE: Quirks = Quirks {
    delay_before_ready_check: Duration::ZERO,
    delay_after_queue_create: Duration::ZERO,
    no_active_ns_list: false,
    bogus_ns_ids: false,
};

/// The table. Keep QEMU's controller first.
pub const TABLE: &[Entry] = &[
    // QEMU's NVMe controller (hw/nvme, Red Hat's PCI vendor id): every instance reports the
    // same namespace identifiers unless the user sets them.
    (
        0x1b36,
        Some(0x0010),
        "QEMU NVMe",
        Quirks {
            bogus_ns_ids: true,
            ..NONE
        },
    ),
    // QEMU's controller before 5.0 (Intel's id): no active namespace list.
    (
        0x8086,
        Some(0x5845),
        "QEMU NVMe (Intel id, before QEMU 5.0)",
        Quirks {
            no_active_ns_list: true,
            bogus_ns_ids: true,
            ..NONE
        },
    ),
    // Samsung and Memblaze parts that report CSTS.RDY late after a CC.EN change.
    (
        0x144d,
        Some(0xa821),
        "Samsung PM1725",
        Quirks {
            delay_before_ready_check: Duration::from_millis(2500),
            ..NONE
        },
    ),
    (
        0x144d,
        Some(0xa822),
        "Samsung PM1725a",
        Quirks {
            delay_before_ready_check: Duration::from_millis(2500),
            ..NONE
        },
    ),
    (
        0x1c5f,
        Some(0x0540),
        "Memblaze PBlaze4",
        Quirks {
            delay_before_ready_check: Duration::from_millis(2500),
            ..NONE
        },
    ),
    // VirtualBox's emulated controller loses commands rung right after queue creation.
    (
        0x80ee,
        Some(0x4e56),
        "VirtualBox NVMe",
        Quirks {
            delay_after_queue_create: Duration::from_micros(100),
            ..NONE
        },
    ),
];

/// The quirks of a controller with this PCI identity, and the table entry's name.
pub fn lookup(vendor: u16, device: u16) -> Option<(&'static str, Quirks)> {
    TABLE
        .iter()
        .find(|(v, d, _, _)| *v == vendor && d.is_none_or(|d| d == device))
        .map(|&(_, _, name, q)| (name, q))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_first_and_lookup_by_id() {
        assert_eq!((TABLE[0].0, TABLE[0].1), (0x1b36, Some(0x0010)));
        let (name, q) = lookup(0x1b36, 0x0010).unwrap();
        assert!(name.contains("QEMU") && q.bogus_ns_ids && !q.no_active_ns_list);
        assert!(lookup(0x8086, 0x5845).unwrap().1.no_active_ns_list);
        assert_eq!(
            lookup(0x144d, 0xa822).unwrap().1.delay_before_ready_check,
            Duration::from_millis(2500)
        );
        assert!(lookup(0x1b36, 0x0011).is_none());
        assert!(lookup(0x144d, 0xa808).is_none());
    }
}
