//! The SPDK backend (cargo feature `spdk`): rio's queues, pools, tuner and telemetry over an
//! installed SPDK's userspace NVMe driver, through the bindings of `rio-spdk-sys`.
//!
//! - The SPDK environment (DPDK's EAL: hugepage memory, the PCI bus, vfio) is initialised once
//!   per process, by the first engine that needs it, with the calling thread's CPU affinity
//!   restored afterwards (the EAL pins its caller to its main lcore).
//! - One controller attachment ([`SpdkCtrl`]) per engine: `spdk_nvme_connect` to the
//!   transport ID, the namespace checked (no metadata, active), `spdk_nvme_detach` on drop.
//! - One SPDK I/O queue pair per [`crate::Queue`]; the queue's arena and any regions its owner
//!   adds are registered with `spdk_mem_register` once (process-wide, counted: a runtime's
//!   shared pool is registered once for all its queues), so SPDK builds PRPs from them with
//!   no copy. Registration needs pinned hugepage memory, 2 MiB aligned: a queue whose memory
//!   is not hugepage-backed is refused with the reason.
//! - Submission calls `spdk_nvme_ns_cmd_*` with a per-slot context; completions are collected
//!   by `spdk_nvme_qpair_process_completions` on the queue's own thread (polled, no
//!   interrupts, no syscalls). SPDK splits reads and writes larger than the controller's
//!   transfer limit itself; Write Zeroes is split here at 65,536 blocks per command, and
//!   Deallocate sent as one Dataset Management command of up to 256 ranges.
//! - [`crate::Queue::wait_each`] hands each completion to its caller from inside SPDK's
//!   completion callback (the queue reached through a raw pointer, one reference at a time),
//!   so the caller's next command is queued before SPDK writes the CQ head, and its doorbell
//!   rung as SPDK queues it (SPDK's default; `spdk_nvme_perf` instead rings once at the end of
//!   the poll, `delay_cmd_submit`, which cost rio 10%: see `SpdkQueue::new`). `rio bench`
//!   drives every backend that way. The handler gets a
//!   [`crate::Submitter`], which cannot poll, drop or replace the queue; a panic in it is
//!   caught at SPDK's C boundary and resumed after SPDK returns.
//! - SPDK may complete a command inside the call that submits it (a buffer it cannot
//!   translate, submitted from inside a completion callback): each command is counted before
//!   SPDK sees it, and such a completion only counts it down (`Shared::issuing`); `issue`
//!   lists the slot once SPDK has returned, so the handler is never re-entered. Reads and
//!   writes outside memory registered for the queue are refused at submission instead
//!   (`Error::BufferUnavailable`), as rio's own driver refuses unmapped memory.
//! - When SPDK is out of request objects (-ENOMEM) the slot waits in a backlog and is tried
//!   again after the next completions, as the vfio backend does with a full SQ.
//! - Errors: an NVMe status becomes [`Fail::Nvme`] (the same typed error as rio's own
//!   driver); a command SPDK refuses to build becomes [`Fail::Errno`]; a queue pair SPDK
//!   reports failed (controller removed or reset failed) completes what is outstanding with
//!   [`Fail::Reset`] `{ fatal: true }`.
//!
//! What it does not do: its own timeouts and controller resets (SPDK's are off unless its
//! timeout callback is registered; rio leaves that to SPDK's defaults), shadow doorbells
//! beyond SPDK's own, and namespaces with metadata.

use std::collections::VecDeque;
use std::ffi::{CString, c_void};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rio_spdk_sys as sys;

use crate::backend::{Fail, RawOp, Reaped};
use crate::error::{Error, Result};
use crate::nvme::spec::{NvmeError, Status, io_opcode};
use crate::op::OpKind;

/// Largest Write Zeroes per command, in blocks (NLB is 16 bits, zero-based).
const MAX_ZERO_BLOCKS: u64 = 1 << 16;
/// Largest Deallocate range, in blocks.
const MAX_DSM_RANGE_BLOCKS: u64 = u32::MAX as u64;
/// Ranges per Dataset Management command.
const MAX_DSM_RANGES: usize = 256;

fn spdk_err(what: &str, reason: impl Into<String>) -> Error {
    Error::BackendUnavailable {
        backend: "spdk",
        reason: format!("{what}: {}", reason.into()),
    }
}

fn errno_text(rc: i32) -> String {
    std::io::Error::from_raw_os_error(rc.unsigned_abs() as i32).to_string()
}

/// The process's SPDK environment: initialised once; remembers the PCI address it was set up
/// for (DPDK's allow list), so a second, different device is refused with the reason instead
/// of failing inside DPDK.
struct Env {
    pci: Option<String>,
}

static ENV: OnceLock<std::result::Result<Env, String>> = OnceLock::new();

/// Parse `DDDD:BB:DD.F` (or `BB:DD.F`) into SPDK's PCI address.
fn pci_addr(s: &str) -> Option<sys::spdk_pci_addr> {
    let (dom, rest) = match s.matches(':').count() {
        2 => {
            let (d, r) = s.split_once(':')?;
            (u32::from_str_radix(d, 16).ok()?, r)
        }
        1 => (0, s),
        _ => return None,
    };
    let (bus, rest) = rest.split_once(':')?;
    let (dev, func) = rest.split_once('.')?;
    Some(sys::spdk_pci_addr {
        domain: dom,
        bus: u8::from_str_radix(bus, 16).ok()?,
        dev: u8::from_str_radix(dev, 16).ok()?,
        func: u8::from_str_radix(func, 16).ok()?,
    })
}

/// Load the libraries SPDK needs that a link cannot keep ([`sys::PRELOAD`]: they export
/// nothing; their constructors register NVMe/TCP's socket implementations). Each is loaded from where the build found it, else by its file name (the
/// loader's search path). One that cannot be loaded is logged, not fatal: PCIe needs none.
fn preload() {
    for path in sys::PRELOAD.split(':').filter(|p| !p.is_empty()) {
        let name = std::path::Path::new(path)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(path);
        let mut loaded = false;
        for candidate in [path, name] {
            let Ok(c) = std::ffi::CString::new(candidate) else {
                continue;
            };
            // SAFETY: `c` is a valid C string; the library is one SPDK's own programs link,
            // whose constructors only register themselves. The handle is kept open for the
            // life of the process (never dlclose'd: SPDK keeps pointers into it).
            let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
            if !h.is_null() {
                loaded = true;
                break;
            }
        }
        if loaded {
            tracing::debug!(library = path, "loaded for SPDK");
        } else {
            // SAFETY: dlerror returns a thread-local message (or null) valid until the next
            // dl* call on this thread; it is copied at once.
            let why = unsafe {
                let e = libc::dlerror();
                if e.is_null() {
                    "unknown".to_string()
                } else {
                    std::ffi::CStr::from_ptr(e).to_string_lossy().into_owned()
                }
            };
            tracing::warn!(library = path, error = %why, "cannot load a library SPDK may need (NVMe/TCP needs its socket modules)");
        }
    }
}

fn env_init(pci: Option<&str>) -> Result<()> {
    let env = ENV.get_or_init(|| {
        tracing::debug!(
            libraries = sys::linked_libraries(),
            "SPDK and the libraries it needs are linked"
        );
        preload();
        // Hugepage memory DPDK reserves up front for SPDK's own structures (queue pairs,
        // request pools), MiB; by default SPDK's (dynamic: taken as needed). rio's buffers live
        // in its own pools either way.
        let mem_mb = std::env::var("RIO_SPDK_MEM_MB")
            .ok()
            .and_then(|v| v.parse::<i32>().ok());
        let mut opts = sys::spdk_env_opts {
            opts_size: std::mem::size_of::<sys::spdk_env_opts>(),
            ..Default::default()
        };
        // SAFETY: `opts` is a valid, writable spdk_env_opts whose opts_size is set, as
        // spdk_env_opts_init requires.
        unsafe { sys::spdk_env_opts_init(&mut opts) };
        opts.name = c"rio".as_ptr();
        if let Some(mb) = mem_mb {
            opts.mem_size = mb;
        }
        let mut allowed = pci.and_then(pci_addr);
        if let Some(a) = allowed.as_mut() {
            opts.pci_allowed = a;
            opts.num_pci_addr = 1;
        }
        // The EAL pins its calling thread to its main lcore; put this thread's affinity back
        // afterwards, so threads the caller starts later are not all confined to one CPU.
        // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls only read/write it.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above; pid 0 is the calling thread.
        let saved =
            unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) }
                == 0;
        // SAFETY: `opts` is initialised and every pointer in it (name, allow list) outlives
        // the call; SPDK copies what it keeps into the EAL's arguments.
        let rc = unsafe { sys::spdk_env_init(&opts) };
        if saved {
            // SAFETY: restoring the set read above on the same thread.
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        }
        if rc < 0 {
            return Err(format!(
                "spdk_env_init failed ({}): DPDK could not set up its environment (see its log \
                 above); it needs hugepages on a mounted hugetlbfs (`rio setup hugepages`; {}) \
                 and the device bound to vfio-pci (`rio setup bind`)",
                errno_text(rc),
                mem_mb.map_or(
                    "memory taken as needed; RIO_SPDK_MEM_MB reserves it up front".to_string(),
                    |m| format!("RIO_SPDK_MEM_MB={m} MiB reserved up front")
                ),
            ));
        }
        tracing::info!(mem_mb = ?mem_mb, pci = ?pci, "SPDK environment initialised");
        Ok(Env {
            pci: pci.map(str::to_string),
        })
    });
    match env {
        Ok(e) => match (&e.pci, pci) {
            (Some(a), Some(b)) if !a.eq_ignore_ascii_case(b) => Err(spdk_err(
                "SPDK environment",
                format!(
                    "already initialised in this process for PCI device {a}; one process drives \
                     one SPDK PCI device (open {b} from another process)"
                ),
            )),
            _ => Ok(()),
        },
        Err(e) => Err(spdk_err("SPDK environment", e.clone())),
    }
}

/// Memory registered with `spdk_mem_register`, process-wide: (base, len, users).
static REGISTERED: Mutex<Vec<(usize, usize, usize)>> = Mutex::new(Vec::new());

const HUGE_2M: usize = 2 << 20;

/// Register `[base, base+len)` for DMA (once per process; counted).
fn mem_register(base: *mut u8, len: usize, kind: rio_sys::mem::PageKind) -> Result<()> {
    let (b, l) = (base as usize, len);
    if !kind.is_huge() || b % HUGE_2M != 0 || l % HUGE_2M != 0 {
        return Err(spdk_err(
            "buffer memory",
            format!(
                "SPDK registers only pinned hugepage memory in 2 MiB units; this region is \
                 {kind:?} pages at {b:#x}+{l:#x}. Reserve hugepages (`rio setup hugepages`) so \
                 rio's pools use them"
            ),
        ));
    }
    let mut reg = REGISTERED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(r) = reg.iter_mut().find(|r| r.0 == b && r.1 == l) {
        r.2 += 1;
        return Ok(());
    }
    // SAFETY: the region is mapped hugepage memory that the caller keeps mapped and unmoved
    // until it is unregistered (contract of `Engine::queue_with_regions`).
    let rc = unsafe { sys::spdk_mem_register(base.cast(), len) };
    if rc != 0 {
        return Err(spdk_err(
            "spdk_mem_register",
            format!("{b:#x}+{l:#x}: {}", errno_text(rc)),
        ));
    }
    reg.push((b, l, 1));
    Ok(())
}

fn mem_unregister(base: usize) {
    let mut reg = REGISTERED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(i) = reg.iter().position(|r| r.0 == base) {
        reg[i].2 -= 1;
        if reg[i].2 == 0 {
            let (b, l, _) = reg.remove(i);
            // SAFETY: registered above with these bounds; no queue uses it any more (the
            // count reached zero), so no DMA to it is in flight.
            let rc = unsafe { sys::spdk_mem_unregister(b as *mut c_void, l) };
            if rc != 0 {
                tracing::warn!(base = b, len = l, rc, "spdk_mem_unregister failed");
            }
        }
    }
}

/// A controller attached through SPDK and the namespace an engine serves.
pub(crate) struct SpdkCtrl {
    ctrlr: NonNull<sys::spdk_nvme_ctrlr>,
    ns: NonNull<sys::spdk_nvme_ns>,
    /// The transport ID as given (e.g. `trtype:PCIe traddr:0000:00:04.0`).
    pub trid: String,
    pub nsid: u32,
    pub block_size: u32,
    pub size_bytes: u64,
    pub max_xfer: u32,
    pub model: String,
    /// A PCIe controller (its queues are rings in memory with doorbell registers), not a
    /// fabric's.
    pub pcie: bool,
}

// SAFETY: what rio does with SPDK's controller from several threads is what SPDK allows:
// allocating and freeing I/O queue pairs (both take the controller's lock), reading the
// namespace's data (fixed once attached) and building commands for a queue pair that only
// its owning thread uses (SpdkQueue is not Send: `Queue` is neither Send nor Sync). Detach
// happens once, in Drop, when no queue holds the controller any more.
unsafe impl Send for SpdkCtrl {}
// SAFETY: as above.
unsafe impl Sync for SpdkCtrl {}

impl std::fmt::Debug for SpdkCtrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpdkCtrl")
            .field("trid", &self.trid)
            .field("nsid", &self.nsid)
            .field("model", &self.model)
            .finish()
    }
}

fn trimmed(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_string()
}

impl SpdkCtrl {
    /// Attach to the controller `trid` names (SPDK's transport-ID syntax) and check namespace
    /// `nsid`.
    pub fn connect(trid: &str, pci: Option<&str>, nsid: u32) -> Result<Arc<SpdkCtrl>> {
        env_init(pci)?;
        let c = CString::new(trid).map_err(|_| Error::config("target", "NUL in transport ID"))?;
        let mut id = sys::spdk_nvme_transport_id::default();
        // SAFETY: `id` is a valid transport ID to fill; `c` is a NUL-terminated string.
        let rc = unsafe { sys::spdk_nvme_transport_id_parse(&mut id, c.as_ptr()) };
        if rc != 0 {
            return Err(Error::config(
                "target",
                format!(
                    "'{trid}' is not an SPDK transport ID ({}); e.g. 'trtype:PCIe traddr:0000:00:04.0'",
                    errno_text(rc)
                ),
            ));
        }
        // SAFETY: `id` was filled by the parser; NULL options mean SPDK's defaults.
        let ctrlr = unsafe { sys::spdk_nvme_connect(&id, std::ptr::null(), 0) };
        let Some(ctrlr) = NonNull::new(ctrlr) else {
            return Err(spdk_err(
                "spdk_nvme_connect",
                format!(
                    "no controller attached at '{trid}' (is it bound to vfio-pci? `rio setup \
                     bind`; see SPDK's log above)"
                ),
            ));
        };
        let detach = |c: NonNull<sys::spdk_nvme_ctrlr>| {
            // SAFETY: attached above, not used after this.
            unsafe { sys::spdk_nvme_detach(c.as_ptr()) };
        };
        // SAFETY: the controller is attached; get_ns returns NULL for an invalid id.
        let ns = unsafe { sys::spdk_nvme_ctrlr_get_ns(ctrlr.as_ptr(), nsid) };
        // SAFETY: as above; `ns` is checked for NULL first.
        let active = !ns.is_null() && unsafe { sys::spdk_nvme_ns_is_active(ns) };
        let Some(ns) = NonNull::new(ns).filter(|_| active) else {
            let mut ids = Vec::new();
            // SAFETY: iterating the controller's active namespace list.
            let mut n = unsafe { sys::spdk_nvme_ctrlr_get_first_active_ns(ctrlr.as_ptr()) };
            while n != 0 {
                ids.push(n.to_string());
                // SAFETY: as above.
                n = unsafe { sys::spdk_nvme_ctrlr_get_next_active_ns(ctrlr.as_ptr(), n) };
            }
            detach(ctrlr);
            return Err(Error::NotFound {
                path: format!("{trid} (namespace {nsid}; active: {})", ids.join(", ")).into(),
            });
        };
        // SAFETY: `ns` is an active namespace of the attached controller.
        let (block_size, sectors, md, max_io) = unsafe {
            (
                sys::spdk_nvme_ns_get_sector_size(ns.as_ptr()),
                sys::spdk_nvme_ns_get_num_sectors(ns.as_ptr()),
                sys::spdk_nvme_ns_get_md_size(ns.as_ptr()),
                sys::spdk_nvme_ns_get_max_io_xfer_size(ns.as_ptr()),
            )
        };
        if !block_size.is_power_of_two() {
            // NVMe formats blocks of 2^LBADS bytes; anything else is a broken report, and the
            // queues turn offsets into block numbers by shifting.
            detach(ctrlr);
            return Err(Error::BadTarget {
                path: trid.into(),
                what: format!(
                    "namespace {nsid} reports a block size of {block_size} bytes, not a power of two"
                ),
            });
        }
        if md > 0 {
            detach(ctrlr);
            return Err(Error::BadTarget {
                path: trid.into(),
                what: format!(
                    "namespace {nsid} is formatted with {md} bytes of metadata per block, which rio does not support"
                ),
            });
        }
        // Identify Controller data: the model number is bytes 24..64 (NVMe base spec,
        // Figure "Identify Controller Data Structure"); the struct is opaque in the bindings.
        // SAFETY: the controller is attached; its 4 KiB identify data stays valid while it is.
        let model = unsafe {
            let cdata = sys::spdk_nvme_ctrlr_get_data(ctrlr.as_ptr()).cast::<u8>();
            trimmed(std::slice::from_raw_parts(cdata.add(24), 40))
        };
        Ok(Arc::new(SpdkCtrl {
            ctrlr,
            ns,
            trid: trid.to_string(),
            nsid,
            block_size,
            size_bytes: sectors * block_size as u64,
            max_xfer: max_io,
            model,
            pcie: id.trtype == sys::spdk_nvme_transport_type::SPDK_NVME_TRANSPORT_PCIE,
        }))
    }
}

impl Drop for SpdkCtrl {
    fn drop(&mut self) {
        // SAFETY: every queue pair holds an Arc of this controller, so none is left; the
        // controller is not used after this.
        let rc = unsafe { sys::spdk_nvme_detach(self.ctrlr.as_ptr()) };
        if rc != 0 {
            tracing::warn!(trid = %self.trid, rc, "spdk_nvme_detach failed");
        }
    }
}

/// What every slot's completion callback reaches: the queue's list of finished operations
/// and, while [`SpdkQueue::poll_each`] runs, its owner's hook. Owned by the queue (stable:
/// from `Box::into_raw`, freed last).
struct Shared {
    done: Vec<Reaped>,
    /// Called with the result of each operation that finished whole, from inside SPDK's
    /// completion callback, instead of listing it in `done`. The lifetime is erased: set only
    /// for the duration of one `spdk_nvme_qpair_process_completions` call in `poll_each`,
    /// whose caller owns the closure for longer.
    hook: Option<NonNull<dyn FnMut(Reaped)>>,
    /// Operations the hook was given during the current `process_completions` call (taken
    /// off the queue's count of operations in flight after it returns).
    finished: u32,
    /// A panic out of the hook, caught at SPDK's C boundary (unwinding through C is not
    /// allowed); `poll_each` resumes it once SPDK has returned. While it is set, the hook is
    /// not called again: later completions are listed in `done`.
    panic: Option<Box<dyn std::any::Any + Send>>,
    /// The slot `SpdkQueue::issue` is handing to SPDK (`NOT_ISSUING` otherwise). SPDK may
    /// complete a command inside the submitting call (a buffer it cannot translate, from
    /// inside a completion callback): that callback only counts the command, and `issue`
    /// decides what follows once SPDK has returned.
    issuing: u32,
    /// log2 of the namespace's block size (a power of two: `SpdkCtrl::connect` checks).
    block_shift: u32,
}

const NOT_ISSUING: u32 = u32::MAX;

/// One queue slot's operation, as SPDK's completion callbacks see it.
struct Slot {
    shared: *mut Shared,
    slot: u32,
    active: bool,
    op: RawOp,
    /// Bytes (read/write) or blocks (zeroes, deallocate) of the operation handed to SPDK.
    issued: u64,
    /// Commands SPDK holds for this slot.
    outstanding: u32,
    fail: Fail,
}

impl Slot {
    /// The operation is over (every piece completed, or it failed): its result, the slot
    /// inactive. `None` if it held nothing.
    #[inline]
    fn finish(&mut self) -> Option<Reaped> {
        if !self.active {
            return None;
        }
        self.active = false;
        let res = match self.op.op {
            OpKind::Read | OpKind::Write => i32::try_from(self.op.len).unwrap_or(i32::MAX),
            _ => 0,
        };
        Some(Reaped {
            slot: self.slot,
            res,
            fail: self.fail,
        })
    }

    /// Commands (Write Zeroes, Deallocate: blocks) the operation takes.
    fn total(&self, block_shift: u32) -> u64 {
        match self.op.op {
            OpKind::Read | OpKind::Write | OpKind::Flush => 1,
            OpKind::WriteZeroes | OpKind::Deallocate => self.op.len >> block_shift,
        }
    }
}

/// A read or write whose buffer SPDK was not given (built out of line: `push` runs per I/O).
#[cold]
#[inline(never)]
fn unregistered(len: u64) -> Error {
    Error::BufferUnavailable {
        requested: len as usize,
        reason: "buffer is not in memory registered with SPDK for this queue".into(),
    }
}

/// SPDK's completion callback: `arg` is the slot's context.
extern "C" fn on_complete(arg: *mut c_void, cpl: *const sys::spdk_nvme_cpl) {
    // SAFETY: `arg` is the `Slot` this command was submitted with, derived from the slot
    // array's own pointer (`SpdkQueue::slot_ptr`). The array outlives every command (the
    // queue's Drop keeps it while anything is in flight). Callbacks run on the queue's
    // own thread, inside `spdk_nvme_qpair_process_completions` or inside a submitting
    // `spdk_nvme_ns_cmd_*` call; in both, the queue's code holds no reference to this slot
    // across the call (`issue` reaches it through the raw pointer, one statement at a time).
    // This reference ends before the hook runs.
    let s = unsafe { &mut *arg.cast::<Slot>() };
    // SAFETY: SPDK passes a completion valid for this call.
    let raw = unsafe { sys::cpl_status_raw(cpl) };
    let status = Status::from_cqe_status(raw);
    if status != Status::SUCCESS && s.fail == Fail::None {
        let opcode = match s.op.op {
            OpKind::Read => io_opcode::READ,
            OpKind::Write => io_opcode::WRITE,
            OpKind::Flush => io_opcode::FLUSH,
            OpKind::WriteZeroes => io_opcode::WRITE_ZEROES,
            OpKind::Deallocate => io_opcode::DATASET_MANAGEMENT,
        };
        s.fail = Fail::Nvme(NvmeError::new(false, opcode, status));
    }
    // `issue` counts a command before handing it over, so this cannot underflow.
    s.outstanding -= 1;
    if s.outstanding > 0 {
        return;
    }
    let (sh, slot) = (s.shared, s.slot);
    // SAFETY: `shared` is the queue's (freed only after the queue pair), reached by raw
    // pointer only: no reference into it is held across SPDK's calls, by `poll_each` nor by
    // `issue`, and each one here ends within its statement.
    unsafe {
        let issuing = (*sh).issuing;
        if issuing != NOT_ISSUING {
            // Completed inside a submitting call: `issue` lists its own slot when SPDK
            // returns; any other is listed here, never handed to the hook (which may be
            // running further up this stack).
            if issuing != slot {
                (*sh).done.push(Reaped::ok(slot, -1));
            }
            return;
        }
        let whole = s.fail != Fail::None || s.issued >= s.total((*sh).block_shift);
        match (*sh).hook {
            Some(h) if whole && (*sh).panic.is_none() => {
                let Some(r) = s.finish() else { return };
                (*sh).finished += 1;
                // `s` is not used past this point: the hook may submit a new operation into
                // this slot. A panic may not unwind into SPDK's C code: it is kept and
                // resumed by `poll_each` once SPDK has returned.
                // SAFETY: the hook is alive while set (`Shared::hook`); it is not running
                // now (it cannot poll, and SPDK completes nothing into it while it submits:
                // `issuing` above), so this is the only call.
                let call = std::panic::AssertUnwindSafe(|| (*h.as_ptr())(r));
                if let Err(p) = std::panic::catch_unwind(call) {
                    (*sh).panic = Some(p);
                }
            }
            // Unfinished (more pieces to send), no hook, or the hook panicked: the queue's
            // `collect` decides.
            _ => (*sh).done.push(Reaped::ok(slot, -1)),
        }
    }
}

/// One SPDK I/O queue pair, owned by one thread.
pub(crate) struct SpdkQueue {
    ctrl: Arc<SpdkCtrl>,
    qpair: NonNull<sys::spdk_nvme_qpair>,
    /// Slot contexts, from `Box::into_raw` (SPDK holds pointers into it); freed on drop.
    slots: NonNull<[Slot]>,
    /// Callbacks' output (`Reaped::ok(slot, -1)`: the slot's last command finished) and the
    /// owner's hook; from `Box::into_raw`, freed on drop.
    shared: NonNull<Shared>,
    /// Slots with work SPDK could not take yet (out of request objects).
    backlog: VecDeque<u32>,
    /// `poll_each`'s list of operations finished outside a callback (kept for its capacity).
    rest: Vec<Reaped>,
    /// Regions this queue registered (base, length): a read or write must lie in one.
    regions: Vec<(usize, usize)>,
    /// log2 of the block size (see `Shared::block_shift`).
    block_shift: u32,
    in_flight: u32,
    failed: bool,
    /// The controller's `pcie`, kept here for `poll_each`.
    pcie: bool,
}

impl SpdkQueue {
    /// A queue pair with `depth` slots, its memory `regions` registered for DMA.
    pub fn new(
        ctrl: Arc<SpdkCtrl>,
        regions: &[(*mut u8, usize, rio_sys::mem::PageKind)],
        depth: u32,
    ) -> Result<SpdkQueue> {
        let mut registered = Vec::new();
        for &(p, l, k) in regions {
            if let Err(e) = mem_register(p, l, k) {
                for (b, _) in registered {
                    mem_unregister(b);
                }
                return Err(e);
            }
            registered.push((p as usize, l));
        }
        let mut opts = sys::spdk_nvme_io_qpair_opts::default();
        // SAFETY: the controller is attached; `opts` is written with its defaults.
        unsafe {
            sys::spdk_nvme_ctrlr_get_default_io_qpair_opts(
                ctrl.ctrlr.as_ptr(),
                &mut opts,
                std::mem::size_of::<sys::spdk_nvme_io_qpair_opts>(),
            )
        };
        // Requests: enough for every slot's largest split (SPDK splits at the transfer limit),
        // so -ENOMEM stays the exception.
        let splits = (crate::MAX_IO_BYTES / ctrl.max_xfer.max(4096) as u64 + 1).min(64) as u32;
        opts.io_queue_size = opts.io_queue_size.max((depth + 1).min(1024));
        opts.io_queue_requests = opts.io_queue_requests.max(depth * splits);
        // SPDK's default: each command's doorbell rung as SPDK queues it, not once at the end
        // of the next `process_completions` (`delay_cmd_submit`, which `spdk_nvme_perf` asks
        // for). rio's handlers submit from inside SPDK's completion callback (`wait_each`), so
        // with delayed doorbells the first command of a poll's batch waits for every other
        // completion of the batch to be handled before the device hears of it; rung at once,
        // the device starts on it meanwhile. In the TCG guest, alternating in one boot (7
        // rounds, QD32): +10% IOPS over delayed doorbells (median of per-round ratios, 6 rounds
        // of 7 ahead); docs/DESIGN.md. A submission made outside a poll also reaches the
        // device without waiting for one.
        opts.__bindgen_anon_1.delay_cmd_submit = false;
        // SAFETY: as above; the options were initialised for this controller.
        let qp = unsafe {
            sys::spdk_nvme_ctrlr_alloc_io_qpair(
                ctrl.ctrlr.as_ptr(),
                &opts,
                std::mem::size_of::<sys::spdk_nvme_io_qpair_opts>(),
            )
        };
        let Some(qpair) = NonNull::new(qp) else {
            for (b, _) in registered {
                mem_unregister(b);
            }
            return Err(spdk_err(
                "spdk_nvme_ctrlr_alloc_io_qpair",
                format!(
                    "no I/O queue pair for {} (the controller's queue count is used up, or SPDK's \
                     hugepage memory is: RIO_SPDK_MEM_MB)",
                    ctrl.trid
                ),
            ));
        };
        let shared = NonNull::from(Box::leak(Box::new(Shared {
            done: Vec::with_capacity(depth as usize),
            hook: None,
            finished: 0,
            panic: None,
            issuing: NOT_ISSUING,
            block_shift: ctrl.block_size.trailing_zeros(),
        })));
        let slots: Box<[Slot]> = (0..depth)
            .map(|i| Slot {
                shared: shared.as_ptr(),
                slot: i,
                active: false,
                op: RawOp {
                    op: OpKind::Read,
                    offset: 0,
                    len: 0,
                    addr: std::ptr::null_mut(),
                    fd: -1,
                    cached: false,
                },
                issued: 0,
                outstanding: 0,
                fail: Fail::None,
            })
            .collect();
        let block_shift = ctrl.block_size.trailing_zeros();
        let pcie = ctrl.pcie;
        Ok(SpdkQueue {
            ctrl,
            qpair,
            slots: NonNull::from(Box::leak(slots)),
            shared,
            backlog: VecDeque::new(),
            rest: Vec::with_capacity(depth as usize),
            regions: registered,
            block_shift,
            in_flight: 0,
            failed: false,
            pcie,
        })
    }

    /// 1: SPDK rings the doorbell for each command as it queues it (`delay_cmd_submit` off,
    /// fixed at creation).
    pub fn submit_batch(&self) -> u32 {
        1
    }

    /// Ignored: the doorbell policy is fixed when SPDK creates the queue pair, so the report
    /// keeps saying what is in force.
    pub fn set_submit_batch(&mut self, _n: u32) {}

    /// Slot `i`'s context, derived from the array's own pointer (the pointer SPDK is given
    /// for a command, so that it stays valid however the queue reaches the slot meanwhile).
    #[inline]
    fn slot_ptr(&self, i: u32) -> *mut Slot {
        debug_assert!((i as usize) < self.slots.len());
        // SAFETY: `slots` is the live allocation made in `new`; `i` is a slot index the
        // Queue handed out (< depth), so the offset stays inside it.
        unsafe { self.slots.as_ptr().cast::<Slot>().add(i as usize) }
    }

    #[inline]
    fn slot(&mut self, i: u32) -> &mut Slot {
        // SAFETY: `slot_ptr` is in bounds and the array is live. No other reference to the
        // slot exists while this one does: SPDK's callbacks make theirs only inside
        // `process_completions` or a submitting call, and no caller of `slot` holds its
        // reference across either (`issue` uses the raw pointer).
        unsafe { &mut *self.slot_ptr(i) }
    }

    /// Whether `[addr, addr+len)` lies in memory this queue registered with SPDK.
    #[inline]
    fn covers(&self, addr: *mut u8, len: u64) -> bool {
        let (a, l) = (addr as usize, len as usize);
        self.regions
            .iter()
            .any(|&(b, bl)| a >= b && a.checked_add(l).is_some_and(|e| e <= b + bl))
    }

    #[inline]
    pub fn push(&mut self, slot: u32, op: &RawOp) -> Result<()> {
        // `op.fd` is always the target here: `Queue::submit_fd` refuses files on this backend.
        if matches!(op.op, OpKind::Read | OpKind::Write) {
            if !self.covers(op.addr, op.len) {
                // SPDK would fail it as a bad translation; refused here with the reason instead.
                return Err(unregistered(op.len));
            }
            if self.backlog.is_empty() && !self.failed {
                self.push_rw(slot, op);
                return Ok(());
            }
        }
        let s = self.slot(slot);
        s.active = true;
        s.op = *op;
        s.issued = 0;
        s.outstanding = 0;
        s.fail = Fail::None;
        self.in_flight += 1;
        if !self.backlog.is_empty() || !self.issue(slot) {
            self.backlog.push_back(slot);
        }
        Ok(())
    }

    /// `push` and `issue` for a read or write on a sound queue pair with nothing waiting (what
    /// every I/O of a storage loop is): one SPDK call (SPDK splits at the transfer limit
    /// itself), made directly rather than through a function chosen by kind (an indirect call,
    /// which an emulated CPU looks up each time), without `issue`'s loop over pieces. The same
    /// bookkeeping as `issue` for one piece.
    #[inline]
    fn push_rw(&mut self, i: u32, op: &RawOp) {
        let (ns, qp, shift) = (self.ctrl.ns.as_ptr(), self.qpair.as_ptr(), self.block_shift);
        let sh = self.shared.as_ptr();
        let sp = self.slot_ptr(i);
        let arg: *mut c_void = sp.cast();
        self.in_flight += 1;
        // SAFETY: as in `issue`: `sp` and `sh` are the queue's live allocations, reached by raw
        // pointer one statement at a time, no reference held across the SPDK call (which may
        // call `on_complete` with this slot). The SPDK call: the namespace and queue pair are
        // live, the buffer is in memory registered with SPDK (`push` checked) and held by the
        // Queue until this slot completes, `arg` outlives the command.
        unsafe {
            (*sp).active = true;
            (*sp).op = *op;
            (*sp).issued = 0;
            // Counted before SPDK sees it: SPDK may complete it inside the call.
            (*sp).outstanding = 1;
            (*sp).fail = Fail::None;
            (*sh).issuing = i;
            let (lba, blocks, buf) = (op.offset >> shift, (op.len >> shift) as u32, op.addr.cast());
            let rc = if op.op == OpKind::Read {
                sys::spdk_nvme_ns_cmd_read(ns, qp, buf, lba, blocks, Some(on_complete), arg, 0)
            } else {
                sys::spdk_nvme_ns_cmd_write(ns, qp, buf, lba, blocks, Some(on_complete), arg, 0)
            };
            (*sh).issuing = NOT_ISSUING;
            if rc == 0 {
                (*sp).issued = 1;
                if (*sp).outstanding == 0 {
                    // Completed inside the submitting call: collected by the next poll.
                    (*sh).done.push(Reaped::ok(i, -1));
                }
                return;
            }
            // Not taken: no callback will come for it.
            (*sp).outstanding = 0;
            if rc == -libc::ENOMEM {
                // Out of SPDK's request objects: sent again from the backlog.
                self.backlog.push_back(i);
                return;
            }
            (*sp).fail = Fail::Errno(-rc);
            (*sp).issued = 1;
            (*sh).done.push(Reaped::ok(i, -1));
        }
    }

    /// Hand the slot's remaining commands to SPDK. False when SPDK ran out of requests (the
    /// slot goes to the backlog).
    fn issue(&mut self, i: u32) -> bool {
        let (ns, qp, shift) = (self.ctrl.ns.as_ptr(), self.qpair.as_ptr(), self.block_shift);
        let failed = self.failed;
        let sh = self.shared.as_ptr();
        // The slot only through this pointer, one statement at a time: SPDK may call
        // `on_complete` with it inside the submitting call, which makes its own reference.
        let sp = self.slot_ptr(i);
        let arg: *mut c_void = sp.cast();
        // SAFETY: (all accesses to `*sp` and `*sh` below): both are live (the queue's own
        // allocations); each reference made from them ends within its statement, none is
        // held across an SPDK call.
        unsafe {
            (*sh).issuing = i;
            let total = (*sp).total(shift);
            let mut refused = false;
            while (*sp).issued < total {
                if failed {
                    (*sp).fail = Fail::Reset { fatal: true };
                }
                if (*sp).fail != Fail::None {
                    // Failed (the queue pair, or an earlier piece SPDK completed at once with
                    // an error): send no more.
                    (*sp).issued = total;
                    break;
                }
                let op = (*sp).op;
                let issued = (*sp).issued;
                let lba = op.offset >> shift;
                // Counted before SPDK sees it: SPDK may complete it inside the call.
                (*sp).outstanding += 1;
                // SAFETY (the SPDK calls): the namespace and queue pair are live; a read or
                // write's buffer is in memory registered with SPDK (`push` checked), held by
                // the Queue until this slot completes; `arg` is this slot's context, which
                // outlives the command; the DSM ranges are copied by SPDK before it returns.
                let (rc, step) = match op.op {
                    OpKind::Read | OpKind::Write => {
                        let cmd = if op.op == OpKind::Read {
                            sys::spdk_nvme_ns_cmd_read
                        } else {
                            sys::spdk_nvme_ns_cmd_write
                        };
                        let blocks = (op.len >> shift) as u32;
                        let buf = op.addr.cast();
                        (cmd(ns, qp, buf, lba, blocks, Some(on_complete), arg, 0), 1)
                    }
                    OpKind::Flush => (
                        sys::spdk_nvme_ns_cmd_flush(ns, qp, Some(on_complete), arg),
                        1,
                    ),
                    OpKind::WriteZeroes => {
                        let n = (total - issued).min(MAX_ZERO_BLOCKS);
                        (
                            sys::spdk_nvme_ns_cmd_write_zeroes(
                                ns,
                                qp,
                                lba + issued,
                                n as u32,
                                Some(on_complete),
                                arg,
                                0,
                            ),
                            n,
                        )
                    }
                    OpKind::Deallocate => {
                        let mut ranges = [sys::spdk_nvme_dsm_range::default(); MAX_DSM_RANGES];
                        let (mut n, mut used) = (0u64, 0usize);
                        while issued + n < total && used < MAX_DSM_RANGES {
                            let len = (total - issued - n).min(MAX_DSM_RANGE_BLOCKS);
                            ranges[used].starting_lba = lba + issued + n;
                            ranges[used].length = len as u32;
                            n += len;
                            used += 1;
                        }
                        (
                            sys::spdk_nvme_ns_cmd_dataset_management(
                                ns,
                                qp,
                                sys::spdk_nvme_dsm_attribute::SPDK_NVME_DSM_ATTR_DEALLOCATE,
                                ranges.as_ptr(),
                                used as u16,
                                Some(on_complete),
                                arg,
                            ),
                            n,
                        )
                    }
                };
                if rc != 0 {
                    // Not taken: no callback will come for it.
                    (*sp).outstanding -= 1;
                    if rc == -libc::ENOMEM {
                        refused = true;
                        break;
                    }
                    (*sp).fail = Fail::Errno(-rc);
                    (*sp).issued = total;
                    break;
                }
                (*sp).issued += step;
            }
            (*sh).issuing = NOT_ISSUING;
            if refused {
                return false;
            }
            if (*sp).outstanding == 0 {
                // Nothing in SPDK (refused, failed queue pair, or completed inside the
                // submitting call): finished now, collected by the next poll.
                (*sh).done.push(Reaped::ok(i, -1));
            }
        }
        true
    }

    /// Finish the slots whose last command completed (the callbacks' list) into `out`.
    fn collect(&mut self, out: &mut Vec<Reaped>) {
        // By index, through the raw pointer each time: `issue` below may append to the list
        // (a piece refused or completed at once, also from SPDK's callback inside the
        // submitting call), and nothing here holds a reference into it meanwhile.
        let mut k = 0;
        // SAFETY: the queue's own list (freed only in Drop); this reference ends within the
        // expression, before `issue` or anything else can reach the list.
        while let Some(i) = unsafe {
            let done = &(*self.shared.as_ptr()).done;
            done.get(k).map(|r| r.slot)
        } {
            k += 1;
            let shift = self.block_shift;
            let s = self.slot(i);
            if !s.active || s.outstanding > 0 {
                // Finished already, or a stale entry (listed when its first pieces were done,
                // a panic left it, and the backlog sent the rest meanwhile): the last
                // callback of what SPDK still holds lists it again.
                continue;
            }
            if s.issued < s.total(shift) && s.fail == Fail::None {
                // More pieces to send (Write Zeroes over 65,536 blocks).
                if !self.issue(i) {
                    self.backlog.push_back(i);
                }
                continue;
            }
            if let Some(r) = self.finish(i) {
                out.push(r);
            }
        }
        // SAFETY: as above; nothing reaches the list during this call.
        unsafe { (*self.shared.as_ptr()).done.clear() };
    }

    /// The slot's operation is over: its result, the slot free. `None` if it held nothing.
    #[inline]
    fn finish(&mut self, i: u32) -> Option<Reaped> {
        let r = self.slot(i).finish()?;
        self.in_flight -= 1;
        Some(r)
    }

    /// One poll, each finished operation handed to `hook`; those that finish in SPDK's
    /// completion callback are handed over from inside it, so the hook (through its owner,
    /// the [`crate::Queue`]) may submit at once, before SPDK writes the completion queue's
    /// head (SPDK's run-to-completion order; the doorbell is rung as SPDK queues the command).
    /// Operations finished outside a callback (refused
    /// at submission, on a failed queue pair, or after their last piece) follow, after
    /// SPDK returns.
    ///
    /// A panic in `hook` propagates: one inside SPDK's callback is caught there and resumed
    /// here after SPDK returns (what else completed meanwhile is listed for the next poll);
    /// one while handing over the rest leaves what was not handed over for the next poll.
    ///
    /// # Safety
    /// `this` returns a valid pointer to this queue each time it is called (derived anew from
    /// its owner's pointer), and no reference to the queue (nor to the `Queue` that owns it)
    /// is alive across the call other than what `hook` makes for itself. `hook` must not
    /// poll, drop, move or replace this queue (it may submit to it).
    ///
    /// Generic, so that the accessor (called a dozen times a poll) and the hook's calls from
    /// here are inlined: under an emulated CPU (QEMU's TCG) each indirect call costs a
    /// translation lookup, and a `dyn` accessor took 14% of the polling thread's samples.
    #[inline]
    pub unsafe fn poll_each<A, H>(this: &mut A, hook: &mut H)
    where
        A: FnMut() -> *mut SpdkQueue,
        H: FnMut(Reaped),
    {
        // SAFETY (all derefs below): `this()` is valid per the contract, and derived afresh for
        // each statement, because the hook's own reference to the owner (made from the same
        // origin) ends any pointer derived before it; each reference lives only within its
        // statement, never across the SPDK call or a hook call. `sh` is the queue's own
        // allocation, which the hook cannot free (the contract).
        unsafe {
            let (qp, sh) = ((*this()).qpair, (*this()).shared);
            let nested = (*sh.as_ptr()).hook.is_some();
            if !nested {
                (*this()).drain_backlog();
            }
            if (*this()).in_flight > 0 && !nested {
                // Erase the hook's lifetime: it outlives this call, and is unset before return.
                let h: NonNull<dyn FnMut(Reaped) + '_> =
                    NonNull::from(&mut *hook as &mut dyn FnMut(Reaped));
                (*sh.as_ptr()).hook = Some(std::mem::transmute::<
                    NonNull<dyn FnMut(Reaped) + '_>,
                    NonNull<dyn FnMut(Reaped)>,
                >(h));
                // On PCIe, one completion first, then the rest (when more than one operation
                // was out: a lone one, split or not, is taken whole). Measured, not derived: in
                // the TCG guest, 4K randread QD32, alternating with a single call in one boot
                // each, 0.96-1.18x IOPS in six boots (medians of per-round ratios; 1.10-1.18x in
                // the four of session 33). Traced (session 32), the backing I/O of QEMU's
                // emulated controller then takes as long as under `spdk_nvme_perf`, against
                // twice that when SPDK's one write of the completion queue's head comes at the
                // end of the batch, after the first resubmission has woken the device. The
                // cost: one more look at the completion queue, and one more head write per
                // batch. Over a fabric the doorbells are not there and a second call is a
                // second read of the socket: one call. docs/DESIGN.md.
                let first = u32::from((*this()).pcie && (*this()).in_flight > 1);
                let mut rc = sys::spdk_nvme_qpair_process_completions(qp.as_ptr(), first);
                if first == 1 && rc == 1 && (*sh.as_ptr()).panic.is_none() {
                    let more = sys::spdk_nvme_qpair_process_completions(qp.as_ptr(), 0);
                    rc = if more < 0 { more } else { rc + more };
                }
                (*sh.as_ptr()).hook = None;
                let finished = std::mem::take(&mut (*sh.as_ptr()).finished);
                (*this()).in_flight -= finished;
                (*this()).after_process(rc);
                if let Some(p) = (*sh.as_ptr()).panic.take() {
                    std::panic::resume_unwind(p);
                }
            }
            if (*this()).has_rest() {
                Self::hand_rest(this, hook);
            }
        }
    }

    /// `poll_each`'s operations finished outside a callback, handed to `hook` in order.
    /// Those not handed over when `hook` panics stay in `rest`, first for the next poll.
    ///
    /// # Safety
    /// As for `poll_each`.
    #[inline(never)]
    unsafe fn hand_rest<A, H>(this: &mut A, hook: &mut H)
    where
        A: FnMut() -> *mut SpdkQueue,
        H: FnMut(Reaped),
    {
        struct Left<'a, A: FnMut() -> *mut SpdkQueue> {
            this: &'a mut A,
            rest: Vec<Reaped>,
            handed: usize,
        }
        impl<A: FnMut() -> *mut SpdkQueue> Drop for Left<'_, A> {
            fn drop(&mut self) {
                self.rest.drain(..self.handed);
                // SAFETY: as in `poll_each`: valid, and no other reference to the queue is
                // alive (the hook has returned or unwound).
                unsafe { (*(self.this)()).rest = std::mem::take(&mut self.rest) };
            }
        }
        // SAFETY: as in `poll_each`; each reference ends within its statement.
        let rest = unsafe { std::mem::take(&mut (*this()).rest) };
        let mut left = Left {
            this,
            rest,
            handed: 0,
        };
        // SAFETY: as above.
        unsafe { (*(left.this)()).collect_rest_slow(&mut left.rest) };
        while let Some(&r) = left.rest.get(left.handed) {
            left.handed += 1;
            hook(r);
        }
    }

    /// Slots waiting for SPDK request objects: handed to SPDK now if it takes them. Inline
    /// and one test in the common case (nothing waiting): it runs at every poll.
    #[inline]
    fn drain_backlog(&mut self) {
        if !self.backlog.is_empty() {
            self.drain_backlog_slow();
        }
    }

    #[cold]
    #[inline(never)]
    fn drain_backlog_slow(&mut self) {
        while let Some(&i) = self.backlog.front() {
            if !self.issue(i) {
                break;
            }
            self.backlog.pop_front();
        }
    }

    /// What `process_completions` returned: a negative code is a failed queue pair.
    #[inline]
    fn after_process(&mut self, rc: i32) {
        if rc < 0 && !self.failed {
            self.qpair_failed(rc);
        }
    }

    #[cold]
    #[inline(never)]
    fn qpair_failed(&mut self, rc: i32) {
        // The queue pair failed (controller removed, or SPDK's reset failed): SPDK aborts
        // what it holds through the callbacks; nothing new is accepted.
        tracing::error!(trid = %self.ctrl.trid, rc, "SPDK queue pair failed");
        self.failed = true;
    }

    /// The callbacks' list into `out`; on a failed queue pair, the backlog failed too. Inline
    /// and two tests in the common case (nothing listed, the queue pair well): it runs at
    /// every poll.
    #[inline]
    fn collect_rest(&mut self, out: &mut Vec<Reaped>) {
        if self.has_rest() {
            self.collect_rest_slow(out);
        }
    }

    /// Whether `collect_rest` has anything to do.
    #[inline]
    fn has_rest(&self) -> bool {
        // SAFETY: the queue's own list, not borrowed across this read.
        let listed = unsafe { !(*self.shared.as_ptr()).done.is_empty() };
        listed || self.failed || !self.rest.is_empty()
    }

    #[inline(never)]
    fn collect_rest_slow(&mut self, out: &mut Vec<Reaped>) {
        // Left by a `poll_each` whose hook panicked: first, in order.
        out.append(&mut self.rest);
        self.collect(out);
        if self.failed {
            // Backlogged slots never reached SPDK: fail them here.
            while let Some(i) = self.backlog.pop_front() {
                let _ = self.issue(i);
            }
            self.collect(out);
        }
    }

    fn poll_once(&mut self, out: &mut Vec<Reaped>) {
        // SAFETY: the queue's own `Shared`, not borrowed across this read.
        if unsafe { (*self.shared.as_ptr()).hook.is_some() } {
            // Called from inside a `poll_each` hook. `Queue::wait_each` gives its handler a
            // `Submitter`, which cannot poll, so this is a defence, not a path: SPDK must
            // not be re-entered for this queue pair; only what is already listed is
            // collected.
            self.collect(out);
            return;
        }
        self.drain_backlog();
        if self.in_flight > 0 {
            // SAFETY: the queue pair is live and used only by this thread; callbacks touch
            // only the slot contexts and the shared list (no hook is set outside
            // `poll_each`), which nothing else borrows now.
            let rc = unsafe { sys::spdk_nvme_qpair_process_completions(self.qpair.as_ptr(), 0) };
            self.after_process(rc);
        }
        self.collect_rest(out);
    }

    pub fn reap(
        &mut self,
        want: u32,
        timeout: Option<Duration>,
        out: &mut Vec<Reaped>,
    ) -> Result<bool> {
        super::spin_reap(want, timeout, out, |out| {
            self.poll_once(out);
            Ok(self.in_flight == 0)
        })
    }

    /// The owner gives up on what is in flight: nothing to do here, as Drop keeps the queue
    /// pair, the slot contexts and the registrations whenever anything is in flight.
    pub fn abandon(&mut self) {}

    /// Stop using a region (a pool gave it back); nothing is in flight (caller's check).
    pub fn remove_region(&mut self, ptr: *mut u8) {
        if let Some(i) = self.regions.iter().position(|&(b, _)| b == ptr as usize) {
            mem_unregister(self.regions.remove(i).0);
        }
    }

    /// Register more memory for DMA (a pool that grew).
    ///
    /// # Safety
    /// The memory stays mapped and unmoved until this queue is dropped.
    pub unsafe fn add_region(
        &mut self,
        ptr: *mut u8,
        len: usize,
        kind: rio_sys::mem::PageKind,
    ) -> Result<()> {
        mem_register(ptr, len, kind)?;
        self.regions.push((ptr as usize, len));
        Ok(())
    }
}

impl Drop for SpdkQueue {
    fn drop(&mut self) {
        if self.in_flight > 0 {
            // Commands may still be in the device: keep the queue pair, the slot contexts
            // and the registrations (the Queue leaks the buffers too).
            tracing::error!(trid = %self.ctrl.trid, in_flight = self.in_flight,
                "dropping an SPDK queue pair with commands outstanding; its memory is kept");
            return;
        }
        // SAFETY: nothing is in flight (checked above), and no hook is set (`poll_each` is
        // not running: this is `&mut self`). The queue pair is freed once and not used
        // after; anything SPDK still held is completed through the callbacks, which touch
        // only the slot contexts and the list, both still alive until after that call.
        unsafe {
            sys::spdk_nvme_ctrlr_free_io_qpair(self.qpair.as_ptr());
            drop(Box::from_raw(self.slots.as_ptr()));
            drop(Box::from_raw(self.shared.as_ptr()));
        }
        for (b, _) in std::mem::take(&mut self.regions) {
            mem_unregister(b);
        }
    }
}
