//! Configuration of the software controller: [`SimConfig`] and its `sim://` option parser.

use std::time::Duration;

use super::{SIM_DEVICE_ID, SIM_VID};
use crate::nvme::spec::{self, Status};

/// Most namespaces a model may have.
const MAX_NAMESPACES: usize = 65_536;
/// Largest BAR0 the model maps (virtual size; its pages are touched lazily).
const MAX_BAR_BYTES: usize = 1 << 30;

/// One namespace of the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimNamespace {
    /// Logical block size in bytes: 512 or 4096.
    pub block_size: u32,
    /// Capacity in bytes (a multiple of `block_size`).
    pub size_bytes: u64,
}

impl Default for SimNamespace {
    fn default() -> Self {
        SimNamespace {
            block_size: 512,
            size_bytes: 1 << 30,
        }
    }
}

/// Service time of an I/O command, from the moment the model fetches it to the moment its
/// completion may be posted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Latency {
    /// Complete inline, as soon as the command is fetched.
    #[default]
    None,
    /// Every I/O command takes this long.
    Fixed(Duration),
    /// `base + max(0, inflight - knee_qd) * per_qd`, where `inflight` counts the commands
    /// fetched from the same submission queue and not yet completed (this one included).
    Knee {
        base: Duration,
        knee_qd: u32,
        per_qd: Duration,
    },
}

/// A fault the model injects. Counters (`nth`) are 1-based and global for the life of the
/// [`SimController`](super::SimController): a controller reset does not restart them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Complete the nth command (1-based, counting commands with this opcode on the admin queue
    /// (`admin = true`) or on I/O queues; `nth = 0` means every one) with this status, exactly
    /// as given (its CRD, More and DNR bits land in the CQE). The command is not executed (no
    /// data moves).
    ErrorStatus {
        admin: bool,
        opcode: u8,
        nth: u64,
        status: Status,
    },
    /// Never complete the nth such command: it stays outstanding inside the model. An Abort
    /// for it completes it with Generic 0x07 "Command Abort Requested" (Abort dw0 bit 0 = 0); a
    /// controller reset (CC.EN 1->0) discards it. I/O commands are executed (data moves)
    /// before the completion is withheld.
    DropCompletion { admin: bool, opcode: u8, nth: u64 },
    /// After `after_io` I/O commands have been processed, set CSTS.CFS=1 and stop processing
    /// anything until CC.EN goes 0 and then 1 again (the reset clears CFS). Fires once.
    Fatal { after_io: u64 },
    /// For the nth I/O command: post its completion with command id 0xFFFF instead of the real
    /// one; the real command then stays outstanding like `DropCompletion` (abortable).
    BadCid { nth: u64 },
    /// For the nth I/O command: complete it normally, then post a second, duplicate completion
    /// with the same command id (a stale completion).
    StaleCid { nth: u64 },
    /// Ignore Abort commands: they complete with dw0 bit 0 = 1 ("not aborted") and leave the
    /// target outstanding.
    IgnoreAbort,
    /// A transient error: the nth I/O command with this opcode (1-based) and the `times - 1`
    /// I/O commands with that opcode after it complete with `status` exactly as given (its
    /// CRD, More and DNR bits land in the CQE unchanged) without executing. Both `nth` and
    /// `times` must be at least 1.
    Transient {
        opcode: u8,
        nth: u64,
        times: u64,
        status: Status,
    },
    /// A late admin completion: the nth admin command with this opcode (1-based) is executed
    /// when fetched (its data reaches the host, its effect applies: Doorbell Buffer Config
    /// starts using the buffers) but completed only `delay` after it was fetched; other admin
    /// commands proceed meanwhile. A controller reset (CC.EN 1->0) before then discards the
    /// completion.
    DelayAdmin {
        opcode: u8,
        nth: u64,
        delay: Duration,
    },
    /// A late admin command: the nth admin command with this opcode (1-based) is fetched and
    /// then left alone for `delay`: only then is it executed (its data reaches the host, its
    /// effect applies) and completed. This is what a host that gave up on it must survive (a
    /// transfer into a buffer it has since reused). A controller reset before then discards it.
    LateAdmin {
        opcode: u8,
        nth: u64,
        delay: Duration,
    },
}

/// Everything the model can be configured with. `SimConfig::default()` is one 1 GiB namespace
/// of 512-byte blocks, MDTS 5, 1024-entry queues, 64 I/O queue pairs, shadow doorbells, a
/// volatile write cache, no latency, data stored in RAM, no faults, no SGLs, CRDTs 0, CAP and
/// BAR0 as configured, the active namespace list supported, PCI id 1b36:0001.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimConfig {
    /// Namespaces 1..=N in order.
    pub namespaces: Vec<SimNamespace>,
    /// Identify MDTS (power of two of 4 KiB pages); 0 = no limit.
    pub mdts: u8,
    /// CAP.MQES (0-based maximum queue size, at least 1).
    pub mqes: u16,
    /// The most I/O queues (of each kind) Set Features Number of Queues grants.
    pub max_io_queues: u16,
    /// CAP.DSTRD (doorbell stride `4 << dstrd` bytes), 0..=15.
    pub dstrd: u8,
    /// CAP.TO in 500 ms units.
    pub timeout_500ms_units: u8,
    /// Advertise OACS bit 8 (Doorbell Buffer Config) and honour the command.
    pub dbbuf: bool,
    /// SGL support: Identify SGLS = 1 (SGLs supported, no alignment requirement) and Read,
    /// Write and Dataset Management accept PSDT 01b, the data described by SGL1 (a Data Block,
    /// or a Segment / Last Segment chain of descriptor lists, at most 4096 descriptors per
    /// command). `false`: any PSDT other than 00b is an Invalid Field.
    pub sgl: bool,
    /// Volatile write cache present (Identify VWC; Set Features VWC accepted).
    pub vwc: bool,
    /// Model what a volatile write cache loses at a power cut
    /// ([`SimController::power_cut`](super::SimController::power_cut)): while the cache is
    /// enabled, the model keeps the durable contents of every block written (Write, Write
    /// Zeroes, Deallocate) since the last Flush, and a cut puts them back. Needs `vwc` and
    /// `store_data`. When the kept blocks pass [`SimConfig::write_cache_max`] bytes the cache
    /// destages: everything written so far becomes durable, as a real cache writes back.
    pub write_cache: bool,
    /// Bytes of kept block contents at which the modelled cache destages (default 64 MiB).
    pub write_cache_max: u64,
    /// I/O service time.
    pub latency: Latency,
    /// `true`: namespaces are RAM. `false`: no data moves at all (reads leave the host buffer
    /// untouched, writes are discarded) so the driver's own cost can be measured.
    pub store_data: bool,
    /// Delay between a CC.EN change and the matching CSTS.RDY change.
    pub ready_delay: Duration,
    /// Faults to inject.
    pub faults: Vec<Fault>,
    /// Identify MN (at most 40 bytes).
    pub model: String,
    /// Identify SN (at most 20 bytes).
    pub serial: String,
    /// Identify FR (at most 8 bytes).
    pub firmware: String,
    /// Pin the device thread to this CPU (as a device is "on the other core" of the driver).
    pub cpu: Option<usize>,
    /// The device does its work on the driver's thread: each poll of a queue runs one pass of
    /// the model ([`SimController::service`](super::SimController::service)) and the device
    /// thread only naps between passes (registers, admin commands, timed completions). No CPU
    /// spins for the device, so a measurement needs one CPU less; the model's cost lands on
    /// the polling thread, as a page-cache read's does on an io_uring submitter.
    pub inline: bool,
    /// After this long from start, I/O service time follows the second latency instead (a
    /// device that changes mid-run: a write cliff, background work).
    pub latency_change: Option<(Duration, Latency)>,
    /// Identify CRDT1..CRDT3: the Command Retry Delay Times (100 ms units) a completion's CRD
    /// field selects.
    pub crdt: [u16; 3],
    /// CAP reads exactly this value, unchecked (a buggy device's register). The model itself
    /// keeps working with the configured `mqes`, `dstrd` and page sizes.
    pub raw_cap: Option<u64>,
    /// BAR0 is this many bytes (at least `0x1008`: the registers and the admin doorbells), so
    /// doorbells of higher queue ids may lie outside it: the model never touches memory past
    /// its BAR, a doorbell outside it is never rung. `None`: BAR0 holds the doorbells of every
    /// queue the model can grant.
    pub bar_bytes: Option<usize>,
    /// Identify CNS 02h (active namespace ID list) is supported. `false`: it fails with Invalid
    /// Field, as on some old controllers.
    pub active_ns_list: bool,
    /// PCI (vendor, device) id; Identify VID reports the vendor.
    pub pci_id: (u16, u16),
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            namespaces: vec![SimNamespace::default()],
            mdts: 5,
            mqes: 1023,
            max_io_queues: 64,
            dstrd: 0,
            timeout_500ms_units: 10,
            dbbuf: true,
            sgl: false,
            vwc: true,
            write_cache: false,
            write_cache_max: 64 << 20,
            latency: Latency::None,
            store_data: true,
            ready_delay: Duration::ZERO,
            faults: Vec::new(),
            model: "rio software NVMe controller".to_string(),
            serial: "RIOSIM0001".to_string(),
            firmware: "1.0".to_string(),
            cpu: None,
            inline: false,
            latency_change: None,
            crdt: [0; 3],
            raw_cap: None,
            bar_bytes: None,
            active_ns_list: true,
            pci_id: (SIM_VID, SIM_DEVICE_ID),
        }
    }
}

impl SimConfig {
    /// Parses the options of a `sim://` target (the part after `sim://`; a leading `sim://` or
    /// `?` is also accepted). Options are `key=value`, separated by `,` or `&`, all optional:
    ///
    /// | key | meaning |
    /// |---|---|
    /// | `size=1G` | capacity of each namespace (`k`, `m`, `g`, `t`: binary; optional `iB`/`B`) |
    /// | `bs=512\|4096` | block size of every namespace |
    /// | `ns=N` | number of namespaces |
    /// | `ns2bs=4096` | block size of namespace 2 (any `ns<k>bs`) |
    /// | `lat=10us` | fixed latency (`ns`, `us`, `ms`, `s`; `0` = none) |
    /// | `knee=8,base=20us,per_qd=5us` | knee latency curve (`base` defaults to 0) |
    /// | `change_after=3s,knee2=4,base2=20us,per_qd2=10us` | from 3 s after start, this knee curve instead |
    /// | `mdts=N`, `mqes=N`, `qpairs=N`, `dstrd=N` | Identify MDTS, CAP.MQES (0-based), I/O queue pairs, CAP.DSTRD |
    /// | `data=0\|1`, `dbbuf=0\|1`, `vwc=0\|1` | RAM namespaces, shadow doorbells, write cache |
    /// | `wcache=0\|1`, `wcache_max=64m` | model the write cache's loss at a power cut (see [`SimConfig::write_cache`]) |
    /// | `ready=5ms` | CSTS.RDY delay |
    /// | `cpu=N` | pin the device thread to CPU N |
    /// | `inline=0\|1` | the device works on the polling thread (see [`SimConfig::inline`]) |
    /// | `sgl=0\|1` | SGL data pointers for Read, Write and DSM (see [`SimConfig::sgl`]) |
    /// | `crdt=10:20:50` | Identify CRDT1..3 in 100 ms units (1 to 3 values, the rest 0) |
    /// | `cap=0x...` | CAP reads exactly this 64-bit value ([`SimConfig::raw_cap`]; hex with `0x`, or decimal) |
    /// | `bar=0x2000` | BAR0 size in bytes ([`SimConfig::bar_bytes`]; hex with `0x`, or a size like `8k`) |
    /// | `nslist=0\|1` | Identify CNS 02h (active namespace list) supported ([`SimConfig::active_ns_list`]) |
    /// | `pci=1b36:0010` | PCI vendor:device id in hex ([`SimConfig::pci_id`]; Identify VID is the vendor) |
    ///
    /// `ns` may be up to 65536 and `dstrd` up to 15.
    /// Errors are one-line messages naming the key.
    pub fn parse(spec: &str) -> Result<SimConfig, String> {
        let spec = spec.strip_prefix("sim://").unwrap_or(spec);
        let spec = spec.strip_prefix('?').unwrap_or(spec);
        let mut cfg = SimConfig::default();
        let mut size: Option<u64> = None;
        let mut bs: Option<u32> = None;
        let mut count: Option<usize> = None;
        let mut per_ns_bs: Vec<(usize, u32)> = Vec::new();
        let mut lat: Option<Duration> = None;
        let mut knee: Option<u32> = None;
        let mut base: Option<Duration> = None;
        let mut per_qd: Option<Duration> = None;
        let (mut change_after, mut knee2, mut base2, mut per_qd2) = (None, None, None, None);
        let mut seen: Vec<&str> = Vec::new();

        for item in spec
            .split([',', '&'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| format!("sim option '{item}' is not key=value"))?;
            let (key, value) = (key.trim(), value.trim());
            if seen.contains(&key) {
                return Err(format!("sim option '{key}' given twice"));
            }
            seen.push(key);
            match key {
                "size" => size = Some(parse_size(key, value)?),
                "bs" => bs = Some(parse_block_size(key, value)?),
                "ns" => {
                    let n = parse_num(key, value)?;
                    if !(1..=MAX_NAMESPACES as u64).contains(&n) {
                        return Err(format!(
                            "sim option 'ns' must be 1..={MAX_NAMESPACES}, got {value}"
                        ));
                    }
                    count = Some(n as usize);
                }
                "lat" => lat = Some(parse_duration(key, value)?),
                "knee" => knee = Some(parse_int(key, value, u32::MAX as u64)? as u32),
                "base" => base = Some(parse_duration(key, value)?),
                "per_qd" => per_qd = Some(parse_duration(key, value)?),
                "mdts" => cfg.mdts = parse_int(key, value, 20)? as u8,
                "mqes" => {
                    let v = parse_int(key, value, 0xFFFF)?;
                    if v == 0 {
                        return Err("sim option 'mqes' (0-based) must be at least 1".to_string());
                    }
                    cfg.mqes = v as u16;
                }
                "qpairs" => {
                    let v = parse_int(key, value, 0xFFFF)?;
                    if v == 0 {
                        return Err("sim option 'qpairs' must be at least 1".to_string());
                    }
                    cfg.max_io_queues = v as u16;
                }
                "dstrd" => cfg.dstrd = parse_int(key, value, 15)? as u8,
                "sgl" => cfg.sgl = parse_bool(key, value)?,
                "crdt" => cfg.crdt = parse_crdt(key, value)?,
                "cap" => cfg.raw_cap = Some(parse_u64(key, value)?),
                "bar" => {
                    let b = if value.starts_with("0x") || value.starts_with("0X") {
                        parse_u64(key, value)?
                    } else {
                        parse_size(key, value)?
                    };
                    cfg.bar_bytes = Some(
                        usize::try_from(b)
                            .map_err(|_| format!("sim option 'bar' is too large: {value}"))?,
                    );
                }
                "nslist" => cfg.active_ns_list = parse_bool(key, value)?,
                "pci" => cfg.pci_id = parse_pci_id(key, value)?,
                "data" => cfg.store_data = parse_bool(key, value)?,
                "dbbuf" => cfg.dbbuf = parse_bool(key, value)?,
                "vwc" => cfg.vwc = parse_bool(key, value)?,
                "wcache" => cfg.write_cache = parse_bool(key, value)?,
                "wcache_max" => cfg.write_cache_max = parse_size(key, value)?,
                "ready" => cfg.ready_delay = parse_duration(key, value)?,
                "cpu" => cfg.cpu = Some(parse_int(key, value, 4095)? as usize),
                "inline" => cfg.inline = parse_bool(key, value)?,
                "change_after" => change_after = Some(parse_duration(key, value)?),
                "knee2" => knee2 = Some(parse_int(key, value, u32::MAX as u64)? as u32),
                "base2" => base2 = Some(parse_duration(key, value)?),
                "per_qd2" => per_qd2 = Some(parse_duration(key, value)?),
                _ => {
                    let k = key
                        .strip_prefix("ns")
                        .and_then(|r| r.strip_suffix("bs"))
                        .and_then(|n| n.parse::<usize>().ok());
                    match k {
                        Some(k) if k >= 1 => per_ns_bs.push((k, parse_block_size(key, value)?)),
                        _ => return Err(format!("unknown sim option '{key}'")),
                    }
                }
            }
        }

        let n = count.unwrap_or(1);
        let size = size.unwrap_or(1 << 30);
        let bs = bs.unwrap_or(512);
        cfg.namespaces = vec![
            SimNamespace {
                block_size: bs,
                size_bytes: size,
            };
            n
        ];
        for (k, b) in per_ns_bs {
            let ns = cfg.namespaces.get_mut(k - 1).ok_or_else(|| {
                format!("sim option 'ns{k}bs' names namespace {k} but there are only {n}")
            })?;
            ns.block_size = b;
        }
        for (i, ns) in cfg.namespaces.iter().enumerate() {
            if ns.size_bytes == 0 || !ns.size_bytes.is_multiple_of(ns.block_size as u64) {
                return Err(format!(
                    "sim option 'size' ({size}) must be a nonzero multiple of namespace {}'s block size {}",
                    i + 1,
                    ns.block_size
                ));
            }
        }

        match (change_after, knee2, per_qd2) {
            (None, None, None) if base2.is_none() => {}
            (Some(after), Some(knee_qd), Some(per_qd)) => {
                cfg.latency_change = Some((
                    after,
                    Latency::Knee {
                        base: base2.unwrap_or(Duration::ZERO),
                        knee_qd,
                        per_qd,
                    },
                ));
            }
            _ => {
                return Err(
                    "sim options 'change_after', 'knee2' and 'per_qd2' go together ('base2' optional)"
                        .to_string(),
                );
            }
        }
        match (lat, knee) {
            (Some(_), Some(_)) => {
                return Err("sim options 'lat' and 'knee' cannot be combined".to_string());
            }
            (Some(d), None) => {
                if base.is_some() || per_qd.is_some() {
                    return Err("sim options 'base' and 'per_qd' need 'knee'".to_string());
                }
                cfg.latency = if d.is_zero() {
                    Latency::None
                } else {
                    Latency::Fixed(d)
                };
            }
            (None, Some(knee_qd)) => {
                let per_qd =
                    per_qd.ok_or_else(|| "sim option 'knee' needs 'per_qd'".to_string())?;
                cfg.latency = Latency::Knee {
                    base: base.unwrap_or(Duration::ZERO),
                    knee_qd,
                    per_qd,
                };
            }
            (None, None) => {
                if base.is_some() || per_qd.is_some() {
                    return Err("sim options 'base' and 'per_qd' need 'knee'".to_string());
                }
            }
        }
        if cfg.bar_bytes.is_some() || seen.contains(&"dstrd") {
            // The BAR's bounds (the rest is checked by `SimController::start`).
            cfg.check_bar().map_err(|m| {
                let key = if cfg.bar_bytes.is_some() {
                    "bar"
                } else {
                    "dstrd"
                };
                format!("sim option '{key}': {m}")
            })?;
        }
        Ok(cfg)
    }

    /// BAR0's size: [`SimConfig::bar_bytes`], or room for the doorbells of every I/O queue
    /// the model can grant (rounded up to a page).
    pub(super) fn bar_len(&self) -> usize {
        match self.bar_bytes {
            Some(b) => b,
            None => (spec::cq_head_doorbell(self.max_io_queues, self.dstrd.min(15)) + 4)
                .next_multiple_of(4096),
        }
    }

    /// Checks the invariants `SimController::start` relies on.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.namespaces.is_empty() {
            return Err("sim config needs at least one namespace".to_string());
        }
        for (i, ns) in self.namespaces.iter().enumerate() {
            if ns.block_size != 512 && ns.block_size != 4096 {
                return Err(format!(
                    "namespace {} block size {} is not 512 or 4096",
                    i + 1,
                    ns.block_size
                ));
            }
            if ns.size_bytes == 0 || !ns.size_bytes.is_multiple_of(ns.block_size as u64) {
                return Err(format!(
                    "namespace {} size {} is not a nonzero multiple of its block size",
                    i + 1,
                    ns.size_bytes
                ));
            }
        }
        if self.mqes == 0 {
            return Err("mqes (0-based) must be at least 1".to_string());
        }
        if self.write_cache && !(self.vwc && self.store_data) {
            return Err("wcache=1 needs vwc=1 and data=1 (a cache of stored data)".to_string());
        }
        if self.max_io_queues == 0 || self.max_io_queues == u16::MAX {
            return Err("max_io_queues must be 1..=65534".to_string());
        }
        if self.namespaces.len() > MAX_NAMESPACES {
            return Err(format!(
                "{} namespaces; at most {MAX_NAMESPACES}",
                self.namespaces.len()
            ));
        }
        if self.dstrd > 15 {
            return Err("dstrd must be at most 15".to_string());
        }
        if self.mdts > 20 {
            return Err("mdts must be at most 20".to_string());
        }
        self.check_bar()?;
        for f in &self.faults {
            match *f {
                Fault::Transient { nth, times, .. } if nth == 0 || times == 0 => {
                    return Err(format!(
                        "fault {f:?}: Transient needs nth >= 1 and times >= 1"
                    ));
                }
                Fault::DelayAdmin { nth: 0, .. } | Fault::LateAdmin { nth: 0, .. } => {
                    return Err(format!("fault {f:?}: needs nth >= 1"));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// BAR0 holds the admin doorbells and is not larger than the model maps.
    fn check_bar(&self) -> Result<(), String> {
        let admin_doorbells = spec::cq_head_doorbell(0, self.dstrd.min(15)) + 4;
        match self.bar_bytes {
            Some(b) if b < admin_doorbells => {
                return Err(format!(
                    "bar_bytes {b:#x} leaves out the admin doorbells: at least {admin_doorbells:#x} \
                     at dstrd {}",
                    self.dstrd
                ));
            }
            Some(b) if b > MAX_BAR_BYTES => {
                return Err(format!(
                    "bar_bytes {b:#x} is more than the model maps ({MAX_BAR_BYTES:#x})"
                ));
            }
            Some(_) => {}
            None if self.bar_len() > MAX_BAR_BYTES => {
                return Err(format!(
                    "BAR0 for {} I/O queues at dstrd {} would be {:#x} bytes, more than the \
                     model maps ({MAX_BAR_BYTES:#x}): lower qpairs or dstrd, or set bar_bytes",
                    self.max_io_queues,
                    self.dstrd,
                    self.bar_len()
                ));
            }
            None => {}
        }
        Ok(())
    }
}

fn parse_num(key: &str, value: &str) -> Result<u64, String> {
    value
        .parse::<u64>()
        .map_err(|_| format!("sim option '{key}' needs a number, got '{value}'"))
}

/// A 64-bit number, hex with `0x` or decimal.
fn parse_u64(key: &str, value: &str) -> Result<u64, String> {
    let r = match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
        None => value.parse::<u64>(),
    };
    r.map_err(|_| format!("sim option '{key}' needs a number (0x... for hex), got '{value}'"))
}

/// `a[:b[:c]]`, each 0..=65535 (100 ms units); missing values are 0.
fn parse_crdt(key: &str, value: &str) -> Result<[u16; 3], String> {
    let mut out = [0u16; 3];
    let parts: Vec<&str> = value.split(':').collect();
    if parts.len() > 3 {
        return Err(format!(
            "sim option '{key}' takes at most 3 values (CRDT1:CRDT2:CRDT3), got '{value}'"
        ));
    }
    for (o, p) in out.iter_mut().zip(parts) {
        *o = parse_int(key, p.trim(), u16::MAX as u64)? as u16;
    }
    Ok(out)
}

/// `vendor:device`, each a 16-bit hex number (an optional `0x` on each).
fn parse_pci_id(key: &str, value: &str) -> Result<(u16, u16), String> {
    let bad =
        || format!("sim option '{key}' needs vendor:device in hex like 1b36:0010, got '{value}'");
    let (v, d) = value.split_once(':').ok_or_else(bad)?;
    let hex = |s: &str| {
        let s = s.trim();
        let s = s
            .strip_prefix("0x")
            .or_else(|| s.strip_prefix("0X"))
            .unwrap_or(s);
        if s.is_empty() || s.len() > 4 {
            return None;
        }
        u16::from_str_radix(s, 16).ok()
    };
    Ok((hex(v).ok_or_else(bad)?, hex(d).ok_or_else(bad)?))
}

fn parse_int(key: &str, value: &str, max: u64) -> Result<u64, String> {
    let v = parse_num(key, value)?;
    if v > max {
        return Err(format!("sim option '{key}' must be at most {max}, got {v}"));
    }
    Ok(v)
}

fn parse_bool(key: &str, value: &str) -> Result<bool, String> {
    match value {
        "1" | "true" | "on" | "yes" => Ok(true),
        "0" | "false" | "off" | "no" => Ok(false),
        _ => Err(format!("sim option '{key}' needs 0 or 1, got '{value}'")),
    }
}

fn parse_block_size(key: &str, value: &str) -> Result<u32, String> {
    match value {
        "512" => Ok(512),
        "4096" | "4k" | "4K" => Ok(4096),
        _ => Err(format!(
            "sim option '{key}' must be 512 or 4096, got '{value}'"
        )),
    }
}

fn parse_size(key: &str, value: &str) -> Result<u64, String> {
    let bad = || format!("sim option '{key}' needs a size like 1G or 512M, got '{value}'");
    let v = value.trim();
    let v = v
        .strip_suffix("iB")
        .or_else(|| v.strip_suffix("ib"))
        .or_else(|| v.strip_suffix('B'))
        .unwrap_or(v);
    let (digits, shift) = match v.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                _ => return Err(bad()),
            };
            (&v[..i], shift)
        }
        _ => (v, 0),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift)
        .filter(|&b| b > 0)
        .ok_or_else(bad)
}

fn parse_duration(key: &str, value: &str) -> Result<Duration, String> {
    let bad = || format!("sim option '{key}' needs a duration like 10us or 2ms, got '{value}'");
    let v = value.trim();
    let split = v
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let nanos_per = match unit {
        "" if n == 0.0 => 0.0,
        "ns" => 1.0,
        "us" | "µs" => 1e3,
        "ms" => 1e6,
        "s" => 1e9,
        _ => return Err(bad()),
    };
    let nanos = n * nanos_per;
    if !nanos.is_finite() || !(0.0..=3600e9).contains(&nanos) {
        return Err(bad());
    }
    Ok(Duration::from_nanos(nanos.round() as u64))
}
