//! Admin commands: Identify, features, queue creation and deletion, logs, Abort, Doorbell
//! Buffer Config, Asynchronous Event Request, Keep Alive.

use std::collections::VecDeque;

use super::device::{Cq, Device, ERROR_LOG_ENTRIES, OK, Outcome, Sq, generic, sc, specific};
use super::host::dma;
use super::io::walk_prps;
use super::{SIM_SSVID, lock};
use crate::nvme::spec::{
    self, IdentifyController, IdentifyNamespace, SmartLog, Status, SubmissionEntry,
    admin_opcode as op, cns, feature, log_page,
};

/// Asynchronous Event Requests the model accepts at once (Identify AERL + 1).
const AER_LIMIT: usize = 4;
/// Identify OAES: Namespace Attribute Notices (bit 8) and Firmware Activation Notices (bit 9).
const OAES: u32 = 1 << 8 | 1 << 9;
/// Identify SGLS with SGLs on: supported, no alignment or granularity requirement; no Bit
/// Bucket, no metadata SGLs, no offsets in Segment descriptors.
const SGLS_SUPPORTED: u32 = 0x1;
/// Size of the Host Behavior Support data structure.
const HOST_BEHAVIOR_BYTES: usize = 512;
/// Get Log Page CDW10 bit 15: Retain Asynchronous Event.
const LOG_RAE: u32 = 1 << 15;

fn err(s: Status) -> Outcome {
    (s, 0)
}

fn put_ascii(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    let b = s.as_bytes();
    let n = b.len().min(dst.len());
    dst[..n].copy_from_slice(&b[..n]);
}

impl Device {
    pub(super) fn admin_command(&mut self, e: &SubmissionEntry) {
        self.sh.stats.admin.add(1);
        if let Some(delay) = self.fault_late(e.opcode) {
            self.late_admin
                .push((std::time::Instant::now() + delay, *e));
            return;
        }
        self.execute_admin(e);
    }

    /// Executes and completes a fetched admin command.
    pub(super) fn execute_admin(&mut self, e: &SubmissionEntry) {
        if let Some(s) = self.fault_status(true, e.opcode) {
            self.finish_admin(e, s, 0);
            return;
        }
        if e.psdt() != 0 {
            // Admin commands on PCIe describe their data with PRPs only.
            self.finish_admin(e, generic(sc::INVALID_FIELD), 0);
            return;
        }
        let (status, dw0) = match e.opcode {
            op::IDENTIFY => self.identify(e),
            op::GET_FEATURES => self.get_features(e),
            op::SET_FEATURES => self.set_features(e),
            op::CREATE_IO_CQ => self.create_cq(e),
            op::CREATE_IO_SQ => self.create_sq(e),
            op::DELETE_IO_SQ => self.delete_sq(e),
            op::DELETE_IO_CQ => self.delete_cq(e),
            op::GET_LOG_PAGE => self.get_log_page(e),
            op::ABORT => {
                let sqid = e.cdw10 as u16;
                let cid = (e.cdw10 >> 16) as u16;
                // dw0 bit 0 = 0: the command was aborted; 1: it was not.
                (Status::SUCCESS, !self.abort(sqid, cid) as u32)
            }
            op::DOORBELL_BUFFER_CONFIG if self.cfg.dbbuf => self.doorbell_buffer_config(e),
            op::ASYNC_EVENT_REQUEST => {
                if self.aer_count() >= AER_LIMIT {
                    err(specific(sc::AER_LIMIT))
                } else {
                    // Outstanding until an event is reported on it or the controller resets.
                    self.hold(0, e.cid, true);
                    self.deliver_events();
                    return;
                }
            }
            op::KEEP_ALIVE => OK,
            _ => err(generic(sc::INVALID_OPCODE)),
        };
        self.finish_admin(e, status, dw0);
    }

    /// Copies `out.len()` bytes from the host buffer of `e` (PRP1/PRP2) into `out`.
    fn read_host(&self, e: &SubmissionEntry, out: &mut [u8]) -> Result<(), Status> {
        let dst = out.as_mut_ptr();
        walk_prps(
            e.prp1,
            e.prp2,
            out.len() as u64,
            self.page_size,
            |addr, o, n| {
                // `o + n <= out.len()`: the walk never exceeds the requested length.
                dma::read_into(addr, dst.wrapping_add(o as usize), n)
            },
        )
    }

    /// Copies `data` to the host buffer of `e` (PRP1/PRP2), zero-padding to `len` bytes.
    fn to_host(&self, e: &SubmissionEntry, data: &[u8], len: usize) -> Result<(), Status> {
        walk_prps(e.prp1, e.prp2, len as u64, self.page_size, |addr, o, n| {
            let o = o as usize;
            let have = data.len().saturating_sub(o).min(n);
            if have > 0 {
                dma::write_from(addr, data[o..].as_ptr(), have);
            }
            if have < n {
                dma::zero(addr + have as u64, n - have);
            }
        })
    }

    fn identify(&mut self, e: &SubmissionEntry) -> Outcome {
        let cns_v = e.cdw10 as u8;
        let data: Vec<u8> = match cns_v {
            cns::NAMESPACE => match self.identify_ns(e.nsid) {
                Ok(d) => d.as_bytes().to_vec(),
                Err(s) => return err(s),
            },
            cns::CONTROLLER => self.identify_ctrl().as_bytes().to_vec(),
            cns::ACTIVE_NS_LIST => {
                if !self.cfg.active_ns_list {
                    return err(generic(sc::INVALID_FIELD));
                }
                if e.nsid >= 0xFFFF_FFFE {
                    return err(generic(sc::INVALID_NAMESPACE));
                }
                (e.nsid + 1..=self.sh.ns.len() as u32)
                    .take(1024)
                    .flat_map(u32::to_le_bytes)
                    .collect()
            }
            cns::NS_ID_DESCRIPTOR_LIST => {
                if self.identify_ns(e.nsid).is_err() {
                    return err(generic(sc::INVALID_NAMESPACE));
                }
                // One NGUID descriptor (type 2, length 16).
                let mut d = vec![2u8, 0, 16, 0];
                d.extend_from_slice(&nguid(e.nsid));
                d
            }
            _ => return err(generic(sc::INVALID_FIELD)),
        };
        match self.to_host(e, &data, 4096) {
            Ok(()) => OK,
            Err(s) => err(s),
        }
    }

    fn identify_ns(&self, nsid: u32) -> Result<IdentifyNamespace, Status> {
        if nsid == 0 || nsid as usize > self.sh.ns.len() {
            return Err(generic(sc::INVALID_NAMESPACE));
        }
        let n = &self.sh.ns[nsid as usize - 1];
        let blocks = n.blocks();
        let mut d = IdentifyNamespace::zeroed();
        d.nsze = blocks;
        d.ncap = blocks;
        d.nuse = blocks;
        d.nlbaf = 0;
        d.flbas = 0;
        // Deallocated blocks read as zeros (bits 2:0 = 001b); Write Zeroes DEAC supported.
        d.dlfeat = 0x09;
        d.lbaf[0].lbads = n.block_size.trailing_zeros() as u8;
        d.nvmcap = (blocks as u128 * n.block_size as u128).to_le_bytes();
        d.nguid = nguid(nsid);
        d.eui64 = nguid(nsid)[8..].try_into().unwrap_or([0; 8]);
        Ok(d)
    }

    fn identify_ctrl(&self) -> IdentifyController {
        let cfg = &self.cfg;
        let mut c = IdentifyController::zeroed();
        c.vid = cfg.pci_id.0;
        c.ssvid = SIM_SSVID;
        put_ascii(&mut c.sn, &cfg.serial);
        put_ascii(&mut c.mn, &cfg.model);
        put_ascii(&mut c.fr, &lock(&self.sh.events.firmware));
        c.oaes = OAES;
        [c.crdt1, c.crdt2, c.crdt3] = cfg.crdt;
        c.rab = 6;
        c.mdts = cfg.mdts;
        c.cntlid = 1;
        c.ver = spec::Vs::V1_4.0;
        c.cntrltype = 1; // I/O controller
        c.oacs = if cfg.dbbuf {
            IdentifyController::OACS_DBBUF
        } else {
            0
        };
        c.acl = 3;
        c.aerl = (AER_LIMIT - 1) as u8;
        c.frmw = 0x03; // slot 1 read-only, one slot
        c.elpe = (ERROR_LOG_ENTRIES - 1) as u8;
        c.wctemp = 343;
        c.cctemp = 353;
        let total: u128 = self
            .sh
            .ns
            .iter()
            .map(|n| n.blocks() as u128 * n.block_size as u128)
            .sum();
        c.tnvmcap = total.to_le_bytes();
        c.sqes = 0x66;
        c.cqes = 0x44;
        c.nn = self.sh.ns.len() as u32;
        c.oncs = IdentifyController::ONCS_DSM | IdentifyController::ONCS_WRITE_ZEROES;
        // VWC present, Flush with NSID FFFFFFFFh supported (bits 2:1 = 11b).
        c.vwc = if cfg.vwc { 0x07 } else { 0 };
        c.sgls = if cfg.sgl { SGLS_SUPPORTED } else { 0 };
        let nqn = format!("nqn.2026-11.io.rio:sim:{}", cfg.serial);
        let n = nqn.len().min(255);
        c.subnqn[..n].copy_from_slice(&nqn.as_bytes()[..n]);
        c.psd[0].mp = 2500; // 25 W in 0.01 W units
        c
    }

    fn get_features(&mut self, e: &SubmissionEntry) -> Outcome {
        let fid = e.cdw10 as u8;
        let sel = ((e.cdw10 >> 8) & 7) as u8;
        if sel == feature::SEL_SUPPORTED_CAPABILITIES {
            // Nothing is saveable; everything is changeable.
            return (Status::SUCCESS, 0x4);
        }
        match fid {
            feature::NUMBER_OF_QUEUES => {
                let (s, c) = if sel == feature::SEL_CURRENT {
                    (self.granted_sqs, self.granted_cqs)
                } else {
                    (self.cfg.max_io_queues, self.cfg.max_io_queues)
                };
                (Status::SUCCESS, (c as u32 - 1) << 16 | (s as u32 - 1))
            }
            feature::VOLATILE_WRITE_CACHE if self.cfg.vwc => {
                let on = if sel == feature::SEL_CURRENT {
                    self.vwc_enabled
                } else {
                    true
                };
                (Status::SUCCESS, on as u32)
            }
            feature::TEMPERATURE_THRESHOLD => (Status::SUCCESS, 343),
            feature::ASYNC_EVENT_CONFIG => {
                let v = if sel == feature::SEL_CURRENT {
                    self.aec
                } else {
                    0
                };
                (Status::SUCCESS, v)
            }
            feature::HOST_BEHAVIOR_SUPPORT => {
                let mut d = [0u8; HOST_BEHAVIOR_BYTES];
                if sel == feature::SEL_CURRENT {
                    d[0] = self.acre;
                }
                match self.to_host(e, &d, HOST_BEHAVIOR_BYTES) {
                    Ok(()) => OK,
                    Err(s) => err(s),
                }
            }
            feature::ARBITRATION
            | feature::POWER_MANAGEMENT
            | feature::ERROR_RECOVERY
            | feature::INTERRUPT_COALESCING
            | feature::INTERRUPT_VECTOR_CONFIG
            | feature::WRITE_ATOMICITY => OK,
            _ => err(generic(sc::INVALID_FIELD)),
        }
    }

    fn set_features(&mut self, e: &SubmissionEntry) -> Outcome {
        let fid = e.cdw10 as u8;
        if e.cdw10 >> 31 != 0 {
            // Save is not supported (ONCS bit 4 clear).
            return err(specific(0x0D));
        }
        match fid {
            feature::NUMBER_OF_QUEUES => {
                let nsqr = e.cdw11 & 0xFFFF;
                let ncqr = e.cdw11 >> 16;
                if nsqr == 0xFFFF || ncqr == 0xFFFF {
                    return err(generic(sc::INVALID_FIELD));
                }
                if !self.io_sqs.is_empty() || self.cqs.iter().skip(1).any(Option::is_some) {
                    return err(generic(sc::COMMAND_SEQUENCE_ERROR));
                }
                let max = self.cfg.max_io_queues as u32;
                self.granted_sqs = (nsqr + 1).min(max) as u16;
                self.granted_cqs = (ncqr + 1).min(max) as u16;
                (
                    Status::SUCCESS,
                    (self.granted_cqs as u32 - 1) << 16 | (self.granted_sqs as u32 - 1),
                )
            }
            feature::VOLATILE_WRITE_CACHE if self.cfg.vwc => {
                self.vwc_enabled = e.cdw11 & 1 != 0;
                // Turning the cache off writes it back first.
                if !self.vwc_enabled
                    && let Some(c) = self.cache.as_mut()
                {
                    c.flush(None);
                }
                OK
            }
            feature::ASYNC_EVENT_CONFIG => {
                self.aec = e.cdw11;
                OK
            }
            feature::HOST_BEHAVIOR_SUPPORT => {
                let mut d = [0u8; HOST_BEHAVIOR_BYTES];
                if let Err(s) = self.read_host(e, &mut d) {
                    return err(s);
                }
                // ACRE is 0 or 1; other values are reserved.
                if d[0] > 1 {
                    return err(generic(sc::INVALID_FIELD));
                }
                self.acre = d[0];
                OK
            }
            feature::ARBITRATION
            | feature::POWER_MANAGEMENT
            | feature::TEMPERATURE_THRESHOLD
            | feature::ERROR_RECOVERY
            | feature::INTERRUPT_COALESCING
            | feature::INTERRUPT_VECTOR_CONFIG
            | feature::WRITE_ATOMICITY
            | feature::TIMESTAMP
            | feature::KEEP_ALIVE_TIMER => OK,
            _ => err(generic(sc::INVALID_FIELD)),
        }
    }

    /// Common checks of Create I/O CQ/SQ: CC entry sizes, PC, base address, size.
    fn queue_common(&self, e: &SubmissionEntry) -> Result<(u16, u32), Status> {
        if self.cc.iosqes() != spec::IOSQES || self.cc.iocqes() != spec::IOCQES {
            return Err(generic(sc::INVALID_FIELD));
        }
        let qid = e.cdw10 as u16;
        let qsize = e.cdw10 >> 16; // 0-based
        if e.cdw11 & 1 == 0 {
            // CAP.CQR = 1: only physically contiguous queues.
            return Err(generic(sc::INVALID_FIELD));
        }
        if qsize == 0 || qsize > self.cfg.mqes as u32 {
            return Err(specific(sc::INVALID_QSIZE));
        }
        if e.prp1 == 0 || !e.prp1.is_multiple_of(self.page_size) {
            return Err(generic(sc::INVALID_FIELD));
        }
        Ok((qid, qsize + 1))
    }

    fn create_cq(&mut self, e: &SubmissionEntry) -> Outcome {
        let qid = e.cdw10 as u16;
        if qid == 0 || qid > self.granted_cqs || self.cqs[qid as usize].is_some() {
            return err(specific(sc::INVALID_QID));
        }
        let (qid, size) = match self.queue_common(e) {
            Ok(v) => v,
            Err(s) => return err(s),
        };
        self.cqs[qid as usize] = Some(Cq {
            base: e.prp1,
            size,
            tail: 0,
            head: 0,
            phase: true,
            backlog: VecDeque::with_capacity(size as usize + 2),
            users: 0,
        });
        OK
    }

    fn create_sq(&mut self, e: &SubmissionEntry) -> Outcome {
        let qid = e.cdw10 as u16;
        if qid == 0 || qid > self.granted_sqs || self.sqs[qid as usize].is_some() {
            return err(specific(sc::INVALID_QID));
        }
        let cqid = (e.cdw11 >> 16) as u16;
        if cqid == 0 || cqid as usize >= self.cqs.len() || self.cqs[cqid as usize].is_none() {
            return err(specific(sc::CQ_INVALID));
        }
        let (qid, size) = match self.queue_common(e) {
            Ok(v) => v,
            Err(s) => return err(s),
        };
        if self.dbbuf.is_some() {
            self.sh.bar.store(
                spec::sq_tail_doorbell(qid, self.cfg.dstrd),
                super::device::DOORBELL_IDLE,
            );
        }
        self.sqs[qid as usize] = Some(Sq {
            base: e.prp1,
            size,
            head: 0,
            cqid,
            inflight: 0,
            armed: false,
            known_tail: 0,
        });
        if let Some(cq) = self.cqs[cqid as usize].as_mut() {
            cq.users += 1;
        }
        self.reserve_for_sq(cqid, size);
        self.io_sqs.push(qid);
        OK
    }

    fn delete_sq(&mut self, e: &SubmissionEntry) -> Outcome {
        let qid = e.cdw10 as u16;
        if qid == 0 || qid as usize >= self.sqs.len() || self.sqs[qid as usize].is_none() {
            return err(specific(sc::INVALID_QID));
        }
        self.abort_sq_commands(qid);
        if let Some(sq) = self.sqs[qid as usize].take()
            && let Some(cq) = self.cqs[sq.cqid as usize].as_mut()
        {
            cq.users -= 1;
        }
        self.io_sqs.retain(|&q| q != qid);
        // Shadow/MMIO tail of a deleted queue restarts at 0 on re-creation.
        self.sh
            .bar
            .store(spec::sq_tail_doorbell(qid, self.cfg.dstrd), 0);
        OK
    }

    fn delete_cq(&mut self, e: &SubmissionEntry) -> Outcome {
        let qid = e.cdw10 as u16;
        if qid == 0 || qid as usize >= self.cqs.len() || self.cqs[qid as usize].is_none() {
            return err(specific(sc::INVALID_QID));
        }
        if self.cqs[qid as usize].as_ref().is_some_and(|c| c.users > 0) {
            return err(specific(sc::INVALID_QUEUE_DELETION));
        }
        self.drop_backlog(qid);
        self.cqs[qid as usize] = None;
        self.sh
            .bar
            .store(spec::cq_head_doorbell(qid, self.cfg.dstrd), 0);
        OK
    }

    fn doorbell_buffer_config(&mut self, e: &SubmissionEntry) -> Outcome {
        let ps = self.page_size;
        if e.prp1 == 0 || e.prp2 == 0 || !e.prp1.is_multiple_of(ps) || !e.prp2.is_multiple_of(ps) {
            return err(generic(sc::INVALID_FIELD));
        }
        self.dbbuf = Some((e.prp1, e.prp2));
        OK
    }

    /// Get Log Page. Reading a page with RAE clear lets the next event of that page be
    /// reported, and clears the Changed Namespace List.
    fn get_log_page(&mut self, e: &SubmissionEntry) -> Outcome {
        let lid = e.cdw10 as u8;
        let rae = e.cdw10 & LOG_RAE != 0;
        let numd = ((e.cdw11 & 0xFFFF) << 16 | e.cdw10 >> 16) as u64 + 1;
        let len = numd * 4;
        let offset = e.cdw12 as u64 | (e.cdw13 as u64) << 32;
        if len > 1 << 20 || !offset.is_multiple_of(4) {
            return err(generic(sc::INVALID_FIELD));
        }
        let log: Vec<u8> = match lid {
            log_page::ERROR_INFORMATION => {
                let n = (self.error_count as usize).min(ERROR_LOG_ENTRIES);
                // Newest first.
                (0..n)
                    .flat_map(|k| {
                        let idx = (self.error_count as usize - 1 - k) % ERROR_LOG_ENTRIES;
                        *self.error_log[idx].as_bytes()
                    })
                    .chain(std::iter::repeat_n(
                        0,
                        (ERROR_LOG_ENTRIES - n) * spec::ErrorLogEntry::SIZE,
                    ))
                    .collect()
            }
            log_page::SMART_HEALTH => self.smart_log().as_bytes().to_vec(),
            log_page::FIRMWARE_SLOT => {
                let mut v = vec![0u8; 512];
                v[0] = 1; // active slot 1
                put_ascii(&mut v[8..16], &lock(&self.sh.events.firmware));
                v
            }
            log_page::CHANGED_NS_LIST => {
                // Held across the transfer: a namespace changed meanwhile is not cleared unseen.
                let mut changed = lock(&self.sh.events.changed_ns);
                let r = self.log_to_host(e, &changed.page(), offset, len);
                let read = r.0.is_success() && !rae;
                if read {
                    changed.clear();
                }
                drop(changed);
                if read {
                    self.log_page_read(lid);
                }
                return r;
            }
            _ => return err(specific(sc::INVALID_LOG_PAGE)),
        };
        let r = self.log_to_host(e, &log, offset, len);
        if r.0.is_success() && !rae {
            self.log_page_read(lid);
        }
        r
    }

    /// Copies `log` from byte `offset` to the host buffer of `e`, `len` bytes (zero-padded).
    fn log_to_host(&self, e: &SubmissionEntry, log: &[u8], offset: u64, len: u64) -> Outcome {
        if offset > log.len() as u64 {
            return err(generic(sc::INVALID_FIELD));
        }
        match self.to_host(e, &log[offset as usize..], len as usize) {
            Ok(()) => OK,
            Err(s) => err(s),
        }
    }

    fn smart_log(&self) -> SmartLog {
        let st = &self.sh.stats;
        let mut s = SmartLog::zeroed();
        s.critical_warning = self
            .sh
            .events
            .critical_warning
            .load(std::sync::atomic::Ordering::Acquire);
        s.temperature = 310u16.to_le_bytes();
        s.avail_spare = 100;
        s.spare_thresh = 10;
        // Data units: thousands of 512-byte units, rounded up.
        let units = |b: u64| (b.div_ceil(512)).div_ceil(1000) as u128;
        s.data_units_read = units(st.bytes_read.get()).to_le_bytes();
        s.data_units_written = units(st.bytes_written.get()).to_le_bytes();
        s.host_read_commands = (st.reads.get() as u128).to_le_bytes();
        s.host_write_commands = (st.writes.get() as u128).to_le_bytes();
        s.power_cycles = 1u128.to_le_bytes();
        s.power_on_hours = ((self.started.elapsed().as_secs() / 3600) as u128).to_le_bytes();
        s.num_err_log_entries = (self.error_count as u128).to_le_bytes();
        s.temp_sensors[0] = 310;
        s
    }
}

fn nguid(nsid: u32) -> [u8; 16] {
    let mut g = *b"rio-sim-ns\0\0\0\0\0\0";
    g[12..].copy_from_slice(&nsid.to_be_bytes());
    g
}
