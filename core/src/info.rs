//! `rio info`: what a controller says about itself (identify, namespaces, SMART/health).

use crate::engine::Engine;
use crate::error::Result;
use crate::nvme::Controller;

/// A controller's description, as `rio info` prints it (human or JSON).
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct ControllerInfo {
    pub controller: String,
    pub model: String,
    pub serial: String,
    pub firmware: String,
    pub nvme_version: String,
    pub pci_vendor: u16,
    pub controller_id: u16,
    /// Largest transfer per command in bytes (MDTS; `None`: no limit).
    pub mdts_bytes: Option<u64>,
    /// CAP.MQES + 1.
    pub max_queue_entries: u32,
    /// I/O queue pairs the controller granted rio.
    pub io_queue_pairs: u16,
    /// CAP.TO: worst-case enable/disable time.
    pub ready_timeout_ms: u64,
    pub doorbell_stride: u32,
    pub namespaces_supported: u32,
    pub volatile_write_cache: bool,
    pub write_zeroes: bool,
    pub dataset_management: bool,
    pub shadow_doorbells: bool,
    pub sgl: bool,
    pub namespaces: Vec<crate::nvme::Namespace>,
    pub smart: Option<Health>,
    /// Why SMART/health could not be read, when it could not.
    pub smart_error: Option<String>,
}

/// SMART / health figures.
#[derive(Clone, Debug)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Health {
    pub critical_warning: u8,
    pub temperature_celsius: i32,
    pub available_spare_pct: u8,
    pub percent_used: u8,
    pub data_read_bytes: u128,
    pub data_written_bytes: u128,
    pub host_read_commands: u128,
    pub host_write_commands: u128,
    pub power_on_hours: u128,
    pub power_cycles: u128,
    pub unsafe_shutdowns: u128,
    pub media_errors: u128,
    pub error_log_entries: u128,
}

impl ControllerInfo {
    pub fn of(c: &Controller) -> ControllerInfo {
        let id = c.identify_data();
        let cap = c.cap();
        let (smart, smart_error) = match c.smart_log() {
            Ok(s) => (
                Some(Health {
                    critical_warning: s.critical_warning,
                    temperature_celsius: s.temperature_celsius(),
                    available_spare_pct: s.avail_spare,
                    percent_used: s.percent_used,
                    data_read_bytes: s.bytes_read(),
                    data_written_bytes: s.bytes_written(),
                    host_read_commands: s.host_read_commands(),
                    host_write_commands: s.host_write_commands(),
                    power_on_hours: s.power_on_hours(),
                    power_cycles: s.power_cycles(),
                    unsafe_shutdowns: s.unsafe_shutdowns(),
                    media_errors: s.media_errors(),
                    error_log_entries: s.num_err_log_entries(),
                }),
                None,
            ),
            Err(e) => (None, Some(e.to_string())),
        };
        ControllerInfo {
            controller: c.name.clone(),
            model: id.model(),
            serial: id.serial(),
            firmware: id.firmware(),
            nvme_version: id.version().to_string(),
            pci_vendor: id.vid,
            controller_id: id.cntlid,
            mdts_bytes: id.mdts_bytes(cap.min_page_size()),
            max_queue_entries: cap.max_queue_entries(),
            io_queue_pairs: c.io_queue_count(),
            ready_timeout_ms: cap.timeout().as_millis() as u64,
            doorbell_stride: cap.doorbell_stride_bytes(),
            namespaces_supported: id.nn,
            volatile_write_cache: id.volatile_write_cache(),
            write_zeroes: id.supports_write_zeroes(),
            dataset_management: id.supports_dsm(),
            shadow_doorbells: c.shadow_doorbells(),
            sgl: id.supports_sgl(),
            namespaces: c.namespaces().to_vec(),
            smart,
            smart_error,
        }
    }

    /// Describe the controller behind an engine opened on a `pcie://` or `sim://` target.
    pub fn of_engine(e: &Engine) -> Option<ControllerInfo> {
        e.controller().map(|c| ControllerInfo::of(c))
    }

    pub fn to_human(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let yn = |b: bool| if b { "yes" } else { "no" };
        let _ = writeln!(s, "controller {}", self.controller);
        let _ = writeln!(s, "  model:        {}", self.model);
        let _ = writeln!(s, "  serial:       {}", self.serial);
        let _ = writeln!(s, "  firmware:     {}", self.firmware);
        let _ = writeln!(
            s,
            "  NVMe version: {} (vendor {:#06x}, controller id {})",
            self.nvme_version, self.pci_vendor, self.controller_id
        );
        let mdts = self
            .mdts_bytes
            .map_or("no limit".to_string(), |b| format!("{} KiB", b / 1024));
        let _ = writeln!(s, "  max transfer: {mdts}");
        let _ = writeln!(
            s,
            "  queues:       up to {} entries each, {} I/O queue pairs granted, doorbell stride {} B",
            self.max_queue_entries, self.io_queue_pairs, self.doorbell_stride
        );
        let _ = writeln!(s, "  ready timeout: {} ms", self.ready_timeout_ms);
        let _ = writeln!(
            s,
            "  features:     write cache {}, write zeroes {}, deallocate {}, shadow doorbells {}, SGL {}",
            yn(self.volatile_write_cache),
            yn(self.write_zeroes),
            yn(self.dataset_management),
            yn(self.shadow_doorbells),
            yn(self.sgl)
        );
        let _ = writeln!(
            s,
            "  namespaces:   {} active of {} supported",
            self.namespaces.len(),
            self.namespaces_supported
        );
        for n in &self.namespaces {
            let formats: Vec<String> = n
                .lba_formats
                .iter()
                .enumerate()
                .map(|(i, (ds, ms, rp))| {
                    let cur = if i == n.current_format as usize {
                        "*"
                    } else {
                        ""
                    };
                    format!("{cur}#{i} {ds}+{ms} rp{rp}")
                })
                .collect();
            let _ = writeln!(
                s,
                "    ns {}: {} ({} blocks of {} B){}; LBA formats: {}",
                n.nsid,
                crate::units::human_bytes(n.size_bytes),
                n.blocks,
                n.block_size,
                if n.thin_provisioned { ", thin" } else { "" },
                formats.join(", ")
            );
        }
        match (&self.smart, &self.smart_error) {
            (Some(h), _) => {
                let _ = writeln!(
                    s,
                    "  health:       critical warning {:#04x}, {} °C, spare {}%, used {}%",
                    h.critical_warning,
                    h.temperature_celsius,
                    h.available_spare_pct,
                    h.percent_used
                );
                let _ = writeln!(
                    s,
                    "                read {} ({} commands), written {} ({} commands)",
                    crate::units::human_bytes(h.data_read_bytes.min(u64::MAX as u128) as u64),
                    h.host_read_commands,
                    crate::units::human_bytes(h.data_written_bytes.min(u64::MAX as u128) as u64),
                    h.host_write_commands
                );
                let _ = writeln!(
                    s,
                    "                power-on {} h, {} power cycles, {} unsafe shutdowns, {} media errors, {} error log entries",
                    h.power_on_hours,
                    h.power_cycles,
                    h.unsafe_shutdowns,
                    h.media_errors,
                    h.error_log_entries
                );
            }
            (None, Some(e)) => {
                let _ = writeln!(s, "  health:       unavailable ({e})");
            }
            (None, None) => {}
        }
        s
    }
}

/// Describe the target of an engine; for kernel-path targets, what the kernel reports.
pub fn describe(e: &Engine) -> Result<String> {
    if let Some(i) = ControllerInfo::of_engine(e) {
        return Ok(i.to_human());
    }
    let t = e.target();
    Ok(format!(
        "{}: {:?}, {} ({} B blocks, DMA alignment {} B); backend {} ({})\n\
         (controller details need the userspace driver: `rio setup bind` the controller and use pcie://ADDR)\n",
        t.path.display(),
        t.kind,
        crate::units::human_bytes(t.geometry.size),
        t.geometry.block_size,
        t.geometry.mem_align,
        e.selection().backend.name(),
        e.selection().reason
    ))
}
