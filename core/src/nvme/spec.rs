//! NVMe base specification layer (NVMe 1.4 / 2.0).
//!
//! This module contains the wire-level data structures, register layouts and
//! command encodings used by rio's userspace NVMe driver.  Layouts follow the
//! NVM Express Base Specification (revision 1.4, with the 2.0 additions that
//! rio cares about) and were cross-checked against SPDK's
//! `include/spdk/nvme_spec.h` and QEMU's `include/block/nvme.h`.
//!
//! Everything here is pure data manipulation: no MMIO, no DMA, no I/O.  The
//! structures are `#[repr(C)]`, contain only plain integers (or arrays of
//! them), have no implicit padding (checked at compile time) and are therefore
//! valid for every bit pattern.  NVMe is little-endian and these structures are
//! only used on little-endian hosts (enforced below).

#![deny(unsafe_op_in_unsafe_fn)]

use core::fmt;
use core::mem::offset_of;
use std::time::Duration;

#[cfg(not(target_endian = "little"))]
compile_error!(
    "rio's NVMe spec layer assumes a little-endian host: NVMe data structures are little-endian \
     and are accessed in place without byte swapping"
);

// ---------------------------------------------------------------------------
// Layout-checking helpers
// ---------------------------------------------------------------------------

/// Size of the field selected by `_f`. Only used in compile-time layout checks.
const fn field_size<T, F>(_f: fn(&T) -> &F) -> usize {
    size_of::<F>()
}

/// Compile-time check of a struct's full layout: total size, the offset of
/// every listed field, and that the listed fields' sizes add up to the total
/// size (i.e. the list is complete and the struct has no implicit padding,
/// which is what makes [`as_bytes`](IdentifyController::as_bytes) sound).
macro_rules! assert_layout {
    ($ty:ident, $size:expr, { $($field:ident @ $off:expr),+ $(,)? }) => {
        const _: () = {
            assert!(size_of::<$ty>() == $size, "unexpected struct size");
            $(
                assert!(
                    offset_of!($ty, $field) == $off,
                    concat!("unexpected offset of ", stringify!($ty), "::", stringify!($field))
                );
            )+
            assert!(
                0 $(+ field_size(|s: &$ty| &s.$field))+ == $size,
                concat!("field list incomplete or padding present in ", stringify!($ty))
            );
        };
    };
}

/// Implements byte-view helpers (`SIZE`, `zeroed`, `from_bytes`,
/// `from_prefix`, `as_bytes`) and `Default` for a plain-old-data structure
/// whose layout has been verified with [`assert_layout!`].
macro_rules! impl_pod {
    ($ty:ident, $size:expr) => {
        impl $ty {
            /// Size of this structure in bytes.
            pub const SIZE: usize = $size;

            /// All-zero value.
            pub const fn zeroed() -> Self {
                Self::from_bytes(&[0u8; $size])
            }

            /// Decodes the structure from its little-endian wire representation.
            pub const fn from_bytes(bytes: &[u8; $size]) -> Self {
                // SAFETY: `Self` is `#[repr(C)]`, exactly `$size` bytes long
                // (checked at compile time) and consists solely of integer
                // fields and arrays of integers, so every bit pattern is a
                // valid value. `read_unaligned` tolerates the byte array's
                // 1-byte alignment, and the source is a live reference to
                // `$size` initialised bytes.
                unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) }
            }

            /// Decodes the structure from the first `SIZE` bytes of `bytes`.
            /// Returns `None` if `bytes` is too short.
            pub fn from_prefix(bytes: &[u8]) -> Option<Self> {
                let head: &[u8; $size] = bytes.get(..$size)?.try_into().ok()?;
                Some(Self::from_bytes(head))
            }

            /// Views the structure as its little-endian wire representation.
            pub const fn as_bytes(&self) -> &[u8; $size] {
                // SAFETY: `Self` is `#[repr(C)]`, exactly `$size` bytes long
                // and has no padding (the field sizes sum to `$size`, checked
                // by `assert_layout!`), so all `$size` bytes are initialised.
                // `[u8; $size]` has alignment 1, which `self` trivially
                // satisfies, and the returned borrow is tied to `&self`, so no
                // mutable alias can exist while it is alive.
                unsafe { &*(self as *const Self).cast::<[u8; $size]>() }
            }
        }

        impl Default for $ty {
            fn default() -> Self {
                Self::zeroed()
            }
        }
    };
}

// ---------------------------------------------------------------------------
// General constants
// ---------------------------------------------------------------------------

/// NSID value addressing all namespaces / controller-global log pages.
pub const NSID_ALL: u32 = 0xFFFF_FFFF;

/// Submission queue entry size in bytes (2^6).
pub const SQE_SIZE: usize = 64;
/// Completion queue entry size in bytes (2^4).
pub const CQE_SIZE: usize = 16;
/// log2 of the submission queue entry size, for `CC.IOSQES`.
pub const IOSQES: u8 = 6;
/// log2 of the completion queue entry size, for `CC.IOCQES`.
pub const IOCQES: u8 = 4;

/// Maximum admin queue size (AQA.ASQS/ACQS are 12-bit, 0-based).
pub const ADMIN_QUEUE_MAX_ENTRIES: u32 = 4096;
/// Maximum I/O queue size (QSIZE is 16-bit, 0-based).
pub const IO_QUEUE_MAX_ENTRIES: u32 = 65536;
/// Minimum number of entries in any queue.
pub const QUEUE_MIN_ENTRIES: u32 = 2;

/// Maximum number of logical blocks in one Read/Write/Write Zeroes command
/// (NLB is a 16-bit, 0-based field).
pub const MAX_NLB: u32 = 65536;
/// Maximum number of ranges in one Dataset Management command.
pub const DSM_MAX_RANGES: u32 = 256;

/// Value written to NSSR to initiate an NVM subsystem reset ("NVMe").
pub const NSSR_RESET_VALUE: u32 = 0x4E56_4D65;

// ---------------------------------------------------------------------------
// Opcodes and command-specific constants
// ---------------------------------------------------------------------------

/// Admin command set opcodes (NVMe 1.4 §5, Figure 139; NVMe 2.0 §5).
pub mod admin_opcode {
    /// Delete I/O Submission Queue.
    pub const DELETE_IO_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_IO_SQ: u8 = 0x01;
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Delete I/O Completion Queue.
    pub const DELETE_IO_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_IO_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0A;
    /// Asynchronous Event Request.
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0C;
    /// Namespace Management.
    pub const NS_MANAGEMENT: u8 = 0x0D;
    /// Firmware Commit.
    pub const FIRMWARE_COMMIT: u8 = 0x10;
    /// Firmware Image Download.
    pub const FIRMWARE_IMAGE_DOWNLOAD: u8 = 0x11;
    /// Device Self-test.
    pub const DEVICE_SELF_TEST: u8 = 0x14;
    /// Namespace Attachment.
    pub const NS_ATTACHMENT: u8 = 0x15;
    /// Keep Alive.
    pub const KEEP_ALIVE: u8 = 0x18;
    /// Directive Send.
    pub const DIRECTIVE_SEND: u8 = 0x19;
    /// Directive Receive.
    pub const DIRECTIVE_RECEIVE: u8 = 0x1A;
    /// Virtualization Management.
    pub const VIRTUALIZATION_MANAGEMENT: u8 = 0x1C;
    /// NVMe-MI Send.
    pub const NVME_MI_SEND: u8 = 0x1D;
    /// NVMe-MI Receive.
    pub const NVME_MI_RECEIVE: u8 = 0x1E;
    /// Capacity Management (2.0).
    pub const CAPACITY_MANAGEMENT: u8 = 0x20;
    /// Lockdown (2.0).
    pub const LOCKDOWN: u8 = 0x24;
    /// Doorbell Buffer Config.
    pub const DOORBELL_BUFFER_CONFIG: u8 = 0x7C;
    /// Fabrics commands.
    pub const FABRICS: u8 = 0x7F;
    /// Format NVM.
    pub const FORMAT_NVM: u8 = 0x80;
    /// Security Send.
    pub const SECURITY_SEND: u8 = 0x81;
    /// Security Receive.
    pub const SECURITY_RECEIVE: u8 = 0x82;
    /// Sanitize.
    pub const SANITIZE: u8 = 0x84;
    /// Get LBA Status.
    pub const GET_LBA_STATUS: u8 = 0x86;
}

/// NVM command set I/O opcodes (NVMe 1.4 §6, Figure 346).
pub mod io_opcode {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Uncorrectable.
    pub const WRITE_UNCORRECTABLE: u8 = 0x04;
    /// Compare.
    pub const COMPARE: u8 = 0x05;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DATASET_MANAGEMENT: u8 = 0x09;
    /// Verify.
    pub const VERIFY: u8 = 0x0C;
    /// Reservation Register.
    pub const RESERVATION_REGISTER: u8 = 0x0D;
    /// Reservation Report.
    pub const RESERVATION_REPORT: u8 = 0x0E;
    /// Reservation Acquire.
    pub const RESERVATION_ACQUIRE: u8 = 0x11;
    /// Reservation Release.
    pub const RESERVATION_RELEASE: u8 = 0x15;
    /// Copy (2.0).
    pub const COPY: u8 = 0x19;
}

/// Human-readable name of an admin (`admin == true`) or NVM I/O opcode.
pub fn opcode_name(admin: bool, op: u8) -> &'static str {
    if admin {
        use admin_opcode::*;
        match op {
            DELETE_IO_SQ => "Delete I/O SQ",
            CREATE_IO_SQ => "Create I/O SQ",
            GET_LOG_PAGE => "Get Log Page",
            DELETE_IO_CQ => "Delete I/O CQ",
            CREATE_IO_CQ => "Create I/O CQ",
            IDENTIFY => "Identify",
            ABORT => "Abort",
            SET_FEATURES => "Set Features",
            GET_FEATURES => "Get Features",
            ASYNC_EVENT_REQUEST => "Asynchronous Event Request",
            NS_MANAGEMENT => "Namespace Management",
            FIRMWARE_COMMIT => "Firmware Commit",
            FIRMWARE_IMAGE_DOWNLOAD => "Firmware Image Download",
            DEVICE_SELF_TEST => "Device Self-test",
            NS_ATTACHMENT => "Namespace Attachment",
            KEEP_ALIVE => "Keep Alive",
            DIRECTIVE_SEND => "Directive Send",
            DIRECTIVE_RECEIVE => "Directive Receive",
            VIRTUALIZATION_MANAGEMENT => "Virtualization Management",
            NVME_MI_SEND => "NVMe-MI Send",
            NVME_MI_RECEIVE => "NVMe-MI Receive",
            CAPACITY_MANAGEMENT => "Capacity Management",
            LOCKDOWN => "Lockdown",
            DOORBELL_BUFFER_CONFIG => "Doorbell Buffer Config",
            FABRICS => "Fabrics Command",
            FORMAT_NVM => "Format NVM",
            SECURITY_SEND => "Security Send",
            SECURITY_RECEIVE => "Security Receive",
            SANITIZE => "Sanitize",
            GET_LBA_STATUS => "Get LBA Status",
            0xC0..=0xFF => "Vendor Specific Admin Command",
            _ => "Unknown Admin Command",
        }
    } else {
        use io_opcode::*;
        match op {
            FLUSH => "Flush",
            WRITE => "Write",
            READ => "Read",
            WRITE_UNCORRECTABLE => "Write Uncorrectable",
            COMPARE => "Compare",
            WRITE_ZEROES => "Write Zeroes",
            DATASET_MANAGEMENT => "Dataset Management",
            VERIFY => "Verify",
            RESERVATION_REGISTER => "Reservation Register",
            RESERVATION_REPORT => "Reservation Report",
            RESERVATION_ACQUIRE => "Reservation Acquire",
            RESERVATION_RELEASE => "Reservation Release",
            COPY => "Copy",
            0x80..=0xFF => "Vendor Specific I/O Command",
            _ => "Unknown I/O Command",
        }
    }
}

/// Identify Controller or Namespace Structure (CNS) values
/// (NVMe 1.4 §5.15, Figure 244).
pub mod cns {
    /// Identify Namespace data structure for CDW1.NSID.
    pub const NAMESPACE: u8 = 0x00;
    /// Identify Controller data structure.
    pub const CONTROLLER: u8 = 0x01;
    /// Active namespace ID list (NSIDs greater than CDW1.NSID).
    pub const ACTIVE_NS_LIST: u8 = 0x02;
    /// Namespace Identification Descriptor list.
    pub const NS_ID_DESCRIPTOR_LIST: u8 = 0x03;
}

/// Feature identifiers for Get/Set Features (NVMe 1.4 §5.21.1, Figure 271).
pub mod feature {
    /// Arbitration.
    pub const ARBITRATION: u8 = 0x01;
    /// Power Management.
    pub const POWER_MANAGEMENT: u8 = 0x02;
    /// LBA Range Type.
    pub const LBA_RANGE_TYPE: u8 = 0x03;
    /// Temperature Threshold.
    pub const TEMPERATURE_THRESHOLD: u8 = 0x04;
    /// Error Recovery.
    pub const ERROR_RECOVERY: u8 = 0x05;
    /// Volatile Write Cache.
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    /// Number of Queues.
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    /// Interrupt Coalescing.
    pub const INTERRUPT_COALESCING: u8 = 0x08;
    /// Interrupt Vector Configuration.
    pub const INTERRUPT_VECTOR_CONFIG: u8 = 0x09;
    /// Write Atomicity Normal.
    pub const WRITE_ATOMICITY: u8 = 0x0A;
    /// Asynchronous Event Configuration.
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0B;
    /// Autonomous Power State Transition.
    pub const AUTONOMOUS_POWER_STATE_TRANSITION: u8 = 0x0C;
    /// Host Memory Buffer.
    pub const HOST_MEMORY_BUFFER: u8 = 0x0D;
    /// Timestamp.
    pub const TIMESTAMP: u8 = 0x0E;
    /// Keep Alive Timer.
    pub const KEEP_ALIVE_TIMER: u8 = 0x0F;
    /// Host Controlled Thermal Management.
    pub const HOST_CONTROLLED_THERMAL_MANAGEMENT: u8 = 0x10;
    /// Non-Operational Power State Config.
    pub const NON_OPERATIONAL_POWER_STATE_CONFIG: u8 = 0x11;
    /// Host Behavior Support (512-byte data structure; byte 0 = ACRE, Advanced Command Retry
    /// Enable).
    pub const HOST_BEHAVIOR_SUPPORT: u8 = 0x16;

    /// Get Features SEL: current value.
    pub const SEL_CURRENT: u8 = 0;
    /// Get Features SEL: default value.
    pub const SEL_DEFAULT: u8 = 1;
    /// Get Features SEL: saved value.
    pub const SEL_SAVED: u8 = 2;
    /// Get Features SEL: supported capabilities.
    pub const SEL_SUPPORTED_CAPABILITIES: u8 = 3;
}

/// Log page identifiers (NVMe 1.4 §5.14.1, Figure 191).
pub mod log_page {
    /// Error Information.
    pub const ERROR_INFORMATION: u8 = 0x01;
    /// SMART / Health Information.
    pub const SMART_HEALTH: u8 = 0x02;
    /// Firmware Slot Information.
    pub const FIRMWARE_SLOT: u8 = 0x03;
    /// Changed Namespace List.
    pub const CHANGED_NS_LIST: u8 = 0x04;
    /// Commands Supported and Effects.
    pub const COMMAND_EFFECTS: u8 = 0x05;
    /// Device Self-test.
    pub const DEVICE_SELF_TEST: u8 = 0x06;
    /// Telemetry Host-Initiated.
    pub const TELEMETRY_HOST: u8 = 0x07;
    /// Telemetry Controller-Initiated.
    pub const TELEMETRY_CONTROLLER: u8 = 0x08;
}

/// Generic command status codes the driver acts on (SCT 0).
pub mod generic_status {
    /// Invalid Field in Command.
    pub const INVALID_FIELD: u8 = 0x02;
    /// Command Abort Requested.
    pub const ABORT_REQUESTED: u8 = 0x07;
}

/// Command specific status codes the driver acts on (SCT 1).
pub mod command_specific_status {
    /// Invalid Queue Identifier (Create / Delete I/O queue).
    pub const INVALID_QID: u8 = 0x01;
}

/// Dataset Management command attributes (CDW11), NVMe 1.4 Dataset
/// Management command, Figure 362.
pub mod dsm_attr {
    /// Integral Dataset for Read.
    pub const INTEGRAL_READ: u32 = 1 << 0;
    /// Integral Dataset for Write.
    pub const INTEGRAL_WRITE: u32 = 1 << 1;
    /// Deallocate (TRIM / unmap).
    pub const DEALLOCATE: u32 = 1 << 2;
}

/// Critical Warning bits of the SMART / Health log (NVMe 1.4 §5.14.1.2).
pub mod critical_warning {
    /// Available spare capacity has fallen below the threshold.
    pub const AVAILABLE_SPARE: u8 = 1 << 0;
    /// Temperature is outside the thresholds.
    pub const TEMPERATURE: u8 = 1 << 1;
    /// NVM subsystem reliability has been degraded.
    pub const RELIABILITY_DEGRADED: u8 = 1 << 2;
    /// Media has been placed in read-only mode.
    pub const READ_ONLY: u8 = 1 << 3;
    /// Volatile memory backup device has failed.
    pub const VOLATILE_BACKUP_FAILED: u8 = 1 << 4;
    /// Persistent memory region has become read-only.
    pub const PMR_READ_ONLY: u8 = 1 << 5;
}

/// Submission queue priority for Create I/O Submission Queue (only meaningful
/// with weighted round robin arbitration). NVMe 1.4 §5.4, Figure 150.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum QueuePriority {
    /// Urgent priority class.
    Urgent = 0,
    /// High priority.
    High = 1,
    /// Medium priority (the value used with round robin arbitration).
    #[default]
    Medium = 2,
    /// Low priority.
    Low = 3,
}

// ---------------------------------------------------------------------------
// Submission queue entry
// ---------------------------------------------------------------------------

/// Submission Queue Entry – Command Format (NVMe 1.4 §4.2, Figure 104/105).
///
/// A 64-byte command. `flags` holds FUSE (bits 1:0) and PSDT (bits 7:6: 0 for
/// PRPs, 1 for an SGL, see [`SubmissionEntry::with_sgl`]). The command identifier (`cid`) is filled in
/// by the queue at submission time; constructors leave it at 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubmissionEntry {
    /// CDW0 bits 7:0 – opcode.
    pub opcode: u8,
    /// CDW0 bits 15:8 – FUSE (1:0) and PSDT (7:6).
    pub flags: u8,
    /// CDW0 bits 31:16 – command identifier.
    pub cid: u16,
    /// CDW1 – namespace identifier.
    pub nsid: u32,
    /// CDW2 – command specific / reserved.
    pub cdw2: u32,
    /// CDW3 – command specific / reserved.
    pub cdw3: u32,
    /// CDW4-5 – metadata pointer.
    pub mptr: u64,
    /// CDW6-7 – PRP entry 1.
    pub prp1: u64,
    /// CDW8-9 – PRP entry 2 (or PRP list pointer).
    pub prp2: u64,
    /// CDW10 – command specific.
    pub cdw10: u32,
    /// CDW11 – command specific.
    pub cdw11: u32,
    /// CDW12 – command specific.
    pub cdw12: u32,
    /// CDW13 – command specific.
    pub cdw13: u32,
    /// CDW14 – command specific.
    pub cdw14: u32,
    /// CDW15 – command specific.
    pub cdw15: u32,
}

const _: () = assert!(size_of::<SubmissionEntry>() == SQE_SIZE);
assert_layout!(SubmissionEntry, 64, {
    opcode @ 0, flags @ 1, cid @ 2, nsid @ 4, cdw2 @ 8, cdw3 @ 12, mptr @ 16,
    prp1 @ 24, prp2 @ 32, cdw10 @ 40, cdw11 @ 44, cdw12 @ 48, cdw13 @ 52,
    cdw14 @ 56, cdw15 @ 60,
});
impl_pod!(SubmissionEntry, 64);

/// Encodes a 1-based count as the 0-based 16-bit value NVMe expects.
const fn zero_based_u16(count: u32) -> u32 {
    let v = count.saturating_sub(1);
    if v > 0xFFFF { 0xFFFF } else { v }
}

impl SubmissionEntry {
    /// CDW12 Force Unit Access bit (Read/Write).
    pub const CDW12_FUA: u32 = 1 << 30;
    /// CDW12 Limited Retry bit (Read/Write/Write Zeroes).
    pub const CDW12_LIMITED_RETRY: u32 = 1 << 31;
    /// CDW12 Deallocate bit (Write Zeroes).
    pub const CDW12_DEAC: u32 = 1 << 25;

    /// An otherwise-zero command with the given opcode.
    pub const fn new(opcode: u8) -> Self {
        let mut e = Self::zeroed();
        e.opcode = opcode;
        e
    }

    /// Sets the command identifier.
    pub const fn with_cid(mut self, cid: u16) -> Self {
        self.cid = cid;
        self
    }

    /// Sets the namespace identifier.
    pub const fn with_nsid(mut self, nsid: u32) -> Self {
        self.nsid = nsid;
        self
    }

    /// Sets the two PRP entries.
    pub const fn with_prp(mut self, prp1: u64, prp2: u64) -> Self {
        self.prp1 = prp1;
        self.prp2 = prp2;
        self
    }

    /// Sets the metadata pointer.
    pub const fn with_mptr(mut self, mptr: u64) -> Self {
        self.mptr = mptr;
        self
    }

    /// Sets the Force Unit Access bit (Read/Write).
    pub const fn with_fua(mut self) -> Self {
        self.cdw12 |= Self::CDW12_FUA;
        self
    }

    /// Sets the Limited Retry bit.
    pub const fn with_limited_retry(mut self) -> Self {
        self.cdw12 |= Self::CDW12_LIMITED_RETRY;
        self
    }

    /// FUSE field (0 = normal, 1 = fused first, 2 = fused second).
    pub const fn fuse(&self) -> u8 {
        self.flags & 0x3
    }

    /// Sets the FUSE field.
    pub const fn with_fuse(mut self, fuse: u8) -> Self {
        self.flags = (self.flags & !0x3) | (fuse & 0x3);
        self
    }

    /// PRP or SGL for Data Transfer (0 = PRPs, 1 = SGL with a contiguous metadata buffer).
    pub const fn psdt(&self) -> u8 {
        self.flags >> 6
    }

    /// Describe the data with an SGL (PSDT = 01b): `desc` becomes SGL1 in the data pointer
    /// (CDW6-9), replacing PRP1/PRP2.
    pub const fn with_sgl(mut self, desc: SglDescriptor) -> Self {
        self.flags = (self.flags & 0x3F) | 0x40;
        let (a, b) = desc.to_dptr();
        self.prp1 = a;
        self.prp2 = b;
        self
    }

    /// SGL1 of a command with PSDT 01b or 10b.
    pub const fn sgl1(&self) -> SglDescriptor {
        SglDescriptor::from_dptr(self.prp1, self.prp2)
    }

    // ----- Admin commands -------------------------------------------------

    /// Generic Identify (NVMe 1.4 §5.15): CDW10 = CNTID << 16 | CNS.
    pub const fn identify(cns: u8, nsid: u32, cntid: u16, prp1: u64) -> Self {
        let mut e = Self::new(admin_opcode::IDENTIFY);
        e.nsid = nsid;
        e.prp1 = prp1;
        e.cdw10 = (cntid as u32) << 16 | cns as u32;
        e
    }

    /// Identify Controller (CNS 01h). `prp1` points to a 4 KiB buffer.
    pub const fn identify_controller(prp1: u64) -> Self {
        Self::identify(cns::CONTROLLER, 0, 0, prp1)
    }

    /// Identify Namespace (CNS 00h) for `nsid`.
    pub const fn identify_namespace(nsid: u32, prp1: u64) -> Self {
        Self::identify(cns::NAMESPACE, nsid, 0, prp1)
    }

    /// Active Namespace ID list (CNS 02h): up to 1024 active NSIDs greater
    /// than `start_nsid`, in increasing order.
    pub const fn identify_active_ns_list(start_nsid: u32, prp1: u64) -> Self {
        Self::identify(cns::ACTIVE_NS_LIST, start_nsid, 0, prp1)
    }

    /// Create I/O Completion Queue (NVMe 1.4 §5.3).
    ///
    /// `entries` is the 1-based queue size; `contiguous` sets PC;
    /// `irq_vector` `None` means polled (IEN = 0, IV = 0).
    pub const fn create_io_cq(
        qid: u16,
        entries: u32,
        prp1: u64,
        contiguous: bool,
        irq_vector: Option<u16>,
    ) -> Self {
        let mut e = Self::new(admin_opcode::CREATE_IO_CQ);
        e.prp1 = prp1;
        e.cdw10 = zero_based_u16(entries) << 16 | qid as u32;
        let (ien, iv) = match irq_vector {
            Some(v) => (1u32, v as u32),
            None => (0, 0),
        };
        e.cdw11 = iv << 16 | ien << 1 | contiguous as u32;
        e
    }

    /// Create I/O Submission Queue (NVMe 1.4 §5.4), bound to completion
    /// queue `cqid`. `entries` is the 1-based queue size.
    pub const fn create_io_sq(
        qid: u16,
        entries: u32,
        prp1: u64,
        cqid: u16,
        contiguous: bool,
        priority: QueuePriority,
    ) -> Self {
        let mut e = Self::new(admin_opcode::CREATE_IO_SQ);
        e.prp1 = prp1;
        e.cdw10 = zero_based_u16(entries) << 16 | qid as u32;
        e.cdw11 = (cqid as u32) << 16 | (priority as u32) << 1 | contiguous as u32;
        e
    }

    /// Delete I/O Submission Queue (NVMe 1.4 §5.6).
    pub const fn delete_io_sq(qid: u16) -> Self {
        let mut e = Self::new(admin_opcode::DELETE_IO_SQ);
        e.cdw10 = qid as u32;
        e
    }

    /// Delete I/O Completion Queue (NVMe 1.4 §5.5).
    pub const fn delete_io_cq(qid: u16) -> Self {
        let mut e = Self::new(admin_opcode::DELETE_IO_CQ);
        e.cdw10 = qid as u32;
        e
    }

    /// Generic Set Features (NVMe 1.4 §5.21): CDW10 = SV << 31 | FID.
    /// Features that carry a data buffer can add it with [`with_prp`](Self::with_prp).
    pub const fn set_features(fid: u8, cdw11: u32, save: bool) -> Self {
        let mut e = Self::new(admin_opcode::SET_FEATURES);
        e.cdw10 = (save as u32) << 31 | fid as u32;
        e.cdw11 = cdw11;
        e
    }

    /// Generic Get Features (NVMe 1.4 §5.13): CDW10 = SEL << 8 | FID.
    pub const fn get_features(fid: u8, sel: u8, cdw11: u32) -> Self {
        let mut e = Self::new(admin_opcode::GET_FEATURES);
        e.cdw10 = ((sel & 0x7) as u32) << 8 | fid as u32;
        e.cdw11 = cdw11;
        e
    }

    /// Set Features – Number of Queues (FID 07h, NVMe 1.4 §5.21.1.7).
    /// `io_sqs`/`io_cqs` are 1-based requested counts; the allocated counts
    /// come back in completion DW0, see [`decode_num_queues`].
    pub const fn set_num_queues(io_sqs: u16, io_cqs: u16) -> Self {
        let cdw11 = zero_based_u16(io_cqs as u32) << 16 | zero_based_u16(io_sqs as u32);
        Self::set_features(feature::NUMBER_OF_QUEUES, cdw11, false)
    }

    /// Get Features – Number of Queues (current value).
    pub const fn get_num_queues() -> Self {
        Self::get_features(feature::NUMBER_OF_QUEUES, feature::SEL_CURRENT, 0)
    }

    /// Generic Get Log Page (NVMe 1.4 §5.14).
    ///
    /// `len` is the transfer length in bytes (rounded up to dwords and encoded
    /// 0-based as NUMDU:NUMDL), `offset` the byte offset into the log
    /// (must be dword aligned; encoded as LPOU:LPOL).
    pub const fn get_log_page(
        lid: u8,
        nsid: u32,
        len: u32,
        offset: u64,
        prp1: u64,
        prp2: u64,
    ) -> Self {
        assert!(
            offset.is_multiple_of(4),
            "log page offset must be dword aligned"
        );
        let numd = len.div_ceil(4).saturating_sub(1);
        let mut e = Self::new(admin_opcode::GET_LOG_PAGE);
        e.nsid = nsid;
        e.prp1 = prp1;
        e.prp2 = prp2;
        e.cdw10 = (numd & 0xFFFF) << 16 | lid as u32;
        e.cdw11 = numd >> 16;
        e.cdw12 = offset as u32;
        e.cdw13 = (offset >> 32) as u32;
        e
    }

    /// Get Log Page – Error Information (LID 01h) for `entries` 64-byte
    /// entries (controller-global).
    pub const fn get_error_log(entries: u32, prp1: u64, prp2: u64) -> Self {
        let len = entries.saturating_mul(ErrorLogEntry::SIZE as u32);
        Self::get_log_page(log_page::ERROR_INFORMATION, NSID_ALL, len, 0, prp1, prp2)
    }

    /// Get Log Page – SMART / Health Information (LID 02h, 512 bytes).
    /// Use [`NSID_ALL`] for the controller-wide page.
    pub const fn get_smart_log(nsid: u32, prp1: u64) -> Self {
        Self::get_log_page(
            log_page::SMART_HEALTH,
            nsid,
            SmartLog::SIZE as u32,
            0,
            prp1,
            0,
        )
    }

    /// Asynchronous Event Request (NVMe 1.4 §5.2): completes when the controller has an event
    /// to report (or is reset).
    pub const fn async_event_request() -> Self {
        Self::new(admin_opcode::ASYNC_EVENT_REQUEST)
    }

    /// Set Features – Asynchronous Event Configuration: which events the controller reports
    /// ([`aec`] bits).
    pub const fn set_async_event_config(mask: u32) -> Self {
        Self::set_features(feature::ASYNC_EVENT_CONFIG, mask, false)
    }

    /// Get Log Page – Changed Namespace List (LID 04h, 4 KiB): clears the Namespace Attribute
    /// Changed event.
    pub const fn get_changed_ns_list(prp1: u64) -> Self {
        Self::get_log_page(log_page::CHANGED_NS_LIST, NSID_ALL, 4096, 0, prp1, 0)
    }

    /// Get Log Page – Firmware Slot Information (LID 03h, 512 bytes): clears the Firmware
    /// Activation Starting event.
    pub const fn get_firmware_slot_log(prp1: u64) -> Self {
        Self::get_log_page(log_page::FIRMWARE_SLOT, NSID_ALL, 512, 0, prp1, 0)
    }

    /// Abort (NVMe 1.4 §5.1): CDW10 = CID << 16 | SQID.
    pub const fn abort(sqid: u16, cid: u16) -> Self {
        let mut e = Self::new(admin_opcode::ABORT);
        e.cdw10 = (cid as u32) << 16 | sqid as u32;
        e
    }

    /// Doorbell Buffer Config (NVMe 1.4 §5.10): PRP1 = shadow doorbell
    /// buffer, PRP2 = EventIdx buffer (each one memory page).
    pub const fn doorbell_buffer_config(shadow_doorbells: u64, event_idx: u64) -> Self {
        let mut e = Self::new(admin_opcode::DOORBELL_BUFFER_CONFIG);
        e.prp1 = shadow_doorbells;
        e.prp2 = event_idx;
        e
    }

    // ----- NVM I/O commands -----------------------------------------------

    const fn rw(opcode: u8, nsid: u32, slba: u64, nlb: u32, prp1: u64, prp2: u64) -> Self {
        debug_assert!(nlb >= 1 && nlb <= MAX_NLB, "nlb must be in 1..=65536");
        let mut e = Self::new(opcode);
        e.nsid = nsid;
        e.prp1 = prp1;
        e.prp2 = prp2;
        e.cdw10 = slba as u32;
        e.cdw11 = (slba >> 32) as u32;
        e.cdw12 = zero_based_u16(nlb);
        e
    }

    /// Read (NVM command set): SLBA in CDW10/11, `nlb` (1-based block count)
    /// encoded 0-based in CDW12 bits 15:0.
    pub const fn read(nsid: u32, slba: u64, nlb: u32, prp1: u64, prp2: u64) -> Self {
        Self::rw(io_opcode::READ, nsid, slba, nlb, prp1, prp2)
    }

    /// Write (NVM command set); same encoding as [`read`](Self::read).
    pub const fn write(nsid: u32, slba: u64, nlb: u32, prp1: u64, prp2: u64) -> Self {
        Self::rw(io_opcode::WRITE, nsid, slba, nlb, prp1, prp2)
    }

    /// Flush (NVM command set).
    pub const fn flush(nsid: u32) -> Self {
        Self::new(io_opcode::FLUSH).with_nsid(nsid)
    }

    /// Write Zeroes (opcode 08h). `deallocate` sets DEAC (CDW12 bit 25).
    pub const fn write_zeroes(nsid: u32, slba: u64, nlb: u32, deallocate: bool) -> Self {
        let mut e = Self::rw(io_opcode::WRITE_ZEROES, nsid, slba, nlb, 0, 0);
        if deallocate {
            e.cdw12 |= Self::CDW12_DEAC;
        }
        e
    }

    /// Dataset Management (opcode 09h). `ranges` is the 1-based number of
    /// [`DsmRange`]s in the buffer at `prp1` (NR encoded 0-based in CDW10
    /// bits 7:0); `attributes` is a combination of [`dsm_attr`] bits.
    pub const fn dataset_management(nsid: u32, ranges: u32, attributes: u32, prp1: u64) -> Self {
        debug_assert!(
            ranges >= 1 && ranges <= DSM_MAX_RANGES,
            "ranges must be in 1..=256"
        );
        let nr = ranges.saturating_sub(1);
        let mut e = Self::new(io_opcode::DATASET_MANAGEMENT);
        e.nsid = nsid;
        e.prp1 = prp1;
        e.cdw10 = if nr > 0xFF { 0xFF } else { nr };
        e.cdw11 = attributes;
        e
    }

    /// Dataset Management with the Deallocate attribute (TRIM).
    pub const fn deallocate(nsid: u32, ranges: u32, prp1: u64) -> Self {
        Self::dataset_management(nsid, ranges, dsm_attr::DEALLOCATE, prp1)
    }
}

/// Decodes the completion DW0 of Set/Get Features – Number of Queues into
/// the 1-based `(io_sqs_allocated, io_cqs_allocated)`.
pub const fn decode_num_queues(dw0: u32) -> (u32, u32) {
    ((dw0 & 0xFFFF) + 1, (dw0 >> 16) + 1)
}

/// Dataset Management range definition (NVMe 1.4 Dataset Management command,
/// Figure 364). 16 bytes; `nlb` is a 1-based length in logical blocks.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DsmRange {
    /// Context attributes.
    pub context_attributes: u32,
    /// Length in logical blocks (NOT 0-based).
    pub nlb: u32,
    /// Starting LBA.
    pub slba: u64,
}

assert_layout!(DsmRange, 16, { context_attributes @ 0, nlb @ 4, slba @ 8 });
impl_pod!(DsmRange, 16);

impl DsmRange {
    /// A range of `nlb` blocks starting at `slba` with no context attributes.
    pub const fn new(slba: u64, nlb: u32) -> Self {
        DsmRange {
            context_attributes: 0,
            nlb,
            slba,
        }
    }
}

// ---------------------------------------------------------------------------
// Completion queue entry and status
// ---------------------------------------------------------------------------

/// Completion Queue Entry (NVMe 1.4 §4.6, Figure 121).
///
/// `status` is the raw upper half of DW3: bit 0 is the Phase Tag and bits
/// 15:1 the Status Field; use [`phase`](Self::phase) and
/// [`status`](Self::status) (the method) to decode it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompletionEntry {
    /// DW0 – command specific result.
    pub dw0: u32,
    /// DW1 – command specific / reserved.
    pub dw1: u32,
    /// DW2 bits 15:0 – SQ head pointer.
    pub sq_head: u16,
    /// DW2 bits 31:16 – SQ identifier.
    pub sq_id: u16,
    /// DW3 bits 15:0 – command identifier.
    pub cid: u16,
    /// DW3 bits 31:16 – phase tag (bit 0) and status field (bits 15:1).
    pub status: u16,
}

const _: () = assert!(size_of::<CompletionEntry>() == CQE_SIZE);
assert_layout!(CompletionEntry, 16, {
    dw0 @ 0, dw1 @ 4, sq_head @ 8, sq_id @ 10, cid @ 12, status @ 14,
});
impl_pod!(CompletionEntry, 16);

impl CompletionEntry {
    /// Phase Tag bit.
    pub const fn phase(&self) -> bool {
        self.status & 1 != 0
    }

    /// Decoded Status Field (phase tag excluded).
    pub const fn status(&self) -> Status {
        Status::from_cqe_status(self.status)
    }

    /// `Ok(dw0)` on success, otherwise an [`NvmeError`] naming the command.
    pub const fn into_result(&self, admin: bool, opcode: u8) -> Result<u32, NvmeError> {
        let status = self.status();
        if status.is_success() {
            Ok(self.dw0)
        } else {
            Err(NvmeError::new(admin, opcode, status))
        }
    }
}

/// Status Code Type (NVMe 1.4 §4.6.1.1, Figure 125).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StatusCodeType {
    /// 0h – Generic Command Status.
    Generic,
    /// 1h – Command Specific Status.
    CommandSpecific,
    /// 2h – Media and Data Integrity Errors.
    MediaDataIntegrity,
    /// 3h – Path Related Status.
    PathRelated,
    /// 7h – Vendor Specific.
    VendorSpecific,
    /// 4h-6h – reserved.
    Reserved(u8),
}

impl StatusCodeType {
    /// Decodes a 3-bit SCT value.
    pub const fn from_raw(sct: u8) -> Self {
        match sct & 0x7 {
            0 => Self::Generic,
            1 => Self::CommandSpecific,
            2 => Self::MediaDataIntegrity,
            3 => Self::PathRelated,
            7 => Self::VendorSpecific,
            other => Self::Reserved(other),
        }
    }

    /// The 3-bit SCT value.
    pub const fn raw(self) -> u8 {
        match self {
            Self::Generic => 0,
            Self::CommandSpecific => 1,
            Self::MediaDataIntegrity => 2,
            Self::PathRelated => 3,
            Self::VendorSpecific => 7,
            Self::Reserved(v) => v & 0x7,
        }
    }
}

impl fmt::Display for StatusCodeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Generic => f.write_str("Generic"),
            Self::CommandSpecific => f.write_str("Command Specific"),
            Self::MediaDataIntegrity => f.write_str("Media and Data Integrity"),
            Self::PathRelated => f.write_str("Path Related"),
            Self::VendorSpecific => f.write_str("Vendor Specific"),
            Self::Reserved(v) => write!(f, "Reserved SCT {v:#x}"),
        }
    }
}

/// Status Field of a completion (NVMe 1.4 §4.6.1, Figure 124), without the
/// phase tag.
///
/// Internal layout (the CQE DW3 bits 31:17 shifted down by 17):
/// SC bits 7:0, SCT bits 10:8, CRD bits 12:11, More bit 13, DNR bit 14.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Status(u16);

impl Status {
    /// Successful completion.
    pub const SUCCESS: Status = Status(0);

    /// Decodes the raw upper half of CQE DW3 (phase tag in bit 0 is dropped).
    pub const fn from_cqe_status(raw: u16) -> Self {
        Status(raw >> 1)
    }

    /// Builds a status from SCT and SC.
    pub const fn new(sct: u8, sc: u8) -> Self {
        Status(((sct & 0x7) as u16) << 8 | sc as u16)
    }

    /// Returns `self` with DNR set or cleared.
    pub const fn with_dnr(self, dnr: bool) -> Self {
        Status((self.0 & !(1 << 14)) | (dnr as u16) << 14)
    }

    /// Returns `self` with More set or cleared.
    pub const fn with_more(self, more: bool) -> Self {
        Status((self.0 & !(1 << 13)) | (more as u16) << 13)
    }

    /// Returns `self` with the Command Retry Delay index set (0-3).
    pub const fn with_crd(self, crd: u8) -> Self {
        Status((self.0 & !(0x3 << 11)) | ((crd & 0x3) as u16) << 11)
    }

    /// Raw 15-bit status field value (no phase tag).
    pub const fn raw(self) -> u16 {
        self.0
    }

    /// Encodes as the upper half of CQE DW3 with the given phase tag.
    pub const fn to_cqe_status(self, phase: bool) -> u16 {
        self.0 << 1 | phase as u16
    }

    /// Status Code.
    pub const fn sc(self) -> u8 {
        self.0 as u8
    }

    /// Raw Status Code Type (3 bits).
    pub const fn sct_raw(self) -> u8 {
        ((self.0 >> 8) & 0x7) as u8
    }

    /// Status Code Type.
    pub const fn sct(self) -> StatusCodeType {
        StatusCodeType::from_raw(self.sct_raw())
    }

    /// Command Retry Delay index (0 = none, 1-3 select CRDT1-3).
    pub const fn crd(self) -> u8 {
        ((self.0 >> 11) & 0x3) as u8
    }

    /// More: additional information is available in the Error log.
    pub const fn more(self) -> bool {
        self.0 & (1 << 13) != 0
    }

    /// Do Not Retry.
    pub const fn dnr(self) -> bool {
        self.0 & (1 << 14) != 0
    }

    /// `true` for Generic / Successful Completion.
    pub const fn is_success(self) -> bool {
        self.sct_raw() == 0 && self.sc() == 0
    }

    /// Human-readable description of SCT/SC.
    pub const fn description(self) -> &'static str {
        status_description(self.sct(), self.sc())
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} (sct={:#x} sc={:#04x}",
            self.sct(),
            self.description(),
            self.sct_raw(),
            self.sc()
        )?;
        if self.crd() != 0 {
            write!(f, ", crd={}", self.crd())?;
        }
        if self.more() {
            f.write_str(", more")?;
        }
        if self.dnr() {
            f.write_str(", dnr")?;
        }
        f.write_str(")")
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Status({self})")
    }
}

/// Describes a status code (NVMe 1.4 §4.6.1.2, Figures 126-130).
pub const fn status_description(sct: StatusCodeType, sc: u8) -> &'static str {
    match sct {
        StatusCodeType::Generic => match sc {
            0x00 => "Successful Completion",
            0x01 => "Invalid Command Opcode",
            0x02 => "Invalid Field in Command",
            0x03 => "Command ID Conflict",
            0x04 => "Data Transfer Error",
            0x05 => "Commands Aborted due to Power Loss Notification",
            0x06 => "Internal Error",
            0x07 => "Command Abort Requested",
            0x08 => "Command Aborted due to SQ Deletion",
            0x09 => "Command Aborted due to Failed Fused Command",
            0x0A => "Command Aborted due to Missing Fused Command",
            0x0B => "Invalid Namespace or Format",
            0x0C => "Command Sequence Error",
            0x0D => "Invalid SGL Segment Descriptor",
            0x0E => "Invalid Number of SGL Descriptors",
            0x0F => "Data SGL Length Invalid",
            0x10 => "Metadata SGL Length Invalid",
            0x11 => "SGL Descriptor Type Invalid",
            0x12 => "Invalid Use of Controller Memory Buffer",
            0x13 => "PRP Offset Invalid",
            0x14 => "Atomic Write Unit Exceeded",
            0x15 => "Operation Denied",
            0x16 => "SGL Offset Invalid",
            0x18 => "Host Identifier Inconsistent Format",
            0x19 => "Keep Alive Timer Expired",
            0x1A => "Keep Alive Timeout Invalid",
            0x1B => "Command Aborted due to Preempt and Abort",
            0x1C => "Sanitize Failed",
            0x1D => "Sanitize In Progress",
            0x1E => "SGL Data Block Granularity Invalid",
            0x1F => "Command Not Supported for Queue in CMB",
            0x20 => "Namespace is Write Protected",
            0x21 => "Command Interrupted",
            0x22 => "Transient Transport Error",
            0x23 => "Command Prohibited by Command and Feature Lockdown",
            0x24 => "Admin Command Media Not Ready",
            0x80 => "LBA Out of Range",
            0x81 => "Capacity Exceeded",
            0x82 => "Namespace Not Ready",
            0x83 => "Reservation Conflict",
            0x84 => "Format In Progress",
            0xC0..=0xFF => "Vendor Specific",
            _ => "Unknown Generic Status",
        },
        StatusCodeType::CommandSpecific => match sc {
            0x00 => "Completion Queue Invalid",
            0x01 => "Invalid Queue Identifier",
            0x02 => "Invalid Queue Size",
            0x03 => "Abort Command Limit Exceeded",
            0x05 => "Asynchronous Event Request Limit Exceeded",
            0x06 => "Invalid Firmware Slot",
            0x07 => "Invalid Firmware Image",
            0x08 => "Invalid Interrupt Vector",
            0x09 => "Invalid Log Page",
            0x0A => "Invalid Format",
            0x0B => "Firmware Activation Requires Conventional Reset",
            0x0C => "Invalid Queue Deletion",
            0x0D => "Feature Identifier Not Saveable",
            0x0E => "Feature Not Changeable",
            0x0F => "Feature Not Namespace Specific",
            0x10 => "Firmware Activation Requires NVM Subsystem Reset",
            0x11 => "Firmware Activation Requires Controller Level Reset",
            0x12 => "Firmware Activation Requires Maximum Time Violation",
            0x13 => "Firmware Activation Prohibited",
            0x14 => "Overlapping Range",
            0x15 => "Namespace Insufficient Capacity",
            0x16 => "Namespace Identifier Unavailable",
            0x18 => "Namespace Already Attached",
            0x19 => "Namespace Is Private",
            0x1A => "Namespace Not Attached",
            0x1B => "Thin Provisioning Not Supported",
            0x1C => "Controller List Invalid",
            0x1D => "Device Self-test In Progress",
            0x1E => "Boot Partition Write Prohibited",
            0x1F => "Invalid Controller Identifier",
            0x20 => "Invalid Secondary Controller State",
            0x21 => "Invalid Number of Controller Resources",
            0x22 => "Invalid Resource Identifier",
            0x23 => "Sanitize Prohibited While Persistent Memory Region is Enabled",
            0x24 => "ANA Group Identifier Invalid",
            0x25 => "ANA Attach Failed",
            0x80 => "Conflicting Attributes",
            0x81 => "Invalid Protection Information",
            0x82 => "Attempted Write to Read Only Range",
            0x83 => "Command Size Limit Exceeded",
            0xC0..=0xFF => "Vendor Specific",
            _ => "Unknown Command Specific Status",
        },
        StatusCodeType::MediaDataIntegrity => match sc {
            0x80 => "Write Fault",
            0x81 => "Unrecovered Read Error",
            0x82 => "End-to-end Guard Check Error",
            0x83 => "End-to-end Application Tag Check Error",
            0x84 => "End-to-end Reference Tag Check Error",
            0x85 => "Compare Failure",
            0x86 => "Access Denied",
            0x87 => "Deallocated or Unwritten Logical Block",
            0x88 => "End-to-end Storage Tag Check Error",
            0xC0..=0xFF => "Vendor Specific",
            _ => "Unknown Media Error",
        },
        StatusCodeType::PathRelated => match sc {
            0x00 => "Internal Path Error",
            0x01 => "Asymmetric Access Persistent Loss",
            0x02 => "Asymmetric Access Inaccessible",
            0x03 => "Asymmetric Access Transition",
            0x60 => "Controller Pathing Error",
            0x70 => "Host Pathing Error",
            0x71 => "Command Aborted By Host",
            0xC0..=0xFF => "Vendor Specific",
            _ => "Unknown Path Related Status",
        },
        StatusCodeType::VendorSpecific => "Vendor Specific",
        StatusCodeType::Reserved(_) => "Reserved",
    }
}

/// A command that completed with a non-success status.
///
/// Displays as e.g.
/// `NVMe Read failed: Generic/LBA Out of Range (sct=0x0 sc=0x80, dnr)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NvmeError {
    /// Whether `opcode` is an admin opcode (else an NVM I/O opcode).
    pub admin: bool,
    /// Opcode of the failed command.
    pub opcode: u8,
    /// Completion status.
    pub status: Status,
}

impl NvmeError {
    /// Creates an error for the given command and status.
    pub const fn new(admin: bool, opcode: u8, status: Status) -> Self {
        NvmeError {
            admin,
            opcode,
            status,
        }
    }

    /// Name of the failed command, e.g. `"Read"`.
    pub fn command_name(&self) -> &'static str {
        opcode_name(self.admin, self.opcode)
    }

    /// `true` if the controller allows the command to be retried (DNR clear).
    pub const fn is_retryable(&self) -> bool {
        !self.status.dnr()
    }
}

impl fmt::Display for NvmeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NVMe {} failed: {}", self.command_name(), self.status)
    }
}

impl std::error::Error for NvmeError {}

// ---------------------------------------------------------------------------
// Scatter gather lists
// ---------------------------------------------------------------------------

/// SGL descriptor types (NVMe 1.4 §4.4, Figure 114), the high nibble of the identifier byte.
pub mod sgl_type {
    /// A contiguous data buffer.
    pub const DATA_BLOCK: u8 = 0x0;
    /// Data the controller discards (reads) or does not transfer.
    pub const BIT_BUCKET: u8 = 0x1;
    /// Points at the next segment of descriptors; more segments follow it.
    pub const SEGMENT: u8 = 0x2;
    /// Points at the last segment of descriptors.
    pub const LAST_SEGMENT: u8 = 0x3;
}

/// One SGL descriptor (NVMe 1.4 §4.4, Figure 112): 16 bytes, address, length, identifier
/// (type in bits 7:4, subtype in bits 3:0; subtype 0 = address).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SglDescriptor {
    /// Address of the data (Data Block) or of the next segment.
    pub addr: u64,
    /// Length in bytes of the data, or of the next segment (a multiple of 16).
    pub len: u32,
    /// Reserved.
    pub rsvd: [u8; 3],
    /// SGL identifier: type << 4 | subtype.
    pub id: u8,
}

assert_layout!(SglDescriptor, 16, { addr @ 0, len @ 8, rsvd @ 12, id @ 15 });
impl_pod!(SglDescriptor, 16);

impl SglDescriptor {
    /// Bytes per descriptor.
    pub const BYTES: usize = 16;

    const fn with(kind: u8, addr: u64, len: u32) -> Self {
        SglDescriptor {
            addr,
            len,
            rsvd: [0; 3],
            id: kind << 4,
        }
    }

    /// A Data Block descriptor: `len` bytes at `addr`.
    pub const fn data_block(addr: u64, len: u32) -> Self {
        Self::with(sgl_type::DATA_BLOCK, addr, len)
    }

    /// A Segment descriptor: `count` descriptors at `addr`, more segments after them.
    pub const fn segment(addr: u64, count: u32) -> Self {
        Self::with(sgl_type::SEGMENT, addr, count * 16)
    }

    /// A Last Segment descriptor: `count` descriptors at `addr`, the last of the list.
    pub const fn last_segment(addr: u64, count: u32) -> Self {
        Self::with(sgl_type::LAST_SEGMENT, addr, count * 16)
    }

    /// Descriptor type ([`sgl_type`]).
    pub const fn kind(&self) -> u8 {
        self.id >> 4
    }

    /// Descriptor subtype (0: address).
    pub const fn subtype(&self) -> u8 {
        self.id & 0xF
    }

    /// The two quadwords of a command's data pointer.
    pub const fn to_dptr(self) -> (u64, u64) {
        let hi = self.len as u64
            | (self.rsvd[0] as u64) << 32
            | (self.rsvd[1] as u64) << 40
            | (self.rsvd[2] as u64) << 48
            | (self.id as u64) << 56;
        (self.addr, hi)
    }

    /// The descriptor held in a command's data pointer.
    pub const fn from_dptr(lo: u64, hi: u64) -> Self {
        SglDescriptor {
            addr: lo,
            len: hi as u32,
            rsvd: [(hi >> 32) as u8, (hi >> 40) as u8, (hi >> 48) as u8],
            id: (hi >> 56) as u8,
        }
    }
}

// ---------------------------------------------------------------------------
// Asynchronous events
// ---------------------------------------------------------------------------

/// Asynchronous Event Type (completion dword 0 bits 2:0, NVMe 1.4 §5.2.1).
pub mod async_event_type {
    /// Error status (a general error not tied to a command).
    pub const ERROR: u8 = 0;
    /// SMART / Health status (a critical warning was raised).
    pub const SMART_HEALTH: u8 = 1;
    /// Notice (namespace attributes changed, firmware activation starting, ...).
    pub const NOTICE: u8 = 2;
    /// I/O command set specific status.
    pub const IO_COMMAND_SET: u8 = 6;
    /// Vendor specific.
    pub const VENDOR: u8 = 7;
}

/// Asynchronous Event Information for notices (dword 0 bits 15:8 when the type is
/// [`async_event_type::NOTICE`]).
pub mod async_event_notice {
    /// Namespace Attribute Changed: read the Changed Namespace List log.
    pub const NS_ATTRIBUTE_CHANGED: u8 = 0x00;
    /// Firmware Activation Starting: read the Firmware Slot Information log.
    pub const FIRMWARE_ACTIVATION_STARTING: u8 = 0x01;
    /// Telemetry Log Changed.
    pub const TELEMETRY_LOG_CHANGED: u8 = 0x02;
}

/// Asynchronous Event Configuration bits (Set Features 0Bh, CDW11).
pub mod aec {
    /// Every SMART / Health critical warning (bits 7:0).
    pub const CRITICAL_WARNINGS: u32 = 0xFF;
    /// Namespace Attribute Notices.
    pub const NS_ATTRIBUTE: u32 = 1 << 8;
    /// Firmware Activation Notices.
    pub const FIRMWARE_ACTIVATION: u32 = 1 << 9;
}

/// An asynchronous event, as the completion of an Asynchronous Event Request reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AsyncEvent {
    /// [`async_event_type`].
    pub kind: u8,
    /// Asynchronous Event Information (e.g. [`async_event_notice`], or the critical
    /// warning bit number for SMART events).
    pub info: u8,
    /// The log page to read to clear the event.
    pub log_page: u8,
}

impl AsyncEvent {
    /// Decodes completion dword 0.
    pub const fn from_dw0(dw0: u32) -> Self {
        AsyncEvent {
            kind: (dw0 & 0x7) as u8,
            info: (dw0 >> 8) as u8,
            log_page: (dw0 >> 16) as u8,
        }
    }

    /// Encodes completion dword 0.
    pub const fn to_dw0(self) -> u32 {
        (self.kind as u32 & 0x7) | (self.info as u32) << 8 | (self.log_page as u32) << 16
    }

    /// A short name, for logs and telemetry.
    pub const fn name(&self) -> &'static str {
        match (self.kind, self.info) {
            (async_event_type::NOTICE, async_event_notice::NS_ATTRIBUTE_CHANGED) => {
                "namespace attribute changed"
            }
            (async_event_type::NOTICE, async_event_notice::FIRMWARE_ACTIVATION_STARTING) => {
                "firmware activation starting"
            }
            (async_event_type::NOTICE, async_event_notice::TELEMETRY_LOG_CHANGED) => {
                "telemetry log changed"
            }
            (async_event_type::NOTICE, _) => "notice",
            (async_event_type::SMART_HEALTH, _) => "SMART/health warning",
            (async_event_type::ERROR, _) => "error",
            (async_event_type::IO_COMMAND_SET, _) => "I/O command set event",
            (async_event_type::VENDOR, _) => "vendor event",
            _ => "reserved event type",
        }
    }
}

// ---------------------------------------------------------------------------
// Controller registers
// ---------------------------------------------------------------------------

/// Controller register offsets in BAR0 (NVMe 1.4 §3.1, Figure 78).
pub mod reg {
    /// Controller Capabilities (64-bit).
    pub const CAP: usize = 0x00;
    /// Version.
    pub const VS: usize = 0x08;
    /// Interrupt Mask Set.
    pub const INTMS: usize = 0x0C;
    /// Interrupt Mask Clear.
    pub const INTMC: usize = 0x10;
    /// Controller Configuration.
    pub const CC: usize = 0x14;
    /// Controller Status.
    pub const CSTS: usize = 0x1C;
    /// NVM Subsystem Reset.
    pub const NSSR: usize = 0x20;
    /// Admin Queue Attributes.
    pub const AQA: usize = 0x24;
    /// Admin Submission Queue Base Address (64-bit).
    pub const ASQ: usize = 0x28;
    /// Admin Completion Queue Base Address (64-bit).
    pub const ACQ: usize = 0x30;
    /// Controller Memory Buffer Location.
    pub const CMBLOC: usize = 0x38;
    /// Controller Memory Buffer Size.
    pub const CMBSZ: usize = 0x3C;
    /// Boot Partition Information.
    pub const BPINFO: usize = 0x40;
    /// Boot Partition Read Select.
    pub const BPRSEL: usize = 0x44;
    /// Boot Partition Memory Buffer Location (64-bit).
    pub const BPMBL: usize = 0x48;
    /// Start of the doorbell registers.
    pub const DOORBELL_BASE: usize = 0x1000;
}

/// Offset of the Submission Queue `qid` Tail Doorbell (NVMe 1.4 §3.1.24):
/// `0x1000 + (2 * qid) * (4 << dstrd)`.
pub const fn sq_tail_doorbell(qid: u16, dstrd: u8) -> usize {
    reg::DOORBELL_BASE + (2 * qid as usize) * (4usize << dstrd)
}

/// Offset of the Completion Queue `qid` Head Doorbell (NVMe 1.4 §3.1.25):
/// `0x1000 + (2 * qid + 1) * (4 << dstrd)`.
pub const fn cq_head_doorbell(qid: u16, dstrd: u8) -> usize {
    reg::DOORBELL_BASE + (2 * qid as usize + 1) * (4usize << dstrd)
}

/// Index (in `u32` units) of queue `qid`'s SQ tail slot in the shadow
/// doorbell / EventIdx buffers of Doorbell Buffer Config (NVMe 1.4 §5.10).
/// The buffers mirror the doorbell register layout starting at 0x1000.
pub const fn shadow_sq_tail_index(qid: u16, dstrd: u8) -> usize {
    (sq_tail_doorbell(qid, dstrd) - reg::DOORBELL_BASE) / 4
}

/// Index (in `u32` units) of queue `qid`'s CQ head slot in the shadow
/// doorbell / EventIdx buffers.
pub const fn shadow_cq_head_index(qid: u16, dstrd: u8) -> usize {
    (cq_head_doorbell(qid, dstrd) - reg::DOORBELL_BASE) / 4
}

/// With shadow doorbells: whether moving a doorbell value from `old` to
/// `new` crossed the controller's `event_idx`, i.e. whether the real MMIO
/// doorbell must be written. All arithmetic is modulo 2^16.
pub const fn shadow_doorbell_need_event(event_idx: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event_idx).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Controller Capabilities register, CAP (NVMe 1.4 §3.1.1, Figure 79).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Cap(pub u64);

impl Cap {
    /// CAP.AMS bit: weighted round robin with urgent priority supported.
    pub const AMS_WRR: u8 = 1 << 0;
    /// CAP.AMS bit: vendor specific arbitration supported.
    pub const AMS_VENDOR: u8 = 1 << 1;
    /// CAP.CSS bit: NVM command set supported.
    pub const CSS_NVM: u8 = 1 << 0;
    /// CAP.CSS bit: one or more I/O command sets supported (2.0).
    pub const CSS_IO_COMMAND_SETS: u8 = 1 << 6;
    /// CAP.CSS bit: no I/O command set (admin only) supported (2.0).
    pub const CSS_NO_IO: u8 = 1 << 7;

    /// MQES: maximum individual queue size, **0-based** (bits 15:0).
    pub const fn mqes(self) -> u16 {
        self.0 as u16
    }

    /// Maximum queue entries as a 1-based count (`mqes + 1`).
    pub const fn max_queue_entries(self) -> u32 {
        self.mqes() as u32 + 1
    }

    /// CQR: contiguous queues required (bit 16).
    pub const fn cqr(self) -> bool {
        (self.0 >> 16) & 1 != 0
    }

    /// AMS: arbitration mechanisms supported (bits 18:17).
    pub const fn ams(self) -> u8 {
        ((self.0 >> 17) & 0x3) as u8
    }

    /// TO: worst-case ready transition time in 500 ms units (bits 31:24).
    pub const fn to(self) -> u8 {
        (self.0 >> 24) as u8
    }

    /// TO as a [`Duration`] (`to * 500 ms`).
    pub const fn timeout(self) -> Duration {
        Duration::from_millis(self.to() as u64 * 500)
    }

    /// DSTRD: doorbell stride exponent (bits 35:32); stride = 4 << DSTRD bytes.
    pub const fn dstrd(self) -> u8 {
        ((self.0 >> 32) & 0xF) as u8
    }

    /// Doorbell stride in bytes (`4 << dstrd`).
    pub const fn doorbell_stride_bytes(self) -> u32 {
        4 << self.dstrd()
    }

    /// NSSRS: NVM subsystem reset supported (bit 36).
    pub const fn nssrs(self) -> bool {
        (self.0 >> 36) & 1 != 0
    }

    /// CSS: command sets supported (bits 44:37).
    pub const fn css(self) -> u8 {
        (self.0 >> 37) as u8
    }

    /// Whether the NVM command set is supported.
    pub const fn supports_nvm_command_set(self) -> bool {
        self.css() & Self::CSS_NVM != 0
    }

    /// BPS: boot partition support (bit 45).
    pub const fn bps(self) -> bool {
        (self.0 >> 45) & 1 != 0
    }

    /// MPSMIN: minimum memory page size exponent (bits 51:48).
    pub const fn mpsmin(self) -> u8 {
        ((self.0 >> 48) & 0xF) as u8
    }

    /// MPSMAX: maximum memory page size exponent (bits 55:52).
    pub const fn mpsmax(self) -> u8 {
        ((self.0 >> 52) & 0xF) as u8
    }

    /// Minimum memory page size in bytes (`2^(12 + MPSMIN)`).
    pub const fn min_page_size(self) -> u64 {
        1 << (12 + self.mpsmin() as u32)
    }

    /// Maximum memory page size in bytes (`2^(12 + MPSMAX)`).
    pub const fn max_page_size(self) -> u64 {
        1 << (12 + self.mpsmax() as u32)
    }

    /// PMRS: persistent memory region supported (bit 56).
    pub const fn pmrs(self) -> bool {
        (self.0 >> 56) & 1 != 0
    }

    /// CMBS: controller memory buffer supported (bit 57).
    pub const fn cmbs(self) -> bool {
        (self.0 >> 57) & 1 != 0
    }
}

/// Controller Configuration register, CC (NVMe 1.4 §3.1.5, Figure 82).
///
/// Builder-style: `Cc::nvm_default(0).with_enable(true)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Cc(pub u32);

impl Cc {
    /// CSS: NVM command set.
    pub const CSS_NVM: u8 = 0;
    /// CSS: all supported I/O command sets (2.0).
    pub const CSS_ALL_IO: u8 = 6;
    /// CSS: admin command set only.
    pub const CSS_ADMIN_ONLY: u8 = 7;
    /// AMS: round robin.
    pub const AMS_RR: u8 = 0;
    /// AMS: weighted round robin with urgent priority class.
    pub const AMS_WRR: u8 = 1;
    /// AMS: vendor specific.
    pub const AMS_VENDOR: u8 = 7;
    /// SHN: no notification.
    pub const SHN_NONE: u8 = 0;
    /// SHN: normal shutdown notification.
    pub const SHN_NORMAL: u8 = 1;
    /// SHN: abrupt shutdown notification.
    pub const SHN_ABRUPT: u8 = 2;

    /// All-zero CC.
    pub const fn new() -> Self {
        Cc(0)
    }

    /// CC for the NVM command set with round robin arbitration, memory page
    /// size `2^(12 + mps)`, IOSQES = 6 and IOCQES = 4; EN is left clear.
    pub const fn nvm_default(mps: u8) -> Self {
        Cc::new()
            .with_css(Self::CSS_NVM)
            .with_mps(mps)
            .with_ams(Self::AMS_RR)
            .with_iosqes(IOSQES)
            .with_iocqes(IOCQES)
    }

    /// MPS value for a memory page size in bytes, if it is a power of two
    /// between 4 KiB and 128 MiB.
    pub const fn mps_for_page_size(page_size: u64) -> Option<u8> {
        if !page_size.is_power_of_two() {
            return None;
        }
        let shift = page_size.trailing_zeros();
        if shift < 12 || shift > 27 {
            return None;
        }
        Some((shift - 12) as u8)
    }

    const fn with_field(self, shift: u32, width: u32, value: u32) -> Self {
        let mask = ((1u32 << width) - 1) << shift;
        Cc((self.0 & !mask) | ((value << shift) & mask))
    }

    const fn field(self, shift: u32, width: u32) -> u32 {
        (self.0 >> shift) & ((1u32 << width) - 1)
    }

    /// Sets EN (bit 0).
    pub const fn with_enable(self, en: bool) -> Self {
        self.with_field(0, 1, en as u32)
    }

    /// Sets CSS (bits 6:4).
    pub const fn with_css(self, css: u8) -> Self {
        self.with_field(4, 3, css as u32)
    }

    /// Sets MPS (bits 10:7).
    pub const fn with_mps(self, mps: u8) -> Self {
        self.with_field(7, 4, mps as u32)
    }

    /// Sets AMS (bits 13:11).
    pub const fn with_ams(self, ams: u8) -> Self {
        self.with_field(11, 3, ams as u32)
    }

    /// Sets SHN (bits 15:14).
    pub const fn with_shn(self, shn: u8) -> Self {
        self.with_field(14, 2, shn as u32)
    }

    /// Sets IOSQES (bits 19:16).
    pub const fn with_iosqes(self, iosqes: u8) -> Self {
        self.with_field(16, 4, iosqes as u32)
    }

    /// Sets IOCQES (bits 23:20).
    pub const fn with_iocqes(self, iocqes: u8) -> Self {
        self.with_field(20, 4, iocqes as u32)
    }

    /// EN: enable.
    pub const fn en(self) -> bool {
        self.field(0, 1) != 0
    }

    /// CSS: I/O command set selected.
    pub const fn css(self) -> u8 {
        self.field(4, 3) as u8
    }

    /// MPS: memory page size exponent.
    pub const fn mps(self) -> u8 {
        self.field(7, 4) as u8
    }

    /// Memory page size in bytes (`2^(12 + MPS)`).
    pub const fn page_size(self) -> u64 {
        1 << (12 + self.mps() as u32)
    }

    /// AMS: arbitration mechanism selected.
    pub const fn ams(self) -> u8 {
        self.field(11, 3) as u8
    }

    /// SHN: shutdown notification.
    pub const fn shn(self) -> u8 {
        self.field(14, 2) as u8
    }

    /// IOSQES: I/O submission queue entry size exponent.
    pub const fn iosqes(self) -> u8 {
        self.field(16, 4) as u8
    }

    /// IOCQES: I/O completion queue entry size exponent.
    pub const fn iocqes(self) -> u8 {
        self.field(20, 4) as u8
    }
}

/// Controller Status register, CSTS (NVMe 1.4 §3.1.6, Figure 83).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Csts(pub u32);

impl Csts {
    /// SHST: normal operation.
    pub const SHST_NORMAL: u8 = 0;
    /// SHST: shutdown processing occurring.
    pub const SHST_OCCURRING: u8 = 1;
    /// SHST: shutdown processing complete.
    pub const SHST_COMPLETE: u8 = 2;

    /// RDY (bit 0).
    pub const fn rdy(self) -> bool {
        self.0 & 1 != 0
    }

    /// CFS: controller fatal status (bit 1).
    pub const fn cfs(self) -> bool {
        (self.0 >> 1) & 1 != 0
    }

    /// SHST: shutdown status (bits 3:2).
    pub const fn shst(self) -> u8 {
        ((self.0 >> 2) & 0x3) as u8
    }

    /// Whether shutdown processing is complete.
    pub const fn shutdown_complete(self) -> bool {
        self.shst() == Self::SHST_COMPLETE
    }

    /// NSSRO: NVM subsystem reset occurred (bit 4).
    pub const fn nssro(self) -> bool {
        (self.0 >> 4) & 1 != 0
    }

    /// PP: processing paused (bit 5).
    pub const fn pp(self) -> bool {
        (self.0 >> 5) & 1 != 0
    }

    /// All-ones reads indicate a surprise-removed / unreachable device.
    pub const fn is_all_ones(self) -> bool {
        self.0 == u32::MAX
    }
}

/// Admin Queue Attributes register, AQA (NVMe 1.4 §3.1.8, Figure 85).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Aqa(pub u32);

impl Aqa {
    /// Encodes 1-based admin SQ/CQ sizes (each 2..=4096).
    pub const fn new(sq_entries: u16, cq_entries: u16) -> Self {
        let asqs = (sq_entries.saturating_sub(1) & 0xFFF) as u32;
        let acqs = (cq_entries.saturating_sub(1) & 0xFFF) as u32;
        Aqa(acqs << 16 | asqs)
    }

    /// ASQS: admin submission queue size, 0-based (bits 11:0).
    pub const fn asqs(self) -> u16 {
        (self.0 & 0xFFF) as u16
    }

    /// ACQS: admin completion queue size, 0-based (bits 27:16).
    pub const fn acqs(self) -> u16 {
        ((self.0 >> 16) & 0xFFF) as u16
    }

    /// Admin SQ entries, 1-based.
    pub const fn sq_entries(self) -> u32 {
        self.asqs() as u32 + 1
    }

    /// Admin CQ entries, 1-based.
    pub const fn cq_entries(self) -> u32 {
        self.acqs() as u32 + 1
    }
}

/// Version register, VS (NVMe 1.4 §3.1.2, Figure 80); also the Identify
/// Controller VER field. Ordering follows version order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Vs(pub u32);

impl Vs {
    /// NVMe 1.0.
    pub const V1_0: Vs = Vs::new(1, 0, 0);
    /// NVMe 1.2.
    pub const V1_2: Vs = Vs::new(1, 2, 0);
    /// NVMe 1.3.
    pub const V1_3: Vs = Vs::new(1, 3, 0);
    /// NVMe 1.4.
    pub const V1_4: Vs = Vs::new(1, 4, 0);
    /// NVMe 2.0.
    pub const V2_0: Vs = Vs::new(2, 0, 0);

    /// Builds a version value.
    pub const fn new(major: u16, minor: u8, tertiary: u8) -> Self {
        Vs((major as u32) << 16 | (minor as u32) << 8 | tertiary as u32)
    }

    /// MJR (bits 31:16).
    pub const fn major(self) -> u16 {
        (self.0 >> 16) as u16
    }

    /// MNR (bits 15:8).
    pub const fn minor(self) -> u8 {
        (self.0 >> 8) as u8
    }

    /// TER (bits 7:0).
    pub const fn tertiary(self) -> u8 {
        self.0 as u8
    }
}

impl fmt::Display for Vs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major(), self.minor(), self.tertiary())
    }
}

// ---------------------------------------------------------------------------
// Identify data structures
// ---------------------------------------------------------------------------

/// Decodes a space/NUL padded ASCII field as a trimmed `String`.
fn ascii_field(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .trim_matches(|c: char| c == ' ' || c == '\0')
        .to_string()
}

/// Power State Descriptor (NVMe 1.4 §5.15.2.1, Figure 248), 32 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PowerStateDescriptor {
    /// Maximum power (centiwatts, or 0.0001 W when MPS is set).
    pub mp: u16,
    /// Reserved.
    pub rsvd2: u8,
    /// Bit 0 MXPS (max power scale), bit 1 NOPS (non-operational state).
    pub flags: u8,
    /// Entry latency (µs).
    pub enlat: u32,
    /// Exit latency (µs).
    pub exlat: u32,
    /// Relative read throughput (bits 4:0).
    pub rrt: u8,
    /// Relative read latency (bits 4:0).
    pub rrl: u8,
    /// Relative write throughput (bits 4:0).
    pub rwt: u8,
    /// Relative write latency (bits 4:0).
    pub rwl: u8,
    /// Idle power.
    pub idlp: u16,
    /// Idle power scale (bits 7:6).
    pub ips: u8,
    /// Reserved.
    pub rsvd19: u8,
    /// Active power.
    pub actp: u16,
    /// Active power workload (2:0) and scale (7:6).
    pub apw_aps: u8,
    /// Reserved.
    pub rsvd23: [u8; 9],
}

assert_layout!(PowerStateDescriptor, 32, {
    mp @ 0, rsvd2 @ 2, flags @ 3, enlat @ 4, exlat @ 8, rrt @ 12, rrl @ 13,
    rwt @ 14, rwl @ 15, idlp @ 16, ips @ 18, rsvd19 @ 19, actp @ 20,
    apw_aps @ 22, rsvd23 @ 23,
});
impl_pod!(PowerStateDescriptor, 32);

/// Identify Controller data structure (NVMe 1.4 §5.15.2.1, Figure 247;
/// NVMe 2.0 Figure 275), 4096 bytes.
///
/// Multi-byte fields that are not naturally aligned in the spec (or are
/// 128-bit) are kept as byte arrays with decoding accessors.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IdentifyController {
    /// PCI Vendor ID.
    pub vid: u16,
    /// PCI Subsystem Vendor ID.
    pub ssvid: u16,
    /// Serial Number (ASCII, space padded).
    pub sn: [u8; 20],
    /// Model Number (ASCII, space padded).
    pub mn: [u8; 40],
    /// Firmware Revision (ASCII, space padded).
    pub fr: [u8; 8],
    /// Recommended Arbitration Burst.
    pub rab: u8,
    /// IEEE OUI Identifier.
    pub ieee: [u8; 3],
    /// Controller Multi-Path I/O and Namespace Sharing Capabilities.
    pub cmic: u8,
    /// Maximum Data Transfer Size (2^n minimum pages; 0 = no limit).
    pub mdts: u8,
    /// Controller ID.
    pub cntlid: u16,
    /// Version.
    pub ver: u32,
    /// RTD3 Resume Latency (µs).
    pub rtd3r: u32,
    /// RTD3 Entry Latency (µs).
    pub rtd3e: u32,
    /// Optional Asynchronous Events Supported.
    pub oaes: u32,
    /// Controller Attributes.
    pub ctratt: u32,
    /// Read Recovery Levels Supported.
    pub rrls: u16,
    /// Reserved.
    pub rsvd102: [u8; 9],
    /// Controller Type.
    pub cntrltype: u8,
    /// FRU Globally Unique Identifier.
    pub fguid: [u8; 16],
    /// Command Retry Delay Time 1 (100 ms units).
    pub crdt1: u16,
    /// Command Retry Delay Time 2.
    pub crdt2: u16,
    /// Command Retry Delay Time 3.
    pub crdt3: u16,
    /// Reserved.
    pub rsvd134: [u8; 119],
    /// NVM Subsystem Report (NVMe-MI).
    pub nvmsr: u8,
    /// VPD Write Cycle Information (NVMe-MI).
    pub vwci: u8,
    /// Management Endpoint Capabilities (NVMe-MI).
    pub mec: u8,
    /// Optional Admin Command Support.
    pub oacs: u16,
    /// Abort Command Limit (0-based).
    pub acl: u8,
    /// Asynchronous Event Request Limit (0-based).
    pub aerl: u8,
    /// Firmware Updates.
    pub frmw: u8,
    /// Log Page Attributes.
    pub lpa: u8,
    /// Error Log Page Entries (0-based).
    pub elpe: u8,
    /// Number of Power States Support (0-based).
    pub npss: u8,
    /// Admin Vendor Specific Command Configuration.
    pub avscc: u8,
    /// Autonomous Power State Transition Attributes.
    pub apsta: u8,
    /// Warning Composite Temperature Threshold (K).
    pub wctemp: u16,
    /// Critical Composite Temperature Threshold (K).
    pub cctemp: u16,
    /// Maximum Time for Firmware Activation.
    pub mtfa: u16,
    /// Host Memory Buffer Preferred Size (4 KiB units).
    pub hmpre: u32,
    /// Host Memory Buffer Minimum Size (4 KiB units).
    pub hmmin: u32,
    /// Total NVM Capacity (bytes, 128-bit LE).
    pub tnvmcap: [u8; 16],
    /// Unallocated NVM Capacity (bytes, 128-bit LE).
    pub unvmcap: [u8; 16],
    /// Replay Protected Memory Block Support.
    pub rpmbs: u32,
    /// Extended Device Self-test Time.
    pub edstt: u16,
    /// Device Self-test Options.
    pub dsto: u8,
    /// Firmware Update Granularity.
    pub fwug: u8,
    /// Keep Alive Support.
    pub kas: u16,
    /// Host Controlled Thermal Management Attributes.
    pub hctma: u16,
    /// Minimum Thermal Management Temperature.
    pub mntmt: u16,
    /// Maximum Thermal Management Temperature.
    pub mxtmt: u16,
    /// Sanitize Capabilities.
    pub sanicap: u32,
    /// Host Memory Buffer Minimum Descriptor Entry Size.
    pub hmminds: u32,
    /// Host Memory Maximum Descriptors Entries.
    pub hmmaxd: u16,
    /// NVM Set Identifier Maximum.
    pub nsetidmax: u16,
    /// Endurance Group Identifier Maximum.
    pub endgidmax: u16,
    /// ANA Transition Time.
    pub anatt: u8,
    /// Asymmetric Namespace Access Capabilities.
    pub anacap: u8,
    /// ANA Group Identifier Maximum.
    pub anagrpmax: u32,
    /// Number of ANA Group Identifiers.
    pub nanagrpid: u32,
    /// Persistent Event Log Size.
    pub pels: u32,
    /// Domain Identifier (2.0).
    pub domainid: u16,
    /// Reserved.
    pub rsvd358: [u8; 10],
    /// Max Endurance Group Capacity (2.0).
    pub megcap: [u8; 16],
    /// Reserved.
    pub rsvd384: [u8; 128],
    /// Submission Queue Entry Size (min 3:0, max 7:4; log2 bytes).
    pub sqes: u8,
    /// Completion Queue Entry Size (min 3:0, max 7:4; log2 bytes).
    pub cqes: u8,
    /// Maximum Outstanding Commands.
    pub maxcmd: u16,
    /// Number of Namespaces (maximum valid NSID).
    pub nn: u32,
    /// Optional NVM Command Support.
    pub oncs: u16,
    /// Fused Operation Support.
    pub fuses: u16,
    /// Format NVM Attributes.
    pub fna: u8,
    /// Volatile Write Cache.
    pub vwc: u8,
    /// Atomic Write Unit Normal (0-based, blocks).
    pub awun: u16,
    /// Atomic Write Unit Power Fail (0-based, blocks).
    pub awupf: u16,
    /// I/O Command Set Vendor Specific Command Configuration.
    pub icsvscc: u8,
    /// Namespace Write Protection Capabilities.
    pub nwpc: u8,
    /// Atomic Compare & Write Unit.
    pub acwu: u16,
    /// Copy Formats Supported (2.0; reserved in 1.4).
    pub ocfs: u16,
    /// SGL Support.
    pub sgls: u32,
    /// Maximum Number of Allowed Namespaces.
    pub mnan: u32,
    /// Maximum Domain Namespace Attachments (2.0).
    pub maxdna: [u8; 16],
    /// Maximum I/O Controller Namespace Attachments (2.0).
    pub maxcna: u32,
    /// Reserved.
    pub rsvd564: [u8; 204],
    /// NVM Subsystem NVMe Qualified Name (UTF-8, NUL padded).
    pub subnqn: [u8; 256],
    /// Reserved.
    pub rsvd1024: [u8; 768],
    /// NVMe over Fabrics specific fields.
    pub nvmof: [u8; 256],
    /// Power State Descriptors 0-31.
    pub psd: [PowerStateDescriptor; 32],
    /// Vendor Specific.
    pub vs: [u8; 1024],
}

const _: () = assert!(size_of::<IdentifyController>() == 4096);
assert_layout!(IdentifyController, 4096, {
    vid @ 0, ssvid @ 2, sn @ 4, mn @ 24, fr @ 64, rab @ 72, ieee @ 73,
    cmic @ 76, mdts @ 77, cntlid @ 78, ver @ 80, rtd3r @ 84, rtd3e @ 88,
    oaes @ 92, ctratt @ 96, rrls @ 100, rsvd102 @ 102, cntrltype @ 111,
    fguid @ 112, crdt1 @ 128, crdt2 @ 130, crdt3 @ 132, rsvd134 @ 134,
    nvmsr @ 253, vwci @ 254, mec @ 255,
    oacs @ 256, acl @ 258, aerl @ 259, frmw @ 260, lpa @ 261, elpe @ 262,
    npss @ 263, avscc @ 264, apsta @ 265, wctemp @ 266, cctemp @ 268,
    mtfa @ 270, hmpre @ 272, hmmin @ 276, tnvmcap @ 280, unvmcap @ 296,
    rpmbs @ 312, edstt @ 316, dsto @ 318, fwug @ 319, kas @ 320, hctma @ 322,
    mntmt @ 324, mxtmt @ 326, sanicap @ 328, hmminds @ 332, hmmaxd @ 336,
    nsetidmax @ 338, endgidmax @ 340, anatt @ 342, anacap @ 343,
    anagrpmax @ 344, nanagrpid @ 348, pels @ 352, domainid @ 356,
    rsvd358 @ 358, megcap @ 368, rsvd384 @ 384,
    sqes @ 512, cqes @ 513, maxcmd @ 514, nn @ 516, oncs @ 520, fuses @ 522,
    fna @ 524, vwc @ 525, awun @ 526, awupf @ 528, icsvscc @ 530, nwpc @ 531,
    acwu @ 532, ocfs @ 534, sgls @ 536, mnan @ 540, maxdna @ 544,
    maxcna @ 560, rsvd564 @ 564, subnqn @ 768, rsvd1024 @ 1024,
    nvmof @ 1792, psd @ 2048, vs @ 3072,
});
impl_pod!(IdentifyController, 4096);

impl IdentifyController {
    /// OACS bit 8: Doorbell Buffer Config supported.
    pub const OACS_DBBUF: u16 = 1 << 8;
    /// OACS bit 3: Namespace Management supported.
    pub const OACS_NS_MANAGEMENT: u16 = 1 << 3;
    /// OACS bit 1: Format NVM supported.
    pub const OACS_FORMAT: u16 = 1 << 1;
    /// ONCS bit 0: Compare.
    pub const ONCS_COMPARE: u16 = 1 << 0;
    /// ONCS bit 1: Write Uncorrectable.
    pub const ONCS_WRITE_UNCORRECTABLE: u16 = 1 << 1;
    /// ONCS bit 2: Dataset Management.
    pub const ONCS_DSM: u16 = 1 << 2;
    /// ONCS bit 3: Write Zeroes.
    pub const ONCS_WRITE_ZEROES: u16 = 1 << 3;
    /// ONCS bit 4: Save field in Set/Get Features.
    pub const ONCS_SAVE_FEATURES: u16 = 1 << 4;
    /// ONCS bit 5: Reservations.
    pub const ONCS_RESERVATIONS: u16 = 1 << 5;
    /// ONCS bit 6: Timestamp feature.
    pub const ONCS_TIMESTAMP: u16 = 1 << 6;
    /// ONCS bit 7: Verify.
    pub const ONCS_VERIFY: u16 = 1 << 7;
    /// ONCS bit 8: Copy (2.0).
    pub const ONCS_COPY: u16 = 1 << 8;
    /// VWC bit 0: volatile write cache present.
    pub const VWC_PRESENT: u8 = 1 << 0;

    /// Serial number, trimmed.
    pub fn serial(&self) -> String {
        ascii_field(&self.sn)
    }

    /// Model number, trimmed.
    pub fn model(&self) -> String {
        ascii_field(&self.mn)
    }

    /// Firmware revision, trimmed.
    pub fn firmware(&self) -> String {
        ascii_field(&self.fr)
    }

    /// NVM Subsystem NQN, trimmed.
    pub fn subsystem_nqn(&self) -> String {
        ascii_field(&self.subnqn)
    }

    /// Reported specification version (0 for pre-1.2 controllers).
    pub const fn version(&self) -> Vs {
        Vs(self.ver)
    }

    /// Maximum data transfer size in bytes given CAP's minimum memory page
    /// size; `None` if MDTS = 0 (no limit) or the limit does not fit in u64.
    pub const fn mdts_bytes(&self, min_page_size: u64) -> Option<u64> {
        if self.mdts == 0 {
            return None;
        }
        match 1u64.checked_shl(self.mdts as u32) {
            Some(pages) => min_page_size.checked_mul(pages),
            None => None,
        }
    }

    /// Dataset Management (deallocate/TRIM) supported.
    pub const fn supports_dsm(&self) -> bool {
        self.oncs & Self::ONCS_DSM != 0
    }

    /// Write Zeroes supported.
    pub const fn supports_write_zeroes(&self) -> bool {
        self.oncs & Self::ONCS_WRITE_ZEROES != 0
    }

    /// Compare supported.
    pub const fn supports_compare(&self) -> bool {
        self.oncs & Self::ONCS_COMPARE != 0
    }

    /// Doorbell Buffer Config (shadow doorbells) supported.
    pub const fn supports_dbbuf(&self) -> bool {
        self.oacs & Self::OACS_DBBUF != 0
    }

    /// SGLs supported for the NVM command set (SGLS bits 1:0 non-zero).
    pub const fn supports_sgl(&self) -> bool {
        self.sgls & 0x3 != 0
    }

    /// SGLs supported, and data blocks must be dword aligned (SGLS bits 1:0 = 10b).
    pub const fn sgl_dword_aligned(&self) -> bool {
        self.sgls & 0x3 == 0x2
    }

    /// OAES bit 8: the controller sends Namespace Attribute Changed notices.
    pub const fn oaes_ns_attribute(&self) -> bool {
        self.oaes & (1 << 8) != 0
    }

    /// OAES bit 9: the controller sends Firmware Activation Starting notices.
    pub const fn oaes_firmware_activation(&self) -> bool {
        self.oaes & (1 << 9) != 0
    }

    /// Command Retry Delay Time for a completion's CRD field (1..=3): CRDTn in units of
    /// 100 ms. `None` for CRD 0 (retry at once) or out of range.
    pub const fn retry_delay_ms(&self, crd: u8) -> Option<u64> {
        match crd {
            1 => Some(self.crdt1 as u64 * 100),
            2 => Some(self.crdt2 as u64 * 100),
            3 => Some(self.crdt3 as u64 * 100),
            _ => None,
        }
    }

    /// A volatile write cache is present (Flush is meaningful).
    pub const fn volatile_write_cache(&self) -> bool {
        self.vwc & Self::VWC_PRESENT != 0
    }

    /// Required (minimum) SQ entry size exponent.
    pub const fn sqes_min(&self) -> u8 {
        self.sqes & 0xF
    }

    /// Maximum SQ entry size exponent.
    pub const fn sqes_max(&self) -> u8 {
        self.sqes >> 4
    }

    /// Required (minimum) CQ entry size exponent.
    pub const fn cqes_min(&self) -> u8 {
        self.cqes & 0xF
    }

    /// Maximum CQ entry size exponent.
    pub const fn cqes_max(&self) -> u8 {
        self.cqes >> 4
    }

    /// Abort Command Limit as a 1-based count.
    pub const fn abort_limit(&self) -> u32 {
        self.acl as u32 + 1
    }

    /// Total NVM capacity in bytes.
    pub const fn total_nvm_capacity(&self) -> u128 {
        u128::from_le_bytes(self.tnvmcap)
    }
}

impl fmt::Debug for IdentifyController {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentifyController")
            .field("vid", &format_args!("{:#06x}", self.vid))
            .field("ssvid", &format_args!("{:#06x}", self.ssvid))
            .field("sn", &self.serial())
            .field("mn", &self.model())
            .field("fr", &self.firmware())
            .field("mdts", &self.mdts)
            .field("cntlid", &self.cntlid)
            .field("ver", &self.version())
            .field("oacs", &format_args!("{:#06x}", self.oacs))
            .field("acl", &self.acl)
            .field("aerl", &self.aerl)
            .field("elpe", &self.elpe)
            .field("sqes", &format_args!("{:#04x}", self.sqes))
            .field("cqes", &format_args!("{:#04x}", self.cqes))
            .field("maxcmd", &self.maxcmd)
            .field("nn", &self.nn)
            .field("oncs", &format_args!("{:#06x}", self.oncs))
            .field("vwc", &format_args!("{:#04x}", self.vwc))
            .field("sgls", &format_args!("{:#010x}", self.sgls))
            .field("subnqn", &self.subsystem_nqn())
            .finish_non_exhaustive()
    }
}

/// LBA Format Data Structure (NVMe 1.4 §5.15.2.1, Figure 250), 4 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LbaFormat {
    /// Metadata Size (bytes per LBA).
    pub ms: u16,
    /// LBA Data Size (log2 bytes; 0 = format not available, else >= 9).
    pub lbads: u8,
    /// Relative Performance (bits 1:0).
    pub rp: u8,
}

assert_layout!(LbaFormat, 4, { ms @ 0, lbads @ 2, rp @ 3 });
impl_pod!(LbaFormat, 4);

impl LbaFormat {
    /// Data size in bytes (`1 << lbads`), or 0 if LBADS is out of range.
    pub const fn data_size(&self) -> u32 {
        match 1u32.checked_shl(self.lbads as u32) {
            Some(v) => v,
            None => 0,
        }
    }

    /// Relative performance (0 = best .. 3 = degraded).
    pub const fn relative_performance(&self) -> u8 {
        self.rp & 0x3
    }
}

/// Identify Namespace data structure for the NVM command set (NVMe 1.4
/// §5.15.2.1, Figure 249; NVMe 2.0 NVM Command Set spec Figure 97), 4096 bytes.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct IdentifyNamespace {
    /// Namespace Size (logical blocks).
    pub nsze: u64,
    /// Namespace Capacity (logical blocks).
    pub ncap: u64,
    /// Namespace Utilization (logical blocks).
    pub nuse: u64,
    /// Namespace Features.
    pub nsfeat: u8,
    /// Number of LBA Formats (0-based).
    pub nlbaf: u8,
    /// Formatted LBA Size.
    pub flbas: u8,
    /// Metadata Capabilities.
    pub mc: u8,
    /// End-to-end Data Protection Capabilities.
    pub dpc: u8,
    /// End-to-end Data Protection Type Settings.
    pub dps: u8,
    /// Namespace Multi-path I/O and Namespace Sharing Capabilities.
    pub nmic: u8,
    /// Reservation Capabilities.
    pub rescap: u8,
    /// Format Progress Indicator.
    pub fpi: u8,
    /// Deallocate Logical Block Features.
    pub dlfeat: u8,
    /// Namespace Atomic Write Unit Normal.
    pub nawun: u16,
    /// Namespace Atomic Write Unit Power Fail.
    pub nawupf: u16,
    /// Namespace Atomic Compare & Write Unit.
    pub nacwu: u16,
    /// Namespace Atomic Boundary Size Normal.
    pub nabsn: u16,
    /// Namespace Atomic Boundary Offset.
    pub nabo: u16,
    /// Namespace Atomic Boundary Size Power Fail.
    pub nabspf: u16,
    /// Namespace Optimal I/O Boundary (logical blocks).
    pub noiob: u16,
    /// NVM Capacity (bytes, 128-bit LE).
    pub nvmcap: [u8; 16],
    /// Namespace Preferred Write Granularity (0-based).
    pub npwg: u16,
    /// Namespace Preferred Write Alignment (0-based).
    pub npwa: u16,
    /// Namespace Preferred Deallocate Granularity (0-based).
    pub npdg: u16,
    /// Namespace Preferred Deallocate Alignment (0-based).
    pub npda: u16,
    /// Namespace Optimal Write Size (0-based).
    pub nows: u16,
    /// Maximum Single Source Range Length (2.0).
    pub mssrl: u16,
    /// Maximum Copy Length (2.0).
    pub mcl: u32,
    /// Maximum Source Range Count (2.0).
    pub msrc: u8,
    /// Reserved.
    pub rsvd81: [u8; 11],
    /// ANA Group Identifier.
    pub anagrpid: u32,
    /// Reserved.
    pub rsvd96: [u8; 3],
    /// Namespace Attributes.
    pub nsattr: u8,
    /// NVM Set Identifier.
    pub nvmsetid: u16,
    /// Endurance Group Identifier.
    pub endgid: u16,
    /// Namespace Globally Unique Identifier.
    pub nguid: [u8; 16],
    /// IEEE Extended Unique Identifier.
    pub eui64: [u8; 8],
    /// LBA Formats 0-15.
    pub lbaf: [LbaFormat; 16],
    /// LBA Formats 16-63 (2.0; reserved in 1.4).
    pub lbaf_ext: [LbaFormat; 48],
    /// Vendor Specific.
    pub vs: [u8; 3712],
}

const _: () = assert!(size_of::<IdentifyNamespace>() == 4096);
assert_layout!(IdentifyNamespace, 4096, {
    nsze @ 0, ncap @ 8, nuse @ 16, nsfeat @ 24, nlbaf @ 25, flbas @ 26,
    mc @ 27, dpc @ 28, dps @ 29, nmic @ 30, rescap @ 31, fpi @ 32,
    dlfeat @ 33, nawun @ 34, nawupf @ 36, nacwu @ 38, nabsn @ 40, nabo @ 42,
    nabspf @ 44, noiob @ 46, nvmcap @ 48, npwg @ 64, npwa @ 66, npdg @ 68,
    npda @ 70, nows @ 72, mssrl @ 74, mcl @ 76, msrc @ 80, rsvd81 @ 81,
    anagrpid @ 92, rsvd96 @ 96, nsattr @ 99, nvmsetid @ 100, endgid @ 102,
    nguid @ 104, eui64 @ 120, lbaf @ 128, lbaf_ext @ 192, vs @ 384,
});
impl_pod!(IdentifyNamespace, 4096);

impl IdentifyNamespace {
    /// NSFEAT bit 0: thin provisioning.
    pub const NSFEAT_THIN_PROVISIONING: u8 = 1 << 0;
    /// FLBAS bit 4: metadata transferred at the end of the data LBA
    /// (extended LBA).
    pub const FLBAS_EXTENDED_METADATA: u8 = 1 << 4;

    /// Number of supported LBA formats (1-based).
    pub const fn num_lba_formats(&self) -> usize {
        self.nlbaf as usize + 1
    }

    /// Index of the LBA format the namespace is formatted with: FLBAS bits
    /// 3:0, extended by bits 6:5 as the upper two bits when more than 16
    /// formats are supported (NVMe 2.0).
    pub const fn current_format_index(&self) -> u8 {
        let low = self.flbas & 0xF;
        if self.nlbaf >= 16 {
            low | ((self.flbas >> 5) & 0x3) << 4
        } else {
            low
        }
    }

    /// LBA format `idx` (0..64), or `None` if beyond the supported count.
    pub const fn lba_format(&self, idx: usize) -> Option<LbaFormat> {
        if idx >= self.num_lba_formats() {
            None
        } else if idx < 16 {
            Some(self.lbaf[idx])
        } else if idx < 64 {
            Some(self.lbaf_ext[idx - 16])
        } else {
            None
        }
    }

    /// The current LBA format (falls back to raw table lookup even if FLBAS
    /// points beyond NLBAF, so a malformed structure never panics).
    pub const fn current_format(&self) -> LbaFormat {
        let idx = self.current_format_index() as usize;
        if idx < 16 {
            self.lbaf[idx]
        } else {
            self.lbaf_ext[idx - 16]
        }
    }

    /// Logical block (sector) size in bytes: `1 << lbads` of the current
    /// format (0 if LBADS is out of range).
    pub const fn block_size(&self) -> u32 {
        self.current_format().data_size()
    }

    /// Metadata bytes per logical block of the current format.
    pub const fn metadata_size(&self) -> u16 {
        self.current_format().ms
    }

    /// Metadata is interleaved with data (extended LBA) rather than separate.
    pub const fn extended_metadata(&self) -> bool {
        self.flbas & Self::FLBAS_EXTENDED_METADATA != 0
    }

    /// Namespace size in bytes (`nsze * block_size`, saturating).
    pub const fn size_bytes(&self) -> u64 {
        self.nsze.saturating_mul(self.block_size() as u64)
    }

    /// Thin provisioning supported.
    pub const fn thin_provisioned(&self) -> bool {
        self.nsfeat & Self::NSFEAT_THIN_PROVISIONING != 0
    }

    /// NVM capacity in bytes.
    pub const fn nvm_capacity(&self) -> u128 {
        u128::from_le_bytes(self.nvmcap)
    }
}

impl fmt::Debug for IdentifyNamespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.num_lba_formats().min(64);
        let formats: Vec<LbaFormat> = (0..n).filter_map(|i| self.lba_format(i)).collect();
        f.debug_struct("IdentifyNamespace")
            .field("nsze", &self.nsze)
            .field("ncap", &self.ncap)
            .field("nuse", &self.nuse)
            .field("nsfeat", &format_args!("{:#04x}", self.nsfeat))
            .field("nlbaf", &self.nlbaf)
            .field("flbas", &format_args!("{:#04x}", self.flbas))
            .field("mc", &format_args!("{:#04x}", self.mc))
            .field("dps", &format_args!("{:#04x}", self.dps))
            .field("dlfeat", &format_args!("{:#04x}", self.dlfeat))
            .field("nguid", &self.nguid)
            .field("eui64", &self.eui64)
            .field("lbaf", &formats)
            .finish_non_exhaustive()
    }
}

/// Parses an Active Namespace ID list (Identify CNS 02h): NSIDs up to the
/// first zero entry.
pub fn parse_ns_list(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .take_while(|&id| id != 0)
        .collect()
}

// ---------------------------------------------------------------------------
// Log pages
// ---------------------------------------------------------------------------

/// SMART / Health Information log page (NVMe 1.4 §5.14.1.2, Figure 196),
/// 512 bytes. 128-bit counters are stored as little-endian byte arrays.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SmartLog {
    /// Critical Warning bits, see [`critical_warning`].
    pub critical_warning: u8,
    /// Composite Temperature (Kelvin, LE u16 at unaligned offset 1).
    pub temperature: [u8; 2],
    /// Available Spare (percent).
    pub avail_spare: u8,
    /// Available Spare Threshold (percent).
    pub spare_thresh: u8,
    /// Percentage Used.
    pub percent_used: u8,
    /// Endurance Group Critical Warning Summary.
    pub endurance_group_warning: u8,
    /// Reserved.
    pub rsvd7: [u8; 25],
    /// Data Units Read (thousands of 512-byte units).
    pub data_units_read: [u8; 16],
    /// Data Units Written (thousands of 512-byte units).
    pub data_units_written: [u8; 16],
    /// Host Read Commands.
    pub host_read_commands: [u8; 16],
    /// Host Write Commands.
    pub host_write_commands: [u8; 16],
    /// Controller Busy Time (minutes).
    pub controller_busy_time: [u8; 16],
    /// Power Cycles.
    pub power_cycles: [u8; 16],
    /// Power On Hours.
    pub power_on_hours: [u8; 16],
    /// Unsafe Shutdowns.
    pub unsafe_shutdowns: [u8; 16],
    /// Media and Data Integrity Errors.
    pub media_errors: [u8; 16],
    /// Number of Error Information Log Entries.
    pub num_err_log_entries: [u8; 16],
    /// Warning Composite Temperature Time (minutes).
    pub warning_temp_time: u32,
    /// Critical Composite Temperature Time (minutes).
    pub critical_temp_time: u32,
    /// Temperature Sensors 1-8 (Kelvin, 0 = not implemented).
    pub temp_sensors: [u16; 8],
    /// Thermal Management Temperature 1 Transition Count.
    pub thm_temp1_trans_count: u32,
    /// Thermal Management Temperature 2 Transition Count.
    pub thm_temp2_trans_count: u32,
    /// Total Time For Thermal Management Temperature 1 (seconds).
    pub thm_temp1_total_time: u32,
    /// Total Time For Thermal Management Temperature 2 (seconds).
    pub thm_temp2_total_time: u32,
    /// Reserved.
    pub rsvd232: [u8; 280],
}

const _: () = assert!(size_of::<SmartLog>() == 512);
assert_layout!(SmartLog, 512, {
    critical_warning @ 0, temperature @ 1, avail_spare @ 3, spare_thresh @ 4,
    percent_used @ 5, endurance_group_warning @ 6, rsvd7 @ 7,
    data_units_read @ 32, data_units_written @ 48, host_read_commands @ 64,
    host_write_commands @ 80, controller_busy_time @ 96, power_cycles @ 112,
    power_on_hours @ 128, unsafe_shutdowns @ 144, media_errors @ 160,
    num_err_log_entries @ 176, warning_temp_time @ 192,
    critical_temp_time @ 196, temp_sensors @ 200,
    thm_temp1_trans_count @ 216, thm_temp2_trans_count @ 220,
    thm_temp1_total_time @ 224, thm_temp2_total_time @ 228, rsvd232 @ 232,
});
impl_pod!(SmartLog, 512);

impl SmartLog {
    /// Composite temperature in Kelvin.
    pub const fn temperature_kelvin(&self) -> u16 {
        u16::from_le_bytes(self.temperature)
    }

    /// Composite temperature in degrees Celsius (Kelvin - 273).
    pub const fn temperature_celsius(&self) -> i32 {
        self.temperature_kelvin() as i32 - 273
    }

    /// Data Units Read (1 unit = 1000 * 512 bytes).
    pub const fn data_units_read(&self) -> u128 {
        u128::from_le_bytes(self.data_units_read)
    }

    /// Data Units Written (1 unit = 1000 * 512 bytes).
    pub const fn data_units_written(&self) -> u128 {
        u128::from_le_bytes(self.data_units_written)
    }

    /// Bytes read, derived from Data Units Read (saturating).
    pub const fn bytes_read(&self) -> u128 {
        self.data_units_read().saturating_mul(512_000)
    }

    /// Bytes written, derived from Data Units Written (saturating).
    pub const fn bytes_written(&self) -> u128 {
        self.data_units_written().saturating_mul(512_000)
    }

    /// Host Read Commands.
    pub const fn host_read_commands(&self) -> u128 {
        u128::from_le_bytes(self.host_read_commands)
    }

    /// Host Write Commands.
    pub const fn host_write_commands(&self) -> u128 {
        u128::from_le_bytes(self.host_write_commands)
    }

    /// Controller Busy Time (minutes).
    pub const fn controller_busy_time(&self) -> u128 {
        u128::from_le_bytes(self.controller_busy_time)
    }

    /// Power Cycles.
    pub const fn power_cycles(&self) -> u128 {
        u128::from_le_bytes(self.power_cycles)
    }

    /// Power On Hours.
    pub const fn power_on_hours(&self) -> u128 {
        u128::from_le_bytes(self.power_on_hours)
    }

    /// Unsafe Shutdowns.
    pub const fn unsafe_shutdowns(&self) -> u128 {
        u128::from_le_bytes(self.unsafe_shutdowns)
    }

    /// Media and Data Integrity Errors.
    pub const fn media_errors(&self) -> u128 {
        u128::from_le_bytes(self.media_errors)
    }

    /// Number of Error Information Log Entries over the controller's life.
    pub const fn num_err_log_entries(&self) -> u128 {
        u128::from_le_bytes(self.num_err_log_entries)
    }
}

impl fmt::Debug for SmartLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmartLog")
            .field(
                "critical_warning",
                &format_args!("{:#04x}", self.critical_warning),
            )
            .field("temperature_kelvin", &self.temperature_kelvin())
            .field("avail_spare", &self.avail_spare)
            .field("spare_thresh", &self.spare_thresh)
            .field("percent_used", &self.percent_used)
            .field("data_units_read", &self.data_units_read())
            .field("data_units_written", &self.data_units_written())
            .field("host_read_commands", &self.host_read_commands())
            .field("host_write_commands", &self.host_write_commands())
            .field("controller_busy_time", &self.controller_busy_time())
            .field("power_cycles", &self.power_cycles())
            .field("power_on_hours", &self.power_on_hours())
            .field("unsafe_shutdowns", &self.unsafe_shutdowns())
            .field("media_errors", &self.media_errors())
            .field("num_err_log_entries", &self.num_err_log_entries())
            .field("warning_temp_time", &self.warning_temp_time)
            .field("critical_temp_time", &self.critical_temp_time)
            .field("temp_sensors", &self.temp_sensors)
            .finish_non_exhaustive()
    }
}

/// Error Information log entry (NVMe 1.4 §5.14.1.1, Figure 195), 64 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorLogEntry {
    /// Error Count (0 = entry invalid).
    pub error_count: u64,
    /// Submission Queue ID.
    pub sqid: u16,
    /// Command ID.
    pub cid: u16,
    /// Status Field (bits 15:1) and phase tag (bit 0), as in a CQE.
    pub status: u16,
    /// Parameter Error Location (byte 7:0, bit 10:8).
    pub param_error_location: u16,
    /// LBA of the first failing block.
    pub lba: u64,
    /// Namespace.
    pub nsid: u32,
    /// Vendor Specific Information Available (log page id).
    pub vs: u8,
    /// Transport Type.
    pub trtype: u8,
    /// Reserved.
    pub rsvd30: [u8; 2],
    /// Command Specific Information.
    pub cmd_specific: u64,
    /// Transport Type Specific Information.
    pub trtype_specific: u16,
    /// Reserved.
    pub rsvd42: [u8; 22],
}

assert_layout!(ErrorLogEntry, 64, {
    error_count @ 0, sqid @ 8, cid @ 10, status @ 12,
    param_error_location @ 14, lba @ 16, nsid @ 24, vs @ 28, trtype @ 29,
    rsvd30 @ 30, cmd_specific @ 32, trtype_specific @ 40, rsvd42 @ 42,
});
impl_pod!(ErrorLogEntry, 64);

impl ErrorLogEntry {
    /// Decoded status of the failed command.
    pub const fn status(&self) -> Status {
        Status::from_cqe_status(self.status)
    }

    /// Whether this entry holds an error (error count non-zero).
    pub const fn is_valid(&self) -> bool {
        self.error_count != 0
    }
}

// ---------------------------------------------------------------------------
// PRP helpers
// ---------------------------------------------------------------------------

/// Number of PRP entries (memory pages touched) needed to describe a
/// physically contiguous buffer of `len` bytes at bus address `addr`
/// (NVMe 1.4 §4.3). PRP1 may carry a page offset; all later entries are
/// page aligned. Returns 0 for `len == 0`.
///
/// # Panics
///
/// Panics if `page_size` is not a power of two.
pub fn prp_entries_needed(addr: u64, len: u64, page_size: u64) -> usize {
    assert!(
        page_size.is_power_of_two(),
        "page size must be a power of two"
    );
    if len == 0 {
        return 0;
    }
    let offset = addr & (page_size - 1);
    let total = u128::from(offset) + u128::from(len);
    usize::try_from(total.div_ceil(u128::from(page_size))).unwrap_or(usize::MAX)
}

/// Number of entries that must go into a PRP list for such a buffer: 0 when
/// PRP1 (and PRP2 as a direct entry) suffice, else all entries after PRP1.
/// (Lists longer than one page must additionally be chained by the caller.)
///
/// # Panics
///
/// Panics if `page_size` is not a power of two.
pub fn prp_list_entries_needed(addr: u64, len: u64, page_size: u64) -> usize {
    match prp_entries_needed(addr, len, page_size) {
        0..=2 => 0,
        n => n - 1,
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgl_descriptor_in_the_data_pointer() {
        let d = SglDescriptor::data_block(0x1234_5678_9ABC, 4100);
        let c = SubmissionEntry::read(1, 0, 9, 0, 0).with_sgl(d);
        assert_eq!(c.psdt(), 1);
        assert_eq!(c.prp1, 0x1234_5678_9ABC);
        assert_eq!(c.prp2, 4100);
        assert_eq!(c.sgl1(), d);
        let seg = SglDescriptor::last_segment(0x1000, 3);
        assert_eq!(
            (seg.kind(), seg.subtype(), seg.len),
            (sgl_type::LAST_SEGMENT, 0, 48)
        );
        let (lo, hi) = seg.to_dptr();
        assert_eq!(hi >> 56, 0x30);
        assert_eq!(SglDescriptor::from_dptr(lo, hi), seg);
        assert_eq!(seg.as_bytes()[15], 0x30);
        assert_eq!(SglDescriptor::segment(8, 2).kind(), sgl_type::SEGMENT);
    }

    #[test]
    fn async_event_round_trip() {
        let e = AsyncEvent {
            kind: async_event_type::NOTICE,
            info: async_event_notice::NS_ATTRIBUTE_CHANGED,
            log_page: log_page::CHANGED_NS_LIST,
        };
        assert_eq!(e.to_dw0(), 0x04_00_02);
        assert_eq!(AsyncEvent::from_dw0(e.to_dw0()), e);
        assert_eq!(e.name(), "namespace attribute changed");
        assert_eq!(
            AsyncEvent::from_dw0(0x02_01_01).name(),
            "SMART/health warning"
        );
        let mut id = IdentifyController::zeroed();
        id.crdt2 = 3;
        assert_eq!(id.retry_delay_ms(2), Some(300));
        assert_eq!(id.retry_delay_ms(0), None);
        id.sgls = 2;
        assert!(id.supports_sgl() && id.sgl_dword_aligned());
    }

    #[test]
    fn read_encoding() {
        let c = SubmissionEntry::read(1, 0x1_0000_0002, 8, 0xAAAA_0000, 0xBBBB_0000);
        assert_eq!(c.opcode, io_opcode::READ);
        assert_eq!(c.nsid, 1);
        assert_eq!(c.cdw10, 2);
        assert_eq!(c.cdw11, 1);
        assert_eq!(c.cdw12, 7);
        assert_eq!(c.prp1, 0xAAAA_0000);
        assert_eq!(c.prp2, 0xBBBB_0000);
        assert_eq!(c.cid, 0);
        assert_eq!(c.flags, 0);
        assert_eq!(c.psdt(), 0);
        let c = c.with_cid(0x1234).with_fua();
        assert_eq!(c.cid, 0x1234);
        assert_eq!(c.cdw12, 7 | 1 << 30);
    }

    #[test]
    fn write_flush_write_zeroes_encoding() {
        let w = SubmissionEntry::write(2, 0xFFFF_FFFF, 65536, 0x1000, 0);
        assert_eq!(w.opcode, io_opcode::WRITE);
        assert_eq!((w.cdw10, w.cdw11, w.cdw12), (0xFFFF_FFFF, 0, 0xFFFF));

        let f = SubmissionEntry::flush(3);
        assert_eq!(
            (f.opcode, f.nsid, f.cdw10, f.prp1),
            (io_opcode::FLUSH, 3, 0, 0)
        );

        let z = SubmissionEntry::write_zeroes(1, 0x2_0000_0010, 1, false);
        assert_eq!(z.opcode, io_opcode::WRITE_ZEROES);
        assert_eq!((z.cdw10, z.cdw11, z.cdw12), (0x10, 2, 0));
        let z = SubmissionEntry::write_zeroes(1, 0, 16, true);
        assert_eq!(z.cdw12, 15 | 1 << 25);
    }

    #[test]
    fn dsm_encoding() {
        let d = SubmissionEntry::deallocate(1, 3, 0x5000);
        assert_eq!(d.opcode, io_opcode::DATASET_MANAGEMENT);
        assert_eq!(d.cdw10, 2);
        assert_eq!(d.cdw11, dsm_attr::DEALLOCATE);
        assert_eq!(d.cdw11, 4);
        assert_eq!(d.prp1, 0x5000);
        let d = SubmissionEntry::dataset_management(1, 256, dsm_attr::INTEGRAL_READ, 0);
        assert_eq!((d.cdw10, d.cdw11), (255, 1));

        let r = DsmRange::new(0x0102_0304_0506_0708, 0x10);
        let b = r.as_bytes();
        assert_eq!(&b[0..4], &[0, 0, 0, 0]);
        assert_eq!(&b[4..8], &[0x10, 0, 0, 0]);
        assert_eq!(&b[8..16], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(DsmRange::from_bytes(b), r);
    }

    #[test]
    fn identify_encoding() {
        let c = SubmissionEntry::identify_controller(0x8000);
        assert_eq!(c.opcode, admin_opcode::IDENTIFY);
        assert_eq!((c.nsid, c.cdw10, c.prp1), (0, 1, 0x8000));
        let n = SubmissionEntry::identify_namespace(7, 0x9000);
        assert_eq!((n.nsid, n.cdw10), (7, 0));
        let l = SubmissionEntry::identify_active_ns_list(0, 0xA000);
        assert_eq!((l.nsid, l.cdw10), (0, 2));
        let g = SubmissionEntry::identify(0x13, 0, 5, 0);
        assert_eq!(g.cdw10, 5 << 16 | 0x13);
    }

    #[test]
    fn queue_management_encoding() {
        let cq = SubmissionEntry::create_io_cq(3, 1024, 0x10_0000, true, None);
        assert_eq!(cq.opcode, admin_opcode::CREATE_IO_CQ);
        assert_eq!(cq.cdw10, 1023 << 16 | 3);
        assert_eq!(cq.cdw11, 1); // PC=1, IEN=0, IV=0
        assert_eq!(cq.prp1, 0x10_0000);
        let cq = SubmissionEntry::create_io_cq(1, 65536, 0, true, Some(4));
        assert_eq!(cq.cdw10, 0xFFFF << 16 | 1);
        assert_eq!(cq.cdw11, 4 << 16 | 1 << 1 | 1);

        let sq = SubmissionEntry::create_io_sq(3, 256, 0x20_0000, 3, true, QueuePriority::Medium);
        assert_eq!(sq.opcode, admin_opcode::CREATE_IO_SQ);
        assert_eq!(sq.cdw10, 255 << 16 | 3);
        assert_eq!(sq.cdw11, 3 << 16 | 2 << 1 | 1);
        let sq = SubmissionEntry::create_io_sq(2, 2, 0, 1, false, QueuePriority::Urgent);
        assert_eq!(sq.cdw11, 1 << 16);

        let d = SubmissionEntry::delete_io_sq(9);
        assert_eq!((d.opcode, d.cdw10), (admin_opcode::DELETE_IO_SQ, 9));
        let d = SubmissionEntry::delete_io_cq(9);
        assert_eq!((d.opcode, d.cdw10), (admin_opcode::DELETE_IO_CQ, 9));
    }

    #[test]
    fn features_encoding() {
        let s = SubmissionEntry::set_num_queues(4, 2);
        assert_eq!(s.opcode, admin_opcode::SET_FEATURES);
        assert_eq!(s.cdw10, 0x07);
        assert_eq!(s.cdw11, 1 << 16 | 3);
        let g = SubmissionEntry::get_num_queues();
        assert_eq!(g.opcode, admin_opcode::GET_FEATURES);
        assert_eq!((g.cdw10, g.cdw11), (0x07, 0));
        assert_eq!(decode_num_queues(0x0003_0007), (8, 4));
        assert_eq!(decode_num_queues(0xFFFF_FFFF), (65536, 65536));

        let s = SubmissionEntry::set_features(feature::VOLATILE_WRITE_CACHE, 1, true);
        assert_eq!((s.cdw10, s.cdw11), (1 << 31 | 0x06, 1));
        let g = SubmissionEntry::get_features(
            feature::ARBITRATION,
            feature::SEL_SUPPORTED_CAPABILITIES,
            0,
        );
        assert_eq!(g.cdw10, 3 << 8 | 0x01);
    }

    #[test]
    fn log_page_encoding() {
        let s = SubmissionEntry::get_smart_log(NSID_ALL, 0x3000);
        assert_eq!(s.opcode, admin_opcode::GET_LOG_PAGE);
        assert_eq!(s.nsid, NSID_ALL);
        assert_eq!(s.cdw10, 127 << 16 | 0x02);
        assert_eq!((s.cdw11, s.cdw12, s.cdw13), (0, 0, 0));

        let e = SubmissionEntry::get_error_log(4, 0x4000, 0);
        assert_eq!(e.cdw10, 63 << 16 | 0x01);

        // 0x10001 dwords -> NUMD = 0x10000 -> NUMDL = 0, NUMDU = 1.
        let big = SubmissionEntry::get_log_page(0x02, 1, 4 * 0x1_0001, 0x1_0000_0008, 1, 2);
        assert_eq!(big.cdw10, 0x02);
        assert_eq!(big.cdw11, 1);
        assert_eq!(big.cdw12, 8);
        assert_eq!(big.cdw13, 1);
        // Non-multiple-of-4 lengths are rounded up to whole dwords.
        let odd = SubmissionEntry::get_log_page(0x02, 1, 5, 0, 0, 0);
        assert_eq!(odd.cdw10 >> 16, 1);
    }

    #[test]
    fn abort_and_dbbuf_encoding() {
        let a = SubmissionEntry::abort(2, 0x55);
        assert_eq!(a.opcode, admin_opcode::ABORT);
        assert_eq!(a.cdw10, 0x55 << 16 | 2);
        let d = SubmissionEntry::doorbell_buffer_config(0xA000, 0xB000);
        assert_eq!(d.opcode, 0x7C);
        assert_eq!((d.prp1, d.prp2), (0xA000, 0xB000));
    }

    #[test]
    fn sqe_wire_layout() {
        let c = SubmissionEntry::read(0x0102_0304, 0x1122_3344_5566_7788, 2, 0xDEAD_B000, 0)
            .with_cid(0xBEEF)
            .with_fuse(1);
        let b = c.as_bytes();
        assert_eq!(b[0], 0x02);
        assert_eq!(b[1], 0x01);
        assert_eq!(&b[2..4], &[0xEF, 0xBE]);
        assert_eq!(&b[4..8], &[0x04, 0x03, 0x02, 0x01]);
        assert_eq!(&b[24..32], &0xDEAD_B000u64.to_le_bytes());
        assert_eq!(&b[40..44], &0x5566_7788u32.to_le_bytes());
        assert_eq!(&b[44..48], &0x1122_3344u32.to_le_bytes());
        assert_eq!(&b[48..52], &1u32.to_le_bytes());
        assert_eq!(SubmissionEntry::from_bytes(b), c);
        assert_eq!(c.fuse(), 1);
        assert_eq!(SubmissionEntry::default(), SubmissionEntry::zeroed());
        assert!(SubmissionEntry::zeroed().as_bytes().iter().all(|&x| x == 0));
    }

    fn cqe(status: Status, phase: bool) -> CompletionEntry {
        CompletionEntry {
            dw0: 0xCAFE,
            dw1: 0,
            sq_head: 5,
            sq_id: 1,
            cid: 42,
            status: status.to_cqe_status(phase),
        }
    }

    #[test]
    fn status_decoding_round_trip() {
        let ok = cqe(Status::SUCCESS, true);
        assert!(ok.phase());
        assert!(ok.status().is_success());
        assert_eq!(ok.status().raw(), 0);
        assert_eq!(ok.into_result(false, io_opcode::READ), Ok(0xCAFE));

        let st = Status::new(0, 0x80).with_dnr(true);
        for phase in [false, true] {
            let e = cqe(st, phase);
            assert_eq!(e.phase(), phase);
            let s = e.status();
            assert_eq!(s, st);
            assert_eq!(s.sc(), 0x80);
            assert_eq!(s.sct(), StatusCodeType::Generic);
            assert!(s.dnr());
            assert!(!s.more());
            assert_eq!(s.crd(), 0);
            assert!(!s.is_success());
        }

        // Raw DW3 upper half: DNR | M | CRD=2 | SCT=2 | SC=0x81 | P.
        let raw: u16 = 1 << 15 | 1 << 14 | 2 << 12 | 2 << 9 | 0x81 << 1 | 1;
        let e = CompletionEntry::from_bytes(&{
            let mut b = [0u8; 16];
            b[14..16].copy_from_slice(&raw.to_le_bytes());
            b
        });
        assert!(e.phase());
        let s = e.status();
        assert_eq!(s.sct(), StatusCodeType::MediaDataIntegrity);
        assert_eq!(s.sc(), 0x81);
        assert_eq!(s.crd(), 2);
        assert!(s.more());
        assert!(s.dnr());
        assert_eq!(s.to_cqe_status(true), raw);
        assert_eq!(s.description(), "Unrecovered Read Error");

        // Phase alone is still success.
        let p = CompletionEntry::from_bytes(&{
            let mut b = [0u8; 16];
            b[14] = 1;
            b
        });
        assert!(p.status().is_success());

        let m = Status::new(1, 0x01).with_more(true).with_crd(1);
        assert!(m.more() && !m.dnr());
        assert_eq!(m.crd(), 1);
        assert_eq!(m.with_more(false).with_crd(0), Status::new(1, 1));
    }

    #[test]
    fn nvme_error_display() {
        let e = cqe(Status::new(0, 0x80).with_dnr(true), true)
            .into_result(false, io_opcode::READ)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "NVMe Read failed: Generic/LBA Out of Range (sct=0x0 sc=0x80, dnr)"
        );
        assert!(!e.is_retryable());
        assert_eq!(e.command_name(), "Read");

        let e = NvmeError::new(true, admin_opcode::CREATE_IO_SQ, Status::new(1, 0x02));
        assert_eq!(
            e.to_string(),
            "NVMe Create I/O SQ failed: Command Specific/Invalid Queue Size (sct=0x1 sc=0x02)"
        );
        assert!(e.is_retryable());
        let boxed: Box<dyn std::error::Error> = Box::new(e);
        assert!(boxed.to_string().starts_with("NVMe Create I/O SQ failed"));

        let e = NvmeError::new(
            false,
            io_opcode::WRITE,
            Status::new(2, 0x80).with_more(true),
        );
        assert_eq!(
            e.to_string(),
            "NVMe Write failed: Media and Data Integrity/Write Fault (sct=0x2 sc=0x80, more)"
        );
    }

    #[test]
    fn status_descriptions() {
        use StatusCodeType::*;
        assert_eq!(status_description(Generic, 0x00), "Successful Completion");
        assert_eq!(status_description(Generic, 0x01), "Invalid Command Opcode");
        assert_eq!(
            status_description(Generic, 0x02),
            "Invalid Field in Command"
        );
        assert_eq!(status_description(Generic, 0x03), "Command ID Conflict");
        assert_eq!(status_description(Generic, 0x07), "Command Abort Requested");
        assert_eq!(
            status_description(Generic, 0x08),
            "Command Aborted due to SQ Deletion"
        );
        assert_eq!(status_description(Generic, 0x81), "Capacity Exceeded");
        assert_eq!(status_description(Generic, 0x82), "Namespace Not Ready");
        assert_eq!(status_description(Generic, 0x17), "Unknown Generic Status");
        assert_eq!(
            status_description(CommandSpecific, 0x01),
            "Invalid Queue Identifier"
        );
        assert_eq!(
            status_description(CommandSpecific, 0x0C),
            "Invalid Queue Deletion"
        );
        assert_eq!(status_description(MediaDataIntegrity, 0x80), "Write Fault");
        assert_eq!(
            status_description(MediaDataIntegrity, 0x85),
            "Compare Failure"
        );
        assert_eq!(
            status_description(PathRelated, 0x71),
            "Command Aborted By Host"
        );
        assert_eq!(status_description(VendorSpecific, 0x12), "Vendor Specific");
        assert_eq!(status_description(Reserved(5), 0), "Reserved");
        for raw in 0..8u8 {
            assert_eq!(StatusCodeType::from_raw(raw).raw(), raw);
        }
        assert_eq!(StatusCodeType::from_raw(4), Reserved(4));
        assert_eq!(StatusCodeType::from_raw(7), VendorSpecific);
    }

    #[test]
    fn opcode_names() {
        assert_eq!(opcode_name(false, io_opcode::READ), "Read");
        assert_eq!(opcode_name(false, io_opcode::WRITE_ZEROES), "Write Zeroes");
        assert_eq!(opcode_name(false, 0x09), "Dataset Management");
        assert_eq!(opcode_name(false, 0x90), "Vendor Specific I/O Command");
        assert_eq!(opcode_name(false, 0x03), "Unknown I/O Command");
        assert_eq!(opcode_name(true, 0x02), "Get Log Page");
        assert_eq!(opcode_name(true, 0x06), "Identify");
        assert_eq!(opcode_name(true, 0x7C), "Doorbell Buffer Config");
        assert_eq!(opcode_name(true, 0xC5), "Vendor Specific Admin Command");
        assert_eq!(opcode_name(true, 0x03), "Unknown Admin Command");
    }

    #[test]
    fn cap_qemu() {
        // QEMU hw/nvme: MQES=0x7ff, CQR=1, TO=0xf, CSS=NVM|IOCS|NOIOCS, MPSMAX=4.
        let cap = Cap(0x0040_1820_0F01_07FF);
        assert_eq!(cap.mqes(), 0x7FF);
        assert_eq!(cap.max_queue_entries(), 2048);
        assert!(cap.cqr());
        assert_eq!(cap.ams(), 0);
        assert_eq!(cap.to(), 15);
        assert_eq!(cap.timeout(), Duration::from_millis(7500));
        assert_eq!(cap.dstrd(), 0);
        assert_eq!(cap.doorbell_stride_bytes(), 4);
        assert!(!cap.nssrs());
        assert_eq!(cap.css(), 0xC1);
        assert!(cap.supports_nvm_command_set());
        assert!(!cap.bps());
        assert_eq!(cap.mpsmin(), 0);
        assert_eq!(cap.mpsmax(), 4);
        assert_eq!(cap.min_page_size(), 4096);
        assert_eq!(cap.max_page_size(), 65536);
        assert!(!cap.cmbs() && !cap.pmrs());

        // Synthetic: every field non-zero.
        let cap = Cap(0x0321_1032_FF07_FFFF);
        assert_eq!(cap.mqes(), 0xFFFF);
        assert_eq!(cap.max_queue_entries(), 65536);
        assert!(cap.cqr());
        assert_eq!(cap.ams(), 3);
        assert_eq!(cap.to(), 0xFF);
        assert_eq!(cap.dstrd(), 2);
        assert_eq!(cap.doorbell_stride_bytes(), 16);
        assert!(cap.nssrs());
        assert_eq!(cap.css(), 0x81);
        assert_eq!(cap.mpsmin(), 1);
        assert_eq!(cap.mpsmax(), 2);
        assert_eq!(cap.min_page_size(), 8192);
        assert!(cap.cmbs() && cap.pmrs());
    }

    #[test]
    fn cc_csts_aqa_vs() {
        let cc = Cc::nvm_default(0).with_enable(true);
        assert_eq!(cc.0, 0x0046_0001);
        assert!(cc.en());
        assert_eq!((cc.css(), cc.mps(), cc.ams()), (0, 0, 0));
        assert_eq!((cc.iosqes(), cc.iocqes()), (6, 4));
        assert_eq!(cc.page_size(), 4096);
        let cc = cc
            .with_shn(Cc::SHN_NORMAL)
            .with_mps(4)
            .with_ams(Cc::AMS_WRR);
        assert_eq!(cc.shn(), 1);
        assert_eq!(cc.mps(), 4);
        assert_eq!(cc.ams(), 1);
        assert_eq!(cc.0, 0x0046_4A01);
        assert!(!cc.with_enable(false).en());
        assert_eq!(Cc::mps_for_page_size(4096), Some(0));
        assert_eq!(Cc::mps_for_page_size(65536), Some(4));
        assert_eq!(Cc::mps_for_page_size(2048), None);
        assert_eq!(Cc::mps_for_page_size(5000), None);

        let csts = Csts(0b10_1011);
        assert!(csts.rdy() && csts.cfs());
        assert_eq!(csts.shst(), Csts::SHST_COMPLETE);
        assert!(csts.shutdown_complete());
        assert!(!csts.nssro());
        assert!(csts.pp());
        assert!(Csts(u32::MAX).is_all_ones());

        let aqa = Aqa::new(32, 32);
        assert_eq!(aqa.0, 0x001F_001F);
        assert_eq!((aqa.sq_entries(), aqa.cq_entries()), (32, 32));
        let aqa = Aqa::new(4096, 2);
        assert_eq!((aqa.asqs(), aqa.acqs()), (0xFFF, 1));

        let vs = Vs(0x0001_0400);
        assert_eq!((vs.major(), vs.minor(), vs.tertiary()), (1, 4, 0));
        assert_eq!(vs.to_string(), "1.4.0");
        assert_eq!(Vs::new(1, 2, 1).0, 0x0001_0201);
        assert!(Vs::V1_3 < Vs::V1_4 && Vs::V1_4 < Vs::V2_0);
        assert_eq!(Vs::V2_0.to_string(), "2.0.0");
    }

    #[test]
    fn doorbell_offsets() {
        assert_eq!(sq_tail_doorbell(0, 0), 0x1000);
        assert_eq!(cq_head_doorbell(0, 0), 0x1004);
        assert_eq!(sq_tail_doorbell(1, 0), 0x1008);
        assert_eq!(cq_head_doorbell(1, 0), 0x100C);
        assert_eq!(sq_tail_doorbell(0, 2), 0x1000);
        assert_eq!(cq_head_doorbell(0, 2), 0x1010);
        assert_eq!(sq_tail_doorbell(1, 2), 0x1020);
        assert_eq!(cq_head_doorbell(1, 2), 0x1030);
        assert_eq!(sq_tail_doorbell(0xFFFF, 0), 0x1000 + 0xFFFF * 8);
        assert_eq!(shadow_sq_tail_index(1, 0), 2);
        assert_eq!(shadow_cq_head_index(1, 0), 3);
        assert_eq!(shadow_cq_head_index(1, 2), 12);
        assert_eq!(reg::CAP, 0);
        assert_eq!(reg::CSTS, 0x1C);
        assert_eq!(reg::ACQ, 0x30);
    }

    #[test]
    fn shadow_doorbell_events() {
        // Controller wants an event once the tail passes 5.
        assert!(shadow_doorbell_need_event(5, 6, 4));
        assert!(shadow_doorbell_need_event(5, 6, 5));
        assert!(!shadow_doorbell_need_event(5, 5, 4));
        assert!(!shadow_doorbell_need_event(10, 8, 4));
        // Wrap-around.
        assert!(shadow_doorbell_need_event(0xFFFF, 1, 0xFFFE));
        assert!(!shadow_doorbell_need_event(2, 1, 0xFFFE));
    }

    fn put(buf: &mut [u8], off: usize, data: &[u8]) {
        buf[off..off + data.len()].copy_from_slice(data);
    }

    #[test]
    fn identify_controller_parse() {
        let mut b = [0u8; 4096];
        put(&mut b, 0, &0x1B36u16.to_le_bytes());
        put(&mut b, 2, &0x1AF4u16.to_le_bytes());
        put(&mut b, 4, b"deadbeef            ");
        put(&mut b, 24, b"QEMU NVMe Ctrl                          ");
        put(&mut b, 64, b"8.2.0   ");
        b[77] = 0;
        put(&mut b, 78, &0x0042u16.to_le_bytes());
        put(&mut b, 80, &0x0001_0400u32.to_le_bytes());
        put(&mut b, 256, &(1u16 << 8 | 1 << 1).to_le_bytes());
        b[258] = 3;
        put(&mut b, 280, &(1u128 << 70 | 5).to_le_bytes());
        b[512] = 0x66;
        b[513] = 0x44;
        put(&mut b, 516, &256u32.to_le_bytes());
        put(&mut b, 520, &0b1100u16.to_le_bytes());
        b[525] = 1;
        put(&mut b, 536, &1u32.to_le_bytes());
        put(&mut b, 768, b"nqn.2019-08.org.qemu:deadbeef");

        let id = IdentifyController::from_bytes(&b);
        assert_eq!(id.vid, 0x1B36);
        assert_eq!(id.ssvid, 0x1AF4);
        assert_eq!(id.serial(), "deadbeef");
        assert_eq!(id.model(), "QEMU NVMe Ctrl");
        assert_eq!(id.firmware(), "8.2.0");
        assert_eq!(id.cntlid, 0x42);
        assert_eq!(id.version(), Vs::V1_4);
        assert_eq!(id.mdts_bytes(4096), None);
        assert!(id.supports_dbbuf());
        assert_eq!(id.abort_limit(), 4);
        assert_eq!(id.total_nvm_capacity(), 1u128 << 70 | 5);
        assert_eq!((id.sqes_min(), id.sqes_max()), (6, 6));
        assert_eq!((id.cqes_min(), id.cqes_max()), (4, 4));
        assert_eq!(id.nn, 256);
        assert!(id.supports_dsm());
        assert!(id.supports_write_zeroes());
        assert!(!id.supports_compare());
        assert!(id.volatile_write_cache());
        assert!(id.supports_sgl());
        assert_eq!(id.subsystem_nqn(), "nqn.2019-08.org.qemu:deadbeef");
        assert_eq!(id.as_bytes(), &b);
        assert!(format!("{id:?}").contains("QEMU NVMe Ctrl"));

        let mut b2 = b;
        b2[77] = 5;
        b2[256] = 0;
        b2[257] = 0;
        b2[520] = 0;
        b2[525] = 0;
        b2[536] = 0;
        let id2 = IdentifyController::from_prefix(&b2).unwrap();
        assert_eq!(id2.mdts_bytes(4096), Some(128 * 1024));
        assert_eq!(id2.mdts_bytes(8192), Some(256 * 1024));
        assert!(!id2.supports_dbbuf());
        assert!(!id2.supports_dsm() && !id2.supports_write_zeroes());
        assert!(!id2.volatile_write_cache());
        assert!(!id2.supports_sgl());

        b2[77] = 0xFF;
        assert_eq!(IdentifyController::from_bytes(&b2).mdts_bytes(4096), None);
        assert!(IdentifyController::from_prefix(&b2[..4095]).is_none());

        let blank = IdentifyController::default();
        assert_eq!(blank.serial(), "");
        assert_eq!(blank.as_bytes(), &[0u8; 4096]);
    }

    #[test]
    fn identify_namespace_formats() {
        let mut b = [0u8; 4096];
        put(&mut b, 0, &0x20_0000u64.to_le_bytes());
        put(&mut b, 8, &0x20_0000u64.to_le_bytes());
        b[24] = 1; // thin provisioning
        b[25] = 3; // 4 formats
        b[26] = 0x12; // format 2, extended metadata
        put(&mut b, 120, &[1, 2, 3, 4, 5, 6, 7, 8]);
        // lbaf[0] = 512 B, no metadata; lbaf[2] = 4096 B + 8 B metadata
        put(&mut b, 128, &[0, 0, 9, 0]);
        put(&mut b, 128 + 2 * 4, &[8, 0, 12, 2]);

        let ns = IdentifyNamespace::from_bytes(&b);
        assert_eq!(ns.nsze, 0x20_0000);
        assert_eq!(ns.num_lba_formats(), 4);
        assert_eq!(ns.current_format_index(), 2);
        assert_eq!(ns.block_size(), 4096);
        assert_eq!(ns.metadata_size(), 8);
        assert!(ns.extended_metadata());
        assert!(ns.thin_provisioned());
        assert_eq!(ns.size_bytes(), 0x20_0000 * 4096);
        assert_eq!(ns.lba_format(0).unwrap().data_size(), 512);
        assert_eq!(ns.current_format().relative_performance(), 2);
        assert_eq!(ns.lba_format(4), None);
        assert_eq!(ns.eui64, [1, 2, 3, 4, 5, 6, 7, 8]);

        // With <= 16 formats, FLBAS bits 6:5 are ignored.
        b[26] = 0x60 | 0x01;
        let ns = IdentifyNamespace::from_bytes(&b);
        assert_eq!(ns.current_format_index(), 1);
        assert!(!ns.extended_metadata());

        // NVMe 2.0: > 16 formats, FLBAS bits 6:5 are the index's upper bits.
        b[25] = 19; // 20 formats
        b[26] = 0x20 | 0x01; // index 0b01_0001 = 17
        put(&mut b, 128 + 17 * 4, &[16, 0, 13, 0]);
        let ns = IdentifyNamespace::from_bytes(&b);
        assert_eq!(ns.current_format_index(), 17);
        assert_eq!(ns.block_size(), 8192);
        assert_eq!(ns.metadata_size(), 16);
        assert_eq!(ns.lba_format(17), Some(ns.lbaf_ext[1]));
        assert_eq!(ns.lba_format(20), None);
        assert!(format!("{ns:?}").contains("nsze"));
    }

    #[test]
    fn ns_list_parse() {
        let mut b = [0u8; 4096];
        put(&mut b, 0, &1u32.to_le_bytes());
        put(&mut b, 4, &2u32.to_le_bytes());
        put(&mut b, 8, &7u32.to_le_bytes());
        put(&mut b, 16, &9u32.to_le_bytes()); // after the terminating zero
        assert_eq!(parse_ns_list(&b), vec![1, 2, 7]);
        assert!(parse_ns_list(&[0u8; 4096]).is_empty());
    }

    #[test]
    fn smart_log_parse() {
        let mut b = [0u8; 512];
        b[0] = critical_warning::TEMPERATURE | critical_warning::READ_ONLY;
        put(&mut b, 1, &319u16.to_le_bytes());
        b[3] = 100;
        b[4] = 10;
        b[5] = 3;
        let big = 0x0123_4567_89AB_CDEF_FEDC_BA98_7654_3210u128;
        put(&mut b, 32, &big.to_le_bytes());
        put(&mut b, 48, &1000u128.to_le_bytes());
        put(&mut b, 64, &5u128.to_le_bytes());
        put(&mut b, 80, &6u128.to_le_bytes());
        put(&mut b, 96, &7u128.to_le_bytes());
        put(&mut b, 112, &8u128.to_le_bytes());
        put(&mut b, 128, &9u128.to_le_bytes());
        put(&mut b, 144, &10u128.to_le_bytes());
        put(&mut b, 160, &(u128::from(u64::MAX) + 1).to_le_bytes());
        put(&mut b, 176, &12u128.to_le_bytes());
        put(&mut b, 192, &13u32.to_le_bytes());
        put(&mut b, 200, &300u16.to_le_bytes());

        let s = SmartLog::from_bytes(&b);
        assert_eq!(s.critical_warning, 0b1010);
        assert_eq!(s.temperature_kelvin(), 319);
        assert_eq!(s.temperature_celsius(), 46);
        assert_eq!(
            (s.avail_spare, s.spare_thresh, s.percent_used),
            (100, 10, 3)
        );
        assert_eq!(s.data_units_read(), big);
        assert_eq!(s.data_units_written(), 1000);
        assert_eq!(s.bytes_written(), 512_000_000);
        assert_eq!(s.host_read_commands(), 5);
        assert_eq!(s.host_write_commands(), 6);
        assert_eq!(s.controller_busy_time(), 7);
        assert_eq!(s.power_cycles(), 8);
        assert_eq!(s.power_on_hours(), 9);
        assert_eq!(s.unsafe_shutdowns(), 10);
        assert_eq!(s.media_errors(), 1u128 << 64);
        assert_eq!(s.num_err_log_entries(), 12);
        assert_eq!(s.warning_temp_time, 13);
        assert_eq!(s.temp_sensors[0], 300);
        assert_eq!(s.as_bytes(), &b);

        let mut cold = [0u8; 512];
        put(&mut cold, 1, &263u16.to_le_bytes());
        assert_eq!(SmartLog::from_bytes(&cold).temperature_celsius(), -10);
    }

    #[test]
    fn error_log_parse() {
        let mut b = [0u8; 64];
        put(&mut b, 0, &3u64.to_le_bytes());
        put(&mut b, 8, &1u16.to_le_bytes());
        put(&mut b, 10, &0x22u16.to_le_bytes());
        put(
            &mut b,
            12,
            &Status::new(2, 0x81)
                .with_dnr(true)
                .to_cqe_status(true)
                .to_le_bytes(),
        );
        put(&mut b, 16, &0x1234u64.to_le_bytes());
        put(&mut b, 24, &1u32.to_le_bytes());
        let e = ErrorLogEntry::from_bytes(&b);
        assert!(e.is_valid());
        assert_eq!((e.error_count, e.sqid, e.cid), (3, 1, 0x22));
        assert_eq!(e.status().sct(), StatusCodeType::MediaDataIntegrity);
        assert_eq!(e.status().sc(), 0x81);
        assert!(e.status().dnr());
        assert_eq!((e.lba, e.nsid), (0x1234, 1));
        assert!(!ErrorLogEntry::default().is_valid());
    }

    #[test]
    fn prp_entries() {
        const PS: u64 = 4096;
        assert_eq!(prp_entries_needed(0x1000, 0, PS), 0);
        // Exact page.
        assert_eq!(prp_entries_needed(0x1000, 4096, PS), 1);
        // Small, within one page, unaligned.
        assert_eq!(prp_entries_needed(0x1FFF, 1, PS), 1);
        // Crossing a page boundary by one byte.
        assert_eq!(prp_entries_needed(0x1FFF, 2, PS), 2);
        assert_eq!(prp_entries_needed(0x1000, 4097, PS), 2);
        // Unaligned start, one page worth of data -> two pages.
        assert_eq!(prp_entries_needed(0x1008, 4096, PS), 2);
        // Aligned two pages vs unaligned two pages.
        assert_eq!(prp_entries_needed(0, 8192, PS), 2);
        assert_eq!(prp_entries_needed(0x800, 8192, PS), 3);
        // 128 KiB aligned.
        assert_eq!(prp_entries_needed(0x10_0000, 128 * 1024, PS), 32);
        // Larger page size.
        assert_eq!(prp_entries_needed(0x1000, 8192, 65536), 1);
        // Huge length does not overflow.
        assert!(prp_entries_needed(0xFFF, u64::MAX, PS) > 0);

        assert_eq!(prp_list_entries_needed(0x1000, 4096, PS), 0);
        assert_eq!(prp_list_entries_needed(0, 8192, PS), 0);
        assert_eq!(prp_list_entries_needed(0x800, 8192, PS), 2);
        assert_eq!(prp_list_entries_needed(0, 128 * 1024, PS), 31);
    }

    #[test]
    #[should_panic(expected = "power of two")]
    fn prp_entries_bad_page_size() {
        prp_entries_needed(0, 1, 3000);
    }

    #[test]
    fn struct_sizes_and_defaults() {
        assert_eq!(SubmissionEntry::SIZE, 64);
        assert_eq!(CompletionEntry::SIZE, 16);
        assert_eq!(DsmRange::SIZE, 16);
        assert_eq!(IdentifyController::SIZE, 4096);
        assert_eq!(IdentifyNamespace::SIZE, 4096);
        assert_eq!(SmartLog::SIZE, 512);
        assert_eq!(ErrorLogEntry::SIZE, 64);
        assert_eq!(LbaFormat::SIZE, 4);
        assert_eq!(PowerStateDescriptor::SIZE, 32);
        assert_eq!(offset_of!(IdentifyController, mdts), 77);
        assert_eq!(offset_of!(IdentifyController, oacs), 256);
        assert_eq!(offset_of!(IdentifyController, subnqn), 768);
        assert_eq!(offset_of!(IdentifyNamespace, lbaf), 128);
        assert!(
            IdentifyNamespace::default()
                .as_bytes()
                .iter()
                .all(|&x| x == 0)
        );
        assert!(SmartLog::default().as_bytes().iter().all(|&x| x == 0));
        assert_eq!(QueuePriority::default(), QueuePriority::Medium);
    }
}
