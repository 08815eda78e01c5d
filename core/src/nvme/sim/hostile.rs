//! A hostile device for fuzzing the driver ([`SimController::misbehave`]): I/O completions
//! follow a script of arbitrary bytes instead of the specification. Each completion consumes
//! one action byte (and its operands) while the script lasts:
//!
//! | `byte % 8` | operands | what the device does |
//! |---|---|---|
//! | 0 | | completes the command normally |
//! | 1 | cid: 2 | posts the completion under another command id, keeps the real one outstanding |
//! | 2 | status: 2 | completes the command with an arbitrary status field (DNR, More included) |
//! | 3 | | completes it twice |
//! | 4 | | never completes it (until aborted or the controller is reset) |
//! | 5 | dw0: 4, sq_head: 2, sq_id: 2, cid: 2, status: 2 | posts an arbitrary entry (with the phase tag that makes the driver read it), keeps the real command outstanding |
//! | 6 | sq_head: 2, sq_id: 2 | completes it with an arbitrary SQ head and SQ id |
//! | 7 | value: 4 | writes an arbitrary value into the queue's EventIdx slots (shadow doorbells), then completes it normally |
//!
//! Missing operand bytes read as zero. When the script is used up the device behaves again.
//!
//! [`SimController::misbehave`]: super::SimController::misbehave

use super::device::{Device, Post};
use super::host::dma;
use crate::nvme::spec::{self, CompletionEntry, SubmissionEntry};

/// Reads operands from the front of the script.
struct Script<'a>(&'a mut std::collections::VecDeque<u8>);

impl Script<'_> {
    fn u8(&mut self) -> u8 {
        self.0.pop_front().unwrap_or(0)
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
}

impl Device {
    /// Completes I/O command `e` of SQ `qid` as the script says, if a script is running.
    /// Returns whether it did (the normal path must not complete it again).
    pub(super) fn hostile_completion(&mut self, qid: u16, e: &SubmissionEntry, post: Post) -> bool {
        let sh = std::sync::Arc::clone(&self.sh);
        let mut guard = sh.hostile.lock().unwrap_or_else(|p| p.into_inner());
        let Some(action) = guard.pop_front() else {
            sh.hostile_on
                .store(false, std::sync::atomic::Ordering::Relaxed);
            return false;
        };
        let mut s = Script(&mut guard);
        let cqid = self.sqs[qid as usize].as_ref().map_or(0, |q| q.cqid);
        match action % 8 {
            0 => self.complete(post),
            1 => {
                let cid = s.u16();
                self.post(Post { cid, ..post });
                self.hold(qid, e.cid, false);
            }
            2 => {
                let status = s.u16();
                self.retire(qid);
                self.post_raw(
                    cqid,
                    CompletionEntry {
                        dw0: post.dw0,
                        dw1: 0,
                        sq_head: self.sq_head(qid),
                        sq_id: qid,
                        cid: e.cid,
                        status,
                    },
                );
            }
            3 => {
                self.complete(post);
                self.post(post);
            }
            4 => self.hold(qid, e.cid, false),
            5 => {
                let entry = CompletionEntry {
                    dw0: s.u32(),
                    dw1: 0,
                    sq_head: s.u16(),
                    sq_id: s.u16(),
                    cid: s.u16(),
                    status: s.u16(),
                };
                self.post_raw(cqid, entry);
                self.hold(qid, e.cid, false);
            }
            6 => {
                let (sq_head, sq_id) = (s.u16(), s.u16());
                self.retire(qid);
                self.post_raw(
                    cqid,
                    CompletionEntry {
                        dw0: post.dw0,
                        dw1: 0,
                        sq_head,
                        sq_id,
                        cid: e.cid,
                        status: post.status.to_cqe_status(false),
                    },
                );
            }
            _ => {
                let v = s.u32();
                if let Some((_, ei)) = self.dbbuf {
                    let d = self.cfg.dstrd;
                    for i in [
                        spec::shadow_sq_tail_index(qid, d),
                        spec::shadow_cq_head_index(cqid, d),
                    ] {
                        if self.in_shadow_page(i) {
                            dma::store_u32(ei + i as u64 * 4, v);
                        }
                    }
                }
                self.complete(post);
            }
        }
        if guard.is_empty() {
            sh.hostile_on
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
        true
    }

    /// The command leaves the in-flight counts without a normal completion (the raw entry
    /// posted for it stands in).
    fn retire(&mut self, qid: u16) {
        if let Some(sq) = self.sqs[qid as usize].as_mut() {
            sq.inflight = sq.inflight.saturating_sub(1);
        }
        self.inflight = self.inflight.saturating_sub(1);
    }

    fn sq_head(&self, qid: u16) -> u16 {
        self.sqs[qid as usize].as_ref().map_or(0, |s| s.head as u16)
    }

    /// Writes `e` at the tail of CQ `cqid` with the phase tag the driver expects there (so it
    /// reads whatever the other fields say); dropped when the CQ is full or gone.
    fn post_raw(&mut self, cqid: u16, mut e: CompletionEntry) {
        let Some(cq) = self.cqs[cqid as usize].as_mut() else {
            return;
        };
        if (cq.tail + 1) % cq.size == cq.head {
            return;
        }
        e.status = (e.status & !1) | cq.phase as u16;
        dma::write_cqe(cq.base + cq.tail as u64 * spec::CQE_SIZE as u64, &e);
        cq.tail = (cq.tail + 1) % cq.size;
        if cq.tail == 0 {
            cq.phase = !cq.phase;
        }
    }
}
