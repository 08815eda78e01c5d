//! `DiskFile`: a file-like handle over a runtime (a file through io_uring or psync, or a
//! namespace region through the userspace driver), with async positional I/O on pool buffers.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{IoFailure, IoFuture, IoOutput, Runtime, RuntimeConfig};
use crate::config::EngineConfig;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::op::OpKind;
use crate::pool::PoolBuf;
use crate::target::OpenOptions;
use crate::tune::{Pattern, PrefetchStats, Prefetcher};

/// How long `write_all` and friends wait for a pool buffer before giving up.
const BUFFER_WAIT: Duration = Duration::from_secs(5);

/// A region of a target served by a [`Runtime`]. Cheap to clone; `Send + Sync`.
///
/// Reads are one stream for read-ahead (clones share it): when they run sequential or
/// strided, the next ones are read into pool buffers ahead of the caller and a matching
/// `read_at` takes the prefetched buffer instead of going to the device (see
/// [`crate::tune::prefetch`]). Writes through this handle (or its clones) invalidate what they
/// overlap, and nothing is read ahead while one is in flight. A write through another handle
/// or process is not seen: open one `DiskFile` per file where data changes under readers, or
/// turn prefetch off ([`RuntimeConfig::prefetch`]).
#[derive(Clone, Debug)]
pub struct DiskFile {
    rt: Arc<Runtime>,
    base: u64,
    len: u64,
    pf: Option<Arc<Stream>>,
}

/// The read-ahead state shared by a `DiskFile` and its clones.
struct Stream {
    p: Mutex<Prefetcher<IoFuture>>,
    writes: AtomicU32,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").finish_non_exhaustive()
    }
}

impl Stream {
    fn lock(&self) -> std::sync::MutexGuard<'_, Prefetcher<IoFuture>> {
        self.p.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn stream(rt: &Runtime) -> Option<Arc<Stream>> {
    let cfg = rt.prefetch_config();
    cfg.enabled.then(|| {
        Arc::new(Stream {
            p: Mutex::new(Prefetcher::new(cfg)),
            writes: AtomicU32::new(0),
        })
    })
}

impl DiskFile {
    /// Open (or, with `create`, create with `len` bytes) the file or namespace at `target`
    /// and start a runtime for it.
    pub fn open(
        target: &str,
        len: Option<u64>,
        config: &EngineConfig,
        rt: RuntimeConfig,
    ) -> Result<DiskFile> {
        let create =
            len.is_some() && !target.contains("://") && !std::path::Path::new(target).exists();
        let mut engine = Engine::open(
            config,
            target,
            OpenOptions {
                write: true,
                direct: true,
                create,
            },
        )?;
        if let Some(l) = len {
            engine.target_mut().ensure_len(l)?;
        }
        let size = engine.target().geometry.size;
        let rt = Runtime::start(engine, rt)?;
        Ok(DiskFile {
            pf: stream(&rt),
            rt,
            base: 0,
            len: size,
        })
    }

    /// `[base, base+len)` of the runtime's target as a file of its own (a namespace region).
    pub fn region(rt: &Arc<Runtime>, base: u64, len: u64) -> Result<DiskFile> {
        rt.engine().target().geometry.check_range(base, len)?;
        Ok(DiskFile {
            rt: Arc::clone(rt),
            base,
            len,
            pf: stream(rt),
        })
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.rt
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Logical block size: offsets and lengths must be multiples of it.
    pub fn block_size(&self) -> u32 {
        self.rt.engine().target().geometry.block_size
    }

    /// A pool buffer for a request of `len` bytes (waits briefly when the pool is exhausted).
    pub fn buffer(&self, len: usize) -> Result<PoolBuf> {
        self.rt.buffer(len, BUFFER_WAIT)
    }

    fn check(&self, offset: u64, len: u64) -> Result<u64> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.base + offset),
            _ => Err(Error::OutOfRange {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    /// Read `buf.len()` bytes at `offset`. The data comes back in the returned buffer: `buf`
    /// itself, or (when read-ahead had the block) a pool buffer of the same length that
    /// already holds it, `buf` going back to its pool.
    pub async fn read_at(&self, offset: u64, buf: PoolBuf) -> IoOutput {
        let at = match self.check(offset, buf.len() as u64) {
            Ok(a) => a,
            Err(e) => return Err(IoFailure::new(e, Some(buf))),
        };
        let len = buf.len() as u64;
        let Some(pf) = &self.pf else {
            return self.rt.submit(OpKind::Read, at, len, Some(buf)).await;
        };
        let t0 = Instant::now();
        let hit = {
            let mut p = pf.lock();
            if pf.writes.load(Ordering::Acquire) > 0 {
                p.clear();
                None
            } else {
                let (hit, plan) = p.on_read(offset, len, self.len, t0, IoFuture::is_done);
                for &(o, l) in plan.reads() {
                    // Read-ahead never waits for memory, grows the pool or allocates: a dry pool
                    // means no prefetch.
                    let Some(b) = self.rt.try_buffer(l as usize) else {
                        break;
                    };
                    // Nor does it wait for a runtime slot, or take the last half of them:
                    // finished prefetches hold theirs until read, and the host's own requests
                    // (this very read, on a miss) must always find one.
                    match self.rt.try_submit(OpKind::Read, self.base + o, l, b) {
                        Ok(f) => p.insert(o, l, f),
                        Err(_) => break,
                    }
                }
                hit
            }
        };
        if let Some(f) = hit
            && let Ok((n, Some(b))) = f.await
            && n == len
        {
            drop(buf);
            pf.lock()
                .record_latency(true, t0.elapsed().as_secs_f64() * 1e6);
            return Ok((n, Some(b)));
        }
        // A miss, or a prefetch that failed or came up short: read it for real.
        let r = self.rt.submit(OpKind::Read, at, len, Some(buf)).await;
        pf.lock()
            .record_latency(false, t0.elapsed().as_secs_f64() * 1e6);
        r
    }

    /// Write `buf` at `offset`.
    pub async fn write_at(&self, offset: u64, buf: PoolBuf) -> IoOutput {
        let at = match self.check(offset, buf.len() as u64) {
            Ok(a) => a,
            Err(e) => return Err(IoFailure::new(e, Some(buf))),
        };
        let len = buf.len() as u64;
        let Some(pf) = &self.pf else {
            return self.rt.submit(OpKind::Write, at, len, Some(buf)).await;
        };
        // Read-ahead stops while the write is in flight and forgets what it overlaps, before
        // and after: a prefetch racing the write at the device could hold either version.
        pf.writes.fetch_add(1, Ordering::AcqRel);
        // Ends the write's hold on read-ahead when it completed. If the future is dropped
        // mid-way the write may still be in flight at the device, and a prefetch issued after
        // the hold ended could read the old data: read-ahead then stays off for this stream
        // (the hold is never released). Rare, and safe.
        struct Hold<'a> {
            s: &'a Stream,
            offset: u64,
            len: u64,
            done: bool,
        }
        impl Drop for Hold<'_> {
            fn drop(&mut self) {
                self.s.lock().invalidate(self.offset, self.len);
                if self.done {
                    self.s.writes.fetch_sub(1, Ordering::AcqRel);
                } else {
                    tracing::debug!("write cancelled in flight: read-ahead off for this stream");
                }
            }
        }
        let mut hold = Hold {
            s: pf,
            offset,
            len,
            done: false,
        };
        pf.lock().invalidate(offset, len);
        let r = self.rt.submit(OpKind::Write, at, len, Some(buf)).await;
        hold.done = true;
        drop(hold);
        r
    }

    /// What read-ahead sees in this file's reads, and its counters (`None`: prefetch off).
    pub fn prefetch_stats(&self) -> Option<(Pattern, PrefetchStats)> {
        self.pf.as_ref().map(|pf| {
            let p = pf.lock();
            (p.pattern(), p.stats())
        })
    }

    /// Write all of `data` at `offset` (a multiple of the block size, as is `data.len()`),
    /// through pool buffers of up to 1 MiB, all in flight at once.
    pub async fn write_all(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.check(offset, data.len() as u64)?;
        const CHUNK: usize = 1 << 20;
        let mut futs = Vec::with_capacity(data.len().div_ceil(CHUNK));
        for (i, chunk) in data.chunks(CHUNK).enumerate() {
            let mut b = self.buffer(chunk.len())?;
            b.as_mut_slice().copy_from_slice(chunk);
            futs.push(self.write_at(offset + (i * CHUNK) as u64, b));
        }
        for f in futs {
            f.await?;
        }
        Ok(())
    }

    /// Make written data durable: an NVMe Flush of the namespace (userspace driver), or
    /// `fdatasync` of the file or block device (io_uring, psync).
    ///
    /// What is durable when:
    /// - a write whose future has completed is acknowledged, not durable: on a device with a
    ///   volatile write cache it can still be lost to a power cut, wholly or in part (block by
    ///   block: a multi-block write may survive torn, each block old or new);
    /// - once `sync_data` returns `Ok`, every write whose future completed *before* it was
    ///   called survives a power cut; writes still in flight when it was called are not
    ///   covered (await them first);
    /// - an error from `sync_data` says nothing about which writes reached the medium: write
    ///   them again and call it again.
    ///
    /// The software model shows this (`SimConfig::write_cache`, `SimController::power_cut`;
    /// `core/tests/power_loss.rs`).
    pub async fn sync_data(&self) -> Result<()> {
        self.rt
            .submit(OpKind::Flush, 0, 0, None)
            .await
            .map(|_| ())
            .map_err(Error::from)
    }
}
