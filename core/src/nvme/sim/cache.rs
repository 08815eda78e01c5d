//! The volatile write cache's loss at a power cut ([`SimConfig::write_cache`]).
//!
//! Namespace memory always holds the newest data (reads see every completed write, as through a
//! real cache). Beside it, for every block written since the last Flush, the cache keeps the
//! block's durable contents: what the medium would hold if the power went now. A Flush makes
//! everything durable (forgets the kept contents); a power cut puts them back, block by block,
//! for the blocks the cut loses. A block is never torn inside: it is wholly old or wholly new.
//!
//! [`SimConfig::write_cache`]: super::SimConfig::write_cache

use std::collections::HashMap;

use super::NsInfo;
use crate::rng::splitmix64;

/// What a power cut does to the blocks written since the last Flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerCut {
    /// Every one loses its unflushed writes (reads its contents as of the last Flush).
    LoseAll,
    /// Each block loses or keeps its unflushed writes on its own (a multi-block write can be
    /// torn, never a block), decided by `seed`: the same seed and writes give the same result.
    Torn { seed: u64 },
}

/// The blocks a power cut found unflushed, by what it did to them; each list is sorted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PowerCutReport {
    /// `(nsid, lba)` of the blocks whose unflushed writes were lost.
    pub lost: Vec<(u32, u64)>,
    /// `(nsid, lba)` of the unflushed blocks that kept their newest contents.
    pub kept: Vec<(u32, u64)>,
}

/// Durable contents of the blocks written since the last Flush, per namespace.
pub(super) struct WriteCache {
    kept: Vec<HashMap<u64, Box<[u8]>>>,
    /// Block size of each namespace.
    bs: Vec<u64>,
    /// Bytes of kept contents, all namespaces.
    bytes: u64,
    max: u64,
}

impl WriteCache {
    pub(super) fn new(ns: &[NsInfo], max: u64) -> WriteCache {
        WriteCache {
            kept: ns.iter().map(|_| HashMap::new()).collect(),
            bs: ns.iter().map(|n| n.block_size as u64).collect(),
            bytes: 0,
            max,
        }
    }

    /// `[off, off + len)` of namespace `i` (block aligned) is about to change: keep the durable
    /// contents of each of its blocks not kept yet. Past the size bound the cache destages
    /// first (all so far becomes durable).
    pub(super) fn before_change(&mut self, ns: &[NsInfo], i: usize, off: u64, len: u64) {
        let Some(mem) = ns[i].mem.as_ref() else {
            return;
        };
        let bs = self.bs[i];
        let (first, end) = (off / bs, (off + len).div_ceil(bs));
        let new = (first..end)
            .filter(|b| !self.kept[i].contains_key(b))
            .count() as u64;
        if self.bytes + new * bs > self.max {
            self.flush(None);
        }
        for b in first..end {
            if let std::collections::hash_map::Entry::Vacant(v) = self.kept[i].entry(b) {
                let mut old = vec![0u8; bs as usize].into_boxed_slice();
                mem.peek(b * bs, &mut old);
                v.insert(old);
                self.bytes += bs;
            }
        }
    }

    /// Flush: namespace `i` (`None`: all) is durable as it is.
    pub(super) fn flush(&mut self, i: Option<usize>) {
        for (k, m) in self.kept.iter_mut().enumerate() {
            if i.is_none_or(|i| i == k) {
                self.bytes -= m.len() as u64 * self.bs[k];
                m.clear();
            }
        }
    }

    /// The power went: each kept block the cut loses gets its durable contents back.
    pub(super) fn cut(&mut self, ns: &[NsInfo], how: PowerCut) -> PowerCutReport {
        let mut r = PowerCutReport::default();
        for (i, m) in self.kept.iter_mut().enumerate() {
            let bs = self.bs[i];
            for (b, old) in m.drain() {
                let lose = match how {
                    PowerCut::LoseAll => true,
                    PowerCut::Torn { seed } => splitmix64(seed ^ ((i as u64) << 56) ^ b) & 1 == 1,
                };
                let id = (i as u32 + 1, b);
                if lose {
                    if let Some(mem) = ns[i].mem.as_ref() {
                        mem.poke(b * bs, &old);
                    }
                    r.lost.push(id);
                } else {
                    r.kept.push(id);
                }
            }
        }
        self.bytes = 0;
        r.lost.sort_unstable();
        r.kept.sort_unstable();
        r
    }
}
