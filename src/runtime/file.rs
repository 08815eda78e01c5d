//! `DiskFile`: a file-like handle over a runtime (a file through io_uring or psync, or a
//! namespace region through the userspace driver), with async positional I/O on pool buffers.

use std::sync::Arc;
use std::time::Duration;

use super::{IoOutput, Runtime, RuntimeConfig};
use crate::config::EngineConfig;
use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::pool::PoolBuf;
use crate::queue::OpKind;
use crate::target::OpenOptions;

/// How long `write_all` and friends wait for a pool buffer before giving up.
const BUFFER_WAIT: Duration = Duration::from_secs(5);

/// A region of a target served by a [`Runtime`]. Cheap to clone; `Send + Sync`.
#[derive(Clone, Debug)]
pub struct DiskFile {
    rt: Arc<Runtime>,
    base: u64,
    len: u64,
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

    /// Read `buf.len()` bytes at `offset` into `buf`.
    pub async fn read_at(&self, offset: u64, buf: PoolBuf) -> IoOutput {
        let at = match self.check(offset, buf.len() as u64) {
            Ok(a) => a,
            Err(e) => return Err((e, Some(buf))),
        };
        let len = buf.len() as u64;
        self.rt.submit(OpKind::Read, at, len, Some(buf)).await
    }

    /// Write `buf` at `offset`.
    pub async fn write_at(&self, offset: u64, buf: PoolBuf) -> IoOutput {
        let at = match self.check(offset, buf.len() as u64) {
            Ok(a) => a,
            Err(e) => return Err((e, Some(buf))),
        };
        let len = buf.len() as u64;
        self.rt.submit(OpKind::Write, at, len, Some(buf)).await
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
            f.await.map_err(|(e, _)| e)?;
        }
        Ok(())
    }

    /// Make written data durable (a device flush / fdatasync).
    pub async fn sync_data(&self) -> Result<()> {
        self.rt
            .submit(OpKind::Flush, 0, 0, None)
            .await
            .map(|_| ())
            .map_err(|(e, _)| e)
    }
}
