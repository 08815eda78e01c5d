//! NVM I/O commands (Read, Write, Flush, Write Zeroes, Dataset Management), PRP walking and
//! SGL walking.

use super::device::{Device, OK, Outcome, generic, sc};
use super::host::dma;
use crate::nvme::spec::{
    self, DsmRange, SglDescriptor, Status, SubmissionEntry, dsm_attr, io_opcode, sgl_type,
};

/// Most descriptors the model reads from SGL segments for one command (more: Invalid Number
/// of SGL Descriptors): a loop of segments ends here, never hangs.
pub(super) const MAX_SGL_DESCRIPTORS: u32 = 4096;

/// Resolves SGL1 of a `len`-byte transfer (NVMe 1.4 §4.4) into the host pieces it names, in
/// order, into `pieces` (cleared first; zero-length Data Blocks are left out). SGL1 is a Data
/// Block, or a Segment / Last Segment descriptor pointing at a list of descriptors in host
/// memory: a Segment list may end with a Segment or Last Segment descriptor for the next list
/// (or with a Data Block, ending the SGL); a Last Segment list holds only Data Blocks. Nothing
/// is transferred here, so a bad SGL moves no data. Errors (Generic, with DNR):
///
/// - 0x11 SGL Descriptor Type Invalid: a type other than Data Block / Segment / Last Segment
///   (Bit Bucket included: SGLS says unsupported), or a subtype other than 0 (address);
/// - 0x0D Invalid SGL Segment Descriptor: a segment descriptor before the end of a Segment
///   list, or anywhere in a Last Segment list;
/// - 0x0E Invalid Number of SGL Descriptors: a segment length of 0 or not a multiple of 16,
///   or more than [`MAX_SGL_DESCRIPTORS`] descriptors;
/// - 0x0F Data SGL Length Invalid: the Data Blocks' lengths do not add up to `len`;
/// - 0x04 Data Transfer Error: a zero address for a segment or a nonempty Data Block (a real
///   controller's DMA would fault).
pub(super) fn walk_sgl(
    sgl1: SglDescriptor,
    len: u64,
    pieces: &mut Vec<(u64, u32)>,
) -> Result<(), Status> {
    pieces.clear();
    let mut total = 0u64;
    let mut data = |d: &SglDescriptor, pieces: &mut Vec<(u64, u32)>| -> Result<(), Status> {
        total += d.len as u64;
        if total > len {
            return Err(generic(sc::DATA_SGL_LENGTH_INVALID));
        }
        if d.len > 0 {
            if d.addr == 0 {
                return Err(generic(sc::DATA_TRANSFER_ERROR));
            }
            pieces.push((d.addr, d.len));
        }
        Ok(())
    };
    if sgl1.subtype() != 0 {
        return Err(generic(sc::SGL_DESCRIPTOR_TYPE_INVALID));
    }
    let mut seg = match sgl1.kind() {
        sgl_type::DATA_BLOCK => {
            data(&sgl1, pieces)?;
            None
        }
        sgl_type::SEGMENT | sgl_type::LAST_SEGMENT => Some(sgl1),
        _ => return Err(generic(sc::SGL_DESCRIPTOR_TYPE_INVALID)),
    };
    let mut read = 0u32;
    while let Some(s) = seg.take() {
        if s.len == 0 || !s.len.is_multiple_of(SglDescriptor::BYTES as u32) {
            return Err(generic(sc::INVALID_NUMBER_OF_SGL_DESCRIPTORS));
        }
        if s.addr == 0 {
            return Err(generic(sc::DATA_TRANSFER_ERROR));
        }
        let last_list = s.kind() == sgl_type::LAST_SEGMENT;
        let n = s.len / SglDescriptor::BYTES as u32;
        for i in 0..n {
            read += 1;
            if read > MAX_SGL_DESCRIPTORS {
                return Err(generic(sc::INVALID_NUMBER_OF_SGL_DESCRIPTORS));
            }
            let mut raw = [0u8; SglDescriptor::BYTES];
            let at = s.addr.wrapping_add(i as u64 * SglDescriptor::BYTES as u64);
            dma::read_into(at, raw.as_mut_ptr(), raw.len());
            let d = SglDescriptor::from_bytes(&raw);
            if d.subtype() != 0 {
                return Err(generic(sc::SGL_DESCRIPTOR_TYPE_INVALID));
            }
            match d.kind() {
                sgl_type::DATA_BLOCK => data(&d, pieces)?,
                sgl_type::SEGMENT | sgl_type::LAST_SEGMENT if !last_list && i + 1 == n => {
                    seg = Some(d);
                }
                sgl_type::SEGMENT | sgl_type::LAST_SEGMENT => {
                    return Err(generic(sc::INVALID_SGL_SEGMENT_DESCRIPTOR));
                }
                _ => return Err(generic(sc::SGL_DESCRIPTOR_TYPE_INVALID)),
            }
        }
    }
    if total != len {
        return Err(generic(sc::DATA_SGL_LENGTH_INVALID));
    }
    Ok(())
}

/// How a command's data pointer names its data, once checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dptr {
    /// PRP1 / PRP2 (walked, and checked, while the data moves).
    Prp,
    /// The SGL resolved into `Device::sgl_pieces`.
    Sgl,
}

impl Device {
    /// Checks the data pointer of I/O command `e` for a `len`-byte transfer: PSDT 00b is PRPs;
    /// 01b is an SGL when [`SimConfig::sgl`](super::SimConfig::sgl) is on, resolved here into
    /// `sgl_pieces` (so a bad SGL fails before anything moves); anything else is Invalid Field.
    fn data_pointer(&mut self, e: &SubmissionEntry, len: u64) -> Result<Dptr, Status> {
        match e.psdt() {
            0 => Ok(Dptr::Prp),
            1 if self.cfg.sgl => {
                self.sh.stats.sgl_cmds.add(1);
                walk_sgl(e.sgl1(), len, &mut self.sgl_pieces)?;
                Ok(Dptr::Sgl)
            }
            _ => Err(generic(sc::INVALID_FIELD)),
        }
    }
}

/// Calls `f(host_addr, offset_in_transfer, len)` for each piece of a `len`-byte transfer whose
/// data pointer `data_pointer` checked as `how` (`pieces`: its SGL pieces).
fn transfer(
    e: &SubmissionEntry,
    how: Dptr,
    len: u64,
    ps: u64,
    pieces: &[(u64, u32)],
    mut f: impl FnMut(u64, u64, usize),
) -> Result<(), Status> {
    match how {
        Dptr::Prp => walk_prps(e.prp1, e.prp2, len, ps, f),
        Dptr::Sgl => {
            let mut o = 0u64;
            for &(addr, n) in pieces {
                f(addr, o, n as usize);
                o += n as u64;
            }
            Ok(())
        }
    }
}

/// Calls `f(host_addr, offset_in_transfer, len)` for each physically contiguous piece of a
/// `len`-byte transfer described by PRP1/PRP2 with memory page size `ps` (NVMe 1.4 §4.3):
/// PRP1 may carry a dword-aligned offset; PRP2 is the second data page when the transfer fits
/// in two pages, else a PRP list pointer (qword aligned). Every entry after the first must be
/// page aligned; the last entry of a full list page points to the next list page when more
/// than one page of data remains. A misaligned entry fails with PRP Offset Invalid, a zero
/// entry with Data Transfer Error (a real controller's DMA would fault). Pieces before the bad
/// entry have been transferred by then, as on hardware.
pub(super) fn walk_prps(
    prp1: u64,
    prp2: u64,
    len: u64,
    ps: u64,
    mut f: impl FnMut(u64, u64, usize),
) -> Result<(), Status> {
    if len == 0 {
        return Ok(());
    }
    let mask = ps - 1;
    if prp1 == 0 {
        return Err(generic(sc::DATA_TRANSFER_ERROR));
    }
    if prp1 & 3 != 0 {
        return Err(generic(sc::PRP_OFFSET_INVALID));
    }
    let first = len.min(ps - (prp1 & mask));
    f(prp1, 0, first as usize);
    let mut done = first;
    if done == len {
        return Ok(());
    }
    let data_entry = |ent: u64| -> Result<(), Status> {
        if ent == 0 {
            Err(generic(sc::DATA_TRANSFER_ERROR))
        } else if ent & mask != 0 {
            Err(generic(sc::PRP_OFFSET_INVALID))
        } else {
            Ok(())
        }
    };
    if len - done <= ps {
        data_entry(prp2)?;
        f(prp2, done, (len - done) as usize);
        return Ok(());
    }
    if prp2 == 0 {
        return Err(generic(sc::DATA_TRANSFER_ERROR));
    }
    if prp2 & 7 != 0 {
        return Err(generic(sc::PRP_OFFSET_INVALID));
    }
    let mut list = prp2;
    loop {
        let entries = (ps - (list & mask)) / 8;
        let mut chained = false;
        for i in 0..entries {
            let ent = dma::read_u64(list + i * 8);
            let rem = len - done;
            if i == entries - 1 && rem > ps {
                data_entry(ent)?;
                list = ent;
                chained = true;
                break;
            }
            data_entry(ent)?;
            let n = rem.min(ps);
            f(ent, done, n as usize);
            done += n;
            if done == len {
                return Ok(());
            }
        }
        debug_assert!(chained);
    }
}

impl Device {
    /// Validates NSID; returns the 0-based namespace index.
    fn ns_index(&self, nsid: u32) -> Result<usize, Status> {
        if nsid == 0 || nsid as usize > self.sh.ns.len() {
            return Err(generic(sc::INVALID_NAMESPACE));
        }
        Ok(nsid as usize - 1)
    }

    /// Checks `[slba, slba + nlb)` against namespace `ns`; returns the byte offset and length.
    fn lba_range(&self, ns: usize, slba: u64, nlb: u64) -> Result<(u64, u64), Status> {
        let n = &self.sh.ns[ns];
        match slba.checked_add(nlb) {
            Some(end) if end <= n.blocks() => {
                Ok((slba * n.block_size as u64, nlb * n.block_size as u64))
            }
            _ => Err(generic(sc::LBA_OUT_OF_RANGE)),
        }
    }

    fn mdts_bytes(&self) -> Option<u64> {
        (self.cfg.mdts != 0).then(|| 4096u64 << self.cfg.mdts)
    }

    pub(super) fn io_command(&mut self, qid: u16, sq_inflight: u32, e: &SubmissionEntry) {
        let stats = &self.sh.stats;
        match e.opcode {
            io_opcode::READ => stats.reads.add(1),
            io_opcode::WRITE => stats.writes.add(1),
            io_opcode::FLUSH => stats.flushes.add(1),
            io_opcode::WRITE_ZEROES => stats.write_zeroes.add(1),
            io_opcode::DATASET_MANAGEMENT => stats.dsm.add(1),
            _ => stats.other_io.add(1),
        }
        let (status, dw0) = match self.fault_status(false, e.opcode) {
            Some(s) => (s, 0),
            None => self.execute_io(e),
        };
        self.finish_io(qid, sq_inflight, e, status, dw0);
    }

    fn execute_io(&mut self, e: &SubmissionEntry) -> Outcome {
        let r = match e.opcode {
            io_opcode::READ | io_opcode::WRITE => self.read_write(e),
            io_opcode::FLUSH => {
                let ns = if e.nsid == spec::NSID_ALL {
                    Ok(None)
                } else {
                    self.ns_index(e.nsid).map(Some)
                };
                ns.map(|ns| {
                    if let Some(c) = self.cache.as_mut() {
                        c.flush(ns);
                    }
                })
            }
            io_opcode::WRITE_ZEROES => self.write_zeroes(e),
            io_opcode::DATASET_MANAGEMENT => self.dsm(e),
            _ => Err(generic(sc::INVALID_OPCODE)),
        };
        match r {
            Ok(()) => OK,
            Err(s) => (s, 0),
        }
    }

    fn read_write(&mut self, e: &SubmissionEntry) -> Result<(), Status> {
        let ns = self.ns_index(e.nsid)?;
        if e.fuse() != 0 {
            return Err(generic(sc::INVALID_FIELD));
        }
        let slba = e.cdw10 as u64 | (e.cdw11 as u64) << 32;
        let nlb = (e.cdw12 & 0xFFFF) as u64 + 1;
        let bytes = nlb * self.sh.ns[ns].block_size as u64;
        if self.mdts_bytes().is_some_and(|m| bytes > m) {
            return Err(generic(sc::INVALID_FIELD));
        }
        let (off, len) = self.lba_range(ns, slba, nlb)?;
        let how = self.data_pointer(e, len)?;
        let write = e.opcode == io_opcode::WRITE;
        if write {
            self.before_change(ns, off, len);
        }
        let ps = self.page_size;
        let pieces = &self.sgl_pieces;
        match self.sh.ns[ns].mem.as_ref() {
            Some(mem) if write => transfer(e, how, len, ps, pieces, |addr, o, n| {
                dma::read_into(addr, mem.at(off + o, n), n)
            })?,
            Some(mem) => transfer(e, how, len, ps, pieces, |addr, o, n| {
                dma::write_from(addr, mem.at(off + o, n), n)
            })?,
            None => transfer(e, how, len, ps, pieces, |_, _, _| {})?,
        }
        if write {
            self.sh.stats.bytes_written.add(len);
        } else {
            self.sh.stats.bytes_read.add(len);
        }
        Ok(())
    }

    fn write_zeroes(&mut self, e: &SubmissionEntry) -> Result<(), Status> {
        let ns = self.ns_index(e.nsid)?;
        let slba = e.cdw10 as u64 | (e.cdw11 as u64) << 32;
        let nlb = (e.cdw12 & 0xFFFF) as u64 + 1;
        let (off, len) = self.lba_range(ns, slba, nlb)?;
        // DEAC (cdw12 bit 25) changes nothing here: deallocated blocks read as zeros too.
        self.before_change(ns, off, len);
        if let Some(mem) = self.sh.ns[ns].mem.as_ref() {
            mem.zero_range(off, len);
        }
        Ok(())
    }

    fn dsm(&mut self, e: &SubmissionEntry) -> Result<(), Status> {
        let ns = self.ns_index(e.nsid)?;
        let nr = (e.cdw10 & 0xFF) as usize + 1;
        let mut buf = [0u8; DsmRange::SIZE * spec::DSM_MAX_RANGES as usize];
        let len = nr * DsmRange::SIZE;
        let how = self.data_pointer(e, len as u64)?;
        let dst = buf.as_mut_ptr();
        let pieces = &self.sgl_pieces;
        transfer(e, how, len as u64, self.page_size, pieces, |addr, o, n| {
            // `o + n <= len <= buf.len()`: the walk (PRPs or a checked SGL) never exceeds the
            // requested length.
            dma::read_into(addr, dst.wrapping_add(o as usize), n)
        })?;
        let ranges = || {
            buf[..len]
                .chunks_exact(DsmRange::SIZE)
                .filter_map(DsmRange::from_prefix)
        };
        let mut spans = [(0u64, 0u64); spec::DSM_MAX_RANGES as usize];
        for (i, r) in ranges().enumerate() {
            spans[i] = self.lba_range(ns, r.slba, r.nlb as u64)?;
        }
        if e.cdw11 & dsm_attr::DEALLOCATE != 0 && self.sh.ns[ns].mem.is_some() {
            for &(off, len) in &spans[..nr] {
                if len > 0 {
                    self.before_change(ns, off, len);
                    if let Some(mem) = self.sh.ns[ns].mem.as_ref() {
                        mem.zero_range(off, len);
                    }
                }
            }
        }
        Ok(())
    }

    /// `[off, off + len)` of namespace `ns` is about to change: with the write cache enabled
    /// (and modelled), keep its durable contents until the next Flush.
    fn before_change(&mut self, ns: usize, off: u64, len: u64) {
        if self.vwc_enabled
            && let Some(c) = self.cache.as_mut()
        {
            c.before_change(&self.sh.ns, ns, off, len);
        }
    }
}
