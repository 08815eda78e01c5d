//! `Files`: one runtime serving any number of files of a directory (a drive of an object
//! store), each opened by the host and handed over by descriptor; reads and writes of any
//! offset and length, whatever the file's O_DIRECT alignment.
//!
//! ```text
//!  OpenFile ── read_at(off, len) ──► widened to the alignment, cut in pieces of at most a
//!            │                       pool buffer, 4 in flight, copied out (short at EOF)
//!            └ write_at(off, data) ─► unaligned head and tail through the buffered handle,
//!                                    the aligned middle through the O_DIRECT one
//!  SeqWriter: a stream of writes staged in pool buffers, whole aligned chunks written with
//!             O_DIRECT while the next fills, the unaligned tail buffered at `finish`.
//! ```
//!
//! Each file has two handles: the host's (buffered) and, where the file system takes it, an
//! O_DIRECT twin opened through `/proc/self/fd` (no second path lookup, so a rename between
//! the two opens cannot swap the file). Direct I/O is split at the larger of the file's
//! DIOALIGN and the page size: a buffered head or tail never shares a page with a direct
//! write, so no dirty page can be written back over direct-written data. A direct operation
//! the file system refuses (EINVAL) turns direct I/O off for that file (logged once) and is
//! done again buffered: nothing fails for lack of alignment.

use std::collections::VecDeque;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use super::{IoFailure, IoFuture, IoOutput, Runtime, RuntimeConfig};
use crate::config::EngineConfig;
use crate::engine::Engine;
use crate::error::{Error, IoError, IoErrorKind, Result};
use crate::op::OpKind;
use crate::pool::PoolBuf;

/// How long a read or write waits for a pool buffer before failing, by default (see
/// [`Files::set_read_buffer_wait`], [`Files::set_write_buffer_wait`]). The wait never blocks
/// the calling thread.
const BUFFER_WAIT: Duration = Duration::from_secs(5);
/// Pieces of one call in flight at once: enough to keep a device busy on a large read,
/// few enough that many concurrent callers cannot take the whole pool.
const WINDOW: usize = 4;
/// Largest piece: a pool buffer of the largest default class.
const MAX_PIECE: usize = 1 << 20;
/// Direct I/O is never split finer than a page (see the module doc).
const PAGE: u64 = 4096;

/// When [`Files`] copies cached data on the caller's thread ([`Files::set_inline_cached_reads`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum InlineReads {
    /// Every read goes through the poller (a host whose threads must never spend tens of
    /// microseconds copying).
    Off = 0,
    /// When the poller that would serve the read is parked: a hand-off then costs a wake-up
    /// each way, more than copying a 512 KiB shard (40 µs inline against 80-140 µs through
    /// a sleeping poller, docs/DESIGN.md). An awake poller copies while the caller's thread
    /// goes on serving other requests.
    WhenPollerIdle = 1,
    /// Whenever the data is cached.
    Always = 2,
}

/// A runtime over a directory whose files are served by descriptor. `Send + Sync`; share it
/// with `Arc` between every file of a drive.
#[derive(Debug)]
pub struct Files {
    rt: Arc<Runtime>,
    dir: PathBuf,
    direct: bool,
    piece: usize,
    /// How long a read with nothing in flight waits for a pool buffer, in nanoseconds.
    read_wait_ns: AtomicU64,
    /// The same for a write.
    write_wait_ns: AtomicU64,
    /// Buffered `read_bytes` first copy what the page cache holds on the calling thread.
    inline_cached: std::sync::atomic::AtomicU8,
    /// Reads served that way.
    inline_reads: AtomicU64,
}

impl Files {
    /// Start a runtime for the files under `dir` (pollers, pools and backend from `config`;
    /// the backend is io_uring, or psync where it is refused, chosen and logged as for a
    /// file). With `config.direct`, files are read and written with O_DIRECT where their file
    /// system allows it.
    pub fn open(dir: &Path, config: &EngineConfig) -> Result<Arc<Files>> {
        Files::open_with(dir, config, config.runtime_config())
    }

    /// [`open`](Self::open) with the runtime's settings given (a window sink for telemetry,
    /// a p99 target, cores, pools).
    pub fn open_with(dir: &Path, config: &EngineConfig, rt: RuntimeConfig) -> Result<Arc<Files>> {
        let engine = Engine::open_dir(config, dir)?;
        let rt = Runtime::start(engine, rt)?;
        Files::with_runtime(rt)
    }

    /// Serve files through `rt`, a runtime started on [`Engine::open_dir`].
    pub fn with_runtime(rt: Arc<Runtime>) -> Result<Arc<Files>> {
        let t = rt.engine().target();
        if t.kind != crate::target::TargetKind::Directory {
            return Err(Error::BadTarget {
                path: t.path.clone(),
                what: "a Files runtime must be started on a directory (Engine::open_dir)".into(),
            });
        }
        let largest = rt.pools().classes().last().copied().unwrap_or(4096);
        Ok(Arc::new(Files {
            dir: t.path.clone(),
            direct: t.direct,
            piece: largest.min(MAX_PIECE),
            read_wait_ns: AtomicU64::new(BUFFER_WAIT.as_nanos() as u64),
            write_wait_ns: AtomicU64::new(BUFFER_WAIT.as_nanos() as u64),
            inline_cached: std::sync::atomic::AtomicU8::new(InlineReads::WhenPollerIdle as u8),
            inline_reads: AtomicU64::new(0),
            rt,
        }))
    }

    /// When a buffered [`OpenFile::read_bytes`] (and [`OpenFile::read_bytes_auto`] on a cached
    /// range) copies what the page cache holds on the calling thread (`preadv2` with
    /// `RWF_NOWAIT`: never waits for the device) instead of through the poller. Default
    /// [`InlineReads::WhenPollerIdle`].
    pub fn set_inline_cached_reads(&self, mode: InlineReads) {
        self.inline_cached.store(mode as u8, Ordering::Relaxed);
    }

    fn inline_mode(&self) -> InlineReads {
        match self.inline_cached.load(Ordering::Relaxed) {
            0 => InlineReads::Off,
            1 => InlineReads::WhenPollerIdle,
            _ => InlineReads::Always,
        }
    }

    /// Buffered reads served from the page cache on the calling thread so far.
    pub fn inline_reads(&self) -> u64 {
        self.inline_reads.load(Ordering::Relaxed)
    }

    /// How long a read waits for a pool buffer when the pool is spent and the read has none
    /// in flight (default 5 s), before it fails with [`Error::BufferUnavailable`]. The wait
    /// yields to the caller's executor, never blocks its thread. `Duration::ZERO` fails at
    /// once: for a host that would rather serve that read another way (a plain `pread`) than
    /// queue behind the pool. Writes wait as [`set_write_buffer_wait`](Self::set_write_buffer_wait)
    /// says.
    pub fn set_read_buffer_wait(&self, wait: Duration) {
        let ns = wait.as_nanos().min(u64::MAX as u128) as u64;
        self.read_wait_ns.store(ns, Ordering::Relaxed);
    }

    fn read_wait(&self) -> Duration {
        Duration::from_nanos(self.read_wait_ns.load(Ordering::Relaxed))
    }

    /// How long a write ([`OpenFile::write_at`], a [`SeqWriter`]'s next chunk) waits for a
    /// pool buffer when the pool is spent and the write has none in flight (default 5 s),
    /// before it fails with [`Error::BufferUnavailable`]. Like the read wait it yields, never
    /// blocks the thread; a writer waiting on its own write in flight does not count it.
    /// [`SeqWriter::reserve_within`] takes its own wait for hosts that would rather write
    /// another way at once. The one blocking path, [`SeqWriter::stage`] without a
    /// [`reserve`](SeqWriter::reserve) first, blocks its thread for up to this wait.
    pub fn set_write_buffer_wait(&self, wait: Duration) {
        let ns = wait.as_nanos().min(u64::MAX as u128) as u64;
        self.write_wait_ns.store(ns, Ordering::Relaxed);
    }

    fn write_wait(&self) -> Duration {
        Duration::from_nanos(self.write_wait_ns.load(Ordering::Relaxed))
    }

    /// A pool buffer of `len` bytes if one can be had now (the pool may grow; no waiting).
    fn buffer_now(&self, len: usize) -> Option<PoolBuf> {
        self.rt.buffer(len, Duration::ZERO).ok()
    }

    /// The buffer for a call's next piece of `len` bytes: the buffer a finished piece gave
    /// back (`spare`), else a free one, else, with a piece of the call in flight, `None` (wait
    /// for that piece and use its buffer), else a wait of up to `wait` without blocking.
    async fn piece_buffer(
        &self,
        spare: &mut Option<PoolBuf>,
        len: usize,
        in_flight: bool,
        wait: Duration,
    ) -> Result<Option<PoolBuf>> {
        if let Some(b) = spare
            .take()
            .and_then(|mut b| b.set_len(len).is_ok().then_some(b))
        {
            return Ok(Some(b));
        }
        match self.buffer_now(len) {
            Some(b) => Ok(Some(b)),
            None if in_flight => Ok(None),
            None => self.buffer(len, wait).await.map(Some),
        }
    }

    /// A pool buffer of `len` bytes, waiting up to `wait` for one without blocking the thread.
    fn buffer(&self, len: usize, wait: Duration) -> BufferWait<'_> {
        BufferWait {
            files: self,
            len,
            wait,
            since: None,
        }
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.rt
    }

    /// The directory this runtime was started on.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Open `path` (relative paths are taken under [`dir`](Self::dir)) with `options`
    /// (read, write, create, truncate as the host wants them; append is refused: offsets are
    /// always explicit).
    pub fn open_file(
        self: &Arc<Self>,
        path: &Path,
        options: &std::fs::OpenOptions,
    ) -> Result<OpenFile> {
        let full = self.dir.join(path);
        let file = options.open(&full).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound { path: full.clone() },
            _ => Error::Os {
                op: "open",
                path: full.clone(),
                source: e,
            },
        })?;
        self.adopt(file, full)
    }

    /// Serve a file the host opened itself (`path` names it in errors and logs). Its access
    /// mode is kept: a read-only file stays read-only.
    pub fn adopt(self: &Arc<Self>, file: std::fs::File, path: PathBuf) -> Result<OpenFile> {
        self.adopt_with(file, path, self.direct)
    }

    /// [`adopt`](Self::adopt), choosing per file whether an O_DIRECT twin is opened (`direct`
    /// and the runtime's own setting must both allow it): a host that reads a file once and
    /// small, through the page cache, saves the second open.
    pub fn adopt_with(
        self: &Arc<Self>,
        file: std::fs::File,
        path: PathBuf,
        direct: bool,
    ) -> Result<OpenFile> {
        let os = |op: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Os { op, path, source }
        };
        let meta = file.metadata().map_err(os("stat", &path))?;
        if !meta.is_file() {
            return Err(Error::BadTarget {
                path,
                what: "is not a regular file".into(),
            });
        }
        let fl = rio_sys::io::fcntl_getfl(file.as_fd()).map_err(os("query flags of", &path))?;
        if fl & libc::O_APPEND != 0 {
            return Err(Error::BadTarget {
                path,
                what:
                    "is open for appending; rio writes at explicit offsets (open it without append)"
                        .into(),
            });
        }
        let acc = fl & libc::O_ACCMODE;
        let want_direct = direct;
        let (mut direct, mut align) = (None, 1u64);
        if self.direct && want_direct {
            match reopen_direct(&file, acc) {
                Ok(d) => {
                    let dio = rio_sys::stat::dio_align(d.as_fd()).unwrap_or_default();
                    align = (dio.offset_align as u64)
                        .max(dio.mem_align as u64)
                        .max(PAGE)
                        .next_power_of_two();
                    direct = Some(Arc::new(OwnedFd::from(d)));
                }
                Err(e) => {
                    tracing::debug!(path = %path.display(), error = %e, "no O_DIRECT for this file: buffered I/O");
                }
            }
        }
        Ok(OpenFile {
            inner: Arc::new(Inner {
                buffered: Arc::new(OwnedFd::from(file)),
                direct_ok: AtomicBool::new(direct.is_some()),
                direct,
                align,
                path,
                writable: acc != libc::O_RDONLY,
            }),
            files: Arc::clone(self),
        })
    }
}

/// The O_DIRECT twin of `file`: the same open file description's inode, opened again through
/// its `/proc/self/fd` link with the same access mode.
fn reopen_direct(file: &std::fs::File, acc: i32) -> std::io::Result<std::fs::File> {
    let link = format!("/proc/self/fd/{}", file.as_raw_fd());
    let mut o = std::fs::OpenOptions::new();
    o.read(acc != libc::O_WRONLY)
        .write(acc != libc::O_RDONLY)
        .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC);
    let d = o.open(link)?;
    // The link could only name another file if the descriptor changed under us; it cannot
    // (we hold it), but check the inode anyway: cheap, and it is the invariant.
    let (a, b) = (file.metadata()?, d.metadata()?);
    use std::os::unix::fs::MetadataExt;
    if (a.dev(), a.ino()) != (b.dev(), b.ino()) {
        return Err(std::io::Error::other("reopened a different file"));
    }
    Ok(d)
}

struct Inner {
    buffered: Arc<OwnedFd>,
    direct: Option<Arc<OwnedFd>>,
    /// Direct I/O still allowed (cleared when the file system refuses it).
    direct_ok: AtomicBool,
    /// Split point of direct I/O: a power of two, at least a page.
    align: u64,
    path: PathBuf,
    writable: bool,
}

/// A file served by a [`Files`] runtime. Cheap to clone; `Send + Sync`. Closing: drop every
/// clone (operations in flight keep the descriptors open until they complete).
#[derive(Clone)]
pub struct OpenFile {
    inner: Arc<Inner>,
    files: Arc<Files>,
}

impl std::fmt::Debug for OpenFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenFile")
            .field("path", &self.inner.path)
            .field("direct", &self.is_direct())
            .field("align", &self.inner.align)
            .finish()
    }
}

/// A pool buffer, waited for by yielding to the executor (the task wakes itself and is
/// polled again after the others ready to run): buffers come back when other tasks finish
/// with theirs, so a wait that blocked the thread could hold up the very tasks it waits for.
struct BufferWait<'a> {
    files: &'a Files,
    len: usize,
    wait: Duration,
    since: Option<Instant>,
}

impl Future for BufferWait<'_> {
    type Output = Result<PoolBuf>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<PoolBuf>> {
        let e = match self.files.rt.buffer(self.len, Duration::ZERO) {
            Ok(b) => return Poll::Ready(Ok(b)),
            Err(e) => e,
        };
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        if now.duration_since(since) >= self.wait {
            return Poll::Ready(Err(match e {
                Error::BufferUnavailable { requested, reason } => Error::BufferUnavailable {
                    requested,
                    reason: format!("{reason}; gave up after {:?}", now.duration_since(since)),
                },
                e => e,
            }));
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Bytes transferred by a completed operation: a short transfer (end of file) is a count,
/// any other failure an error.
fn done_bytes(out: IoOutput) -> std::result::Result<(u64, Option<PoolBuf>), Error> {
    match out {
        Ok(v) => Ok(v),
        Err(f) => match *f {
            IoFailure {
                error:
                    Error::Io(IoError {
                        kind: IoErrorKind::Short { done },
                        ..
                    }),
                buf,
            } => Ok((done as u64, buf)),
            IoFailure { error, .. } => Err(error),
        },
    }
}

fn is_einval(e: &Error) -> bool {
    matches!(
        e,
        Error::Io(IoError {
            kind: IoErrorKind::Os(libc::EINVAL),
            ..
        })
    )
}

/// The bytes of a [`OpenFile::read_bytes`]: the wanted part of the pool buffer they were
/// read into (no copy; the buffer goes home when this is dropped, from any thread), or a
/// vector when the range spanned several buffers. `Send`, `'static`: a host can hand it to
/// its own byte containers (e.g. `bytes::Bytes::from_owner`).
pub struct ReadBytes(Repr);

enum Repr {
    Pool {
        buf: PoolBuf,
        from: usize,
        to: usize,
        /// Copied from the page cache on the calling thread.
        inline: bool,
    },
    /// A copy; `true` when its start was copied from the page cache on the calling thread.
    Heap(Vec<u8>, bool),
}

impl ReadBytes {
    /// Whether the bytes are a pool buffer's (not copied).
    pub fn is_pooled(&self) -> bool {
        matches!(self.0, Repr::Pool { .. })
    }

    /// Whether the bytes were copied from the page cache on the calling thread
    /// ([`Files::set_inline_cached_reads`]), not read through the runtime.
    pub fn served_inline(&self) -> bool {
        matches!(
            self.0,
            Repr::Pool { inline: true, .. } | Repr::Heap(_, true)
        )
    }

    /// The bytes as an owned vector (a copy when they are a pool buffer's).
    pub fn into_vec(self) -> Vec<u8> {
        match self.0 {
            Repr::Pool { .. } => self.as_ref().to_vec(),
            Repr::Heap(v, _) => v,
        }
    }
}

impl AsRef<[u8]> for ReadBytes {
    fn as_ref(&self) -> &[u8] {
        match &self.0 {
            Repr::Pool { buf, from, to, .. } => &buf.as_slice()[*from..*to],
            Repr::Heap(v, _) => v,
        }
    }
}

impl std::ops::Deref for ReadBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_ref()
    }
}

impl std::fmt::Debug for ReadBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadBytes")
            .field("len", &self.len())
            .field("pooled", &self.is_pooled())
            .finish()
    }
}

impl OpenFile {
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Whether reads and writes of aligned ranges go through O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.inner.direct.is_some() && self.inner.direct_ok.load(Ordering::Relaxed)
    }

    /// The split point of direct I/O (1 when the file is buffered).
    pub fn alignment(&self) -> u64 {
        if self.is_direct() {
            self.inner.align
        } else {
            1
        }
    }

    /// Whether the file is empty now.
    pub fn is_empty(&self) -> Result<bool> {
        self.len().map(|l| l == 0)
    }

    /// The file's current length.
    pub fn len(&self) -> Result<u64> {
        rio_sys::io::file_size(self.inner.buffered.as_fd()).map_err(|e| Error::Os {
            op: "stat",
            path: self.inner.path.clone(),
            source: e,
        })
    }

    fn direct_refused(&self, e: &Error) {
        if self.inner.direct_ok.swap(false, Ordering::Relaxed) {
            tracing::warn!(path = %self.inner.path.display(), error = %e, "O_DIRECT refused by the file system; this file goes buffered");
        }
    }

    /// Read up to `len` bytes at `offset`: fewer only at the end of the file. Any offset and
    /// length; with O_DIRECT the range is widened to the alignment and the wanted bytes copied
    /// out.
    pub async fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.read_vec(offset, len, self.is_direct()).await
    }

    /// [`read_at`](Self::read_at) into `out`; returns the bytes read (short only at the end of
    /// the file).
    pub async fn read_into(&self, offset: u64, out: &mut [u8]) -> Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        check_range(&self.inner.path, offset, out.len() as u64)?;
        let len = out.len();
        // SAFETY: `[u8]` and `[MaybeUninit<u8>]` have the same layout, and read_pieces only
        // ever writes initialised bytes into it, so `out` stays initialised.
        let out = unsafe {
            std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<MaybeUninit<u8>>(), len)
        };
        self.read_span(offset, out, self.is_direct()).await
    }

    /// [`read_pieces`](Self::read_pieces) O_DIRECT if `direct`, and buffered if the file
    /// system refuses it (EINVAL: direct I/O is then off for this file).
    async fn read_span(
        &self,
        offset: u64,
        out: &mut [MaybeUninit<u8>],
        direct: bool,
    ) -> Result<usize> {
        if direct {
            match self.read_pieces(offset, out, true).await {
                Err(e) if is_einval(&e) => self.direct_refused(&e),
                r => return r,
            }
        }
        self.read_pieces(offset, out, false).await
    }

    /// [`read_at`](Self::read_at) through the page cache even when the file has an O_DIRECT
    /// handle (data likely cached, or read again soon).
    pub async fn read_buffered_at(&self, offset: u64, len: usize) -> Result<Vec<u8>> {
        self.read_vec(offset, len, false).await
    }

    /// Read into a new vector, never zeroed first (read_pieces fills a prefix of it).
    async fn read_vec(&self, offset: u64, len: usize, direct: bool) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(len);
        if len == 0 {
            return Ok(out);
        }
        check_range(&self.inner.path, offset, len as u64)?;
        let n = self
            .read_span(offset, out.spare_capacity_mut(), direct)
            .await?;
        // SAFETY: read_pieces returned `n`: it initialised `out[..n]` (the bytes it copied
        // out are a prefix, written in order).
        unsafe { out.set_len(n) };
        Ok(out)
    }

    /// Read up to `len` bytes at `offset` (fewer only at the end of the file) without copying
    /// them when they fit in one pool buffer: the returned [`ReadBytes`] then holds that
    /// buffer (back to its pool when dropped), and its bytes are the wanted part of it.
    /// A longer range is copied into a vector as by [`read_at`](Self::read_at). `direct`: go
    /// O_DIRECT if the file has it (else through the page cache).
    pub async fn read_bytes(&self, offset: u64, len: usize, direct: bool) -> Result<ReadBytes> {
        if len == 0 {
            return Ok(ReadBytes(Repr::Heap(Vec::new(), false)));
        }
        check_range(&self.inner.path, offset, len as u64)?;
        let direct = direct && self.is_direct();
        if direct {
            match self.read_one(offset, len, true).await {
                Err(e) if is_einval(&e) => self.direct_refused(&e),
                r => return r,
            }
        }
        self.read_one(offset, len, false).await
    }

    /// [`read_bytes`](Self::read_bytes) in one direction (direct or buffered).
    async fn read_one(&self, offset: u64, len: usize, direct: bool) -> Result<ReadBytes> {
        let (fd, align) = self.handle(direct);
        let end = offset + len as u64;
        let start = offset & !(align - 1);
        let stop = end.div_ceil(align) * align;
        if stop - start > self.files.piece as u64 {
            return self
                .read_vec(offset, len, direct)
                .await
                .map(|v| ReadBytes(Repr::Heap(v, false)));
        }
        let n = (stop - start) as usize;
        let wait = self.files.read_wait();
        let mut buf = (self.files)
            .piece_buffer(&mut None, n, false, wait)
            .await?
            .expect("a call with nothing in flight gets a buffer or an error");
        let from = (offset - start) as usize;
        // SAFETY: `buf` is this call's own pool buffer of `n` bytes, untouched meanwhile.
        if !direct
            && self.inline_pays(&buf)
            && unsafe { self.cached_copy(buf.as_mut_ptr(), n, start) }
        {
            return Ok(ReadBytes(Repr::Pool {
                buf,
                from,
                to: from + len,
                inline: true,
            }));
        }
        self.read_in(buf, fd, start, from, len).await
    }

    /// Read `buf.len()` bytes at `start` through the runtime into `buf`; the result is its
    /// bytes `[from, from + len)` (fewer at the end of the file).
    async fn read_in(
        &self,
        buf: PoolBuf,
        fd: &Arc<OwnedFd>,
        start: u64,
        from: usize,
        len: usize,
    ) -> Result<ReadBytes> {
        let n = buf.len();
        let fut = self.submit(fd, OpKind::Read, start, n as u64, Some(buf));
        let (got, buf) = done_bytes(fut.await)?;
        let buf = buf.expect("a read hands its buffer back");
        let to = (got as usize).min(from + len).max(from);
        Ok(ReadBytes(Repr::Pool {
            buf,
            from,
            to,
            inline: false,
        }))
    }

    /// Submit an operation on one of this file's handles (the buffered one as such: see
    /// [`Runtime::submit_cached_file`]).
    fn submit(
        &self,
        fd: &Arc<OwnedFd>,
        op: OpKind,
        offset: u64,
        len: u64,
        buf: Option<PoolBuf>,
    ) -> IoFuture {
        let rt = &self.files.rt;
        if Arc::ptr_eq(fd, &self.inner.buffered) {
            rt.submit_cached_file(fd, op, offset, len, buf)
        } else {
            rt.submit_file(fd, op, offset, len, buf)
        }
    }

    /// Whether to copy a cached range on the calling thread rather than hand it to the
    /// poller of `buf`'s core ([`InlineReads`]).
    fn inline_pays(&self, buf: &PoolBuf) -> bool {
        match self.files.inline_mode() {
            InlineReads::Off => false,
            InlineReads::WhenPollerIdle => self.files.rt.poller_parked(buf.home_core()),
            InlineReads::Always => true,
        }
    }

    /// Copy `[at, at + n)` into `dst` on this thread if the page cache holds all of it now
    /// (`preadv2` with `RWF_NOWAIT`, through the buffered handle); false otherwise (nothing
    /// or part cached, the end of the file, any error, the inline path off): the caller
    /// reads it through the runtime, which reports what is wrong its way.
    ///
    /// # Safety
    /// `dst` is valid for writes of `n` bytes and nobody else accesses it during the call.
    unsafe fn cached_copy(&self, dst: *mut u8, n: usize, at: u64) -> bool {
        if self.files.inline_mode() == InlineReads::Off {
            return false;
        }
        // SAFETY: the caller's contract.
        let r = unsafe { rio_sys::io::pread_nowait_raw(self.inner.buffered.as_fd(), dst, n, at) };
        match r {
            Ok(k) if k == n => {
                self.files.inline_reads.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // A file system without RWF_NOWAIT: every read through the runtime.
                self.files.set_inline_cached_reads(InlineReads::Off);
                false
            }
            _ => false,
        }
    }

    /// [`read_bytes`](Self::read_bytes) from wherever the data is: copied from the page
    /// cache when it holds the range (looked up with `cachestat`, then copied with
    /// `RWF_NOWAIT` on this thread, the first pool buffer's worth of it), else O_DIRECT from
    /// the device, so cold data neither
    /// goes through nor evicts the cache and warm data is not read again from the device.
    /// Without an O_DIRECT handle or with the inline path off
    /// ([`Files::set_inline_cached_reads`]), as `read_bytes(.., direct = true)`.
    pub async fn read_bytes_auto(&self, offset: u64, len: usize) -> Result<ReadBytes> {
        if len == 0 || !self.is_direct() || self.files.inline_mode() == InlineReads::Off {
            return self.read_bytes(offset, len, true).await;
        }
        check_range(&self.inner.path, offset, len as u64)?;
        // Look before reading: a RWF_NOWAIT read that misses starts the kernel's read-ahead
        // of the range, which the O_DIRECT read would then fetch from the device a second
        // time. cachestat has no such side effect (Linux 6.5+; without it, the RWF_NOWAIT
        // probe below decides alone).
        let (first, last) = (offset / PAGE, (offset + len as u64 - 1) / PAGE);
        let cached =
            match rio_sys::io::cached_pages(self.inner.buffered.as_fd(), offset, len as u64) {
                Ok(n) if n < last - first + 1 => return self.read_bytes(offset, len, true).await,
                Ok(_) => true,
                Err(_) => false, // unknown: the RWF_NOWAIT copy below is the probe
            };
        let piece = self.files.piece;
        if len <= piece {
            if let Some(mut buf) = self.files.buffer_now(len) {
                if !cached || self.inline_pays(&buf) {
                    // SAFETY: our own pool buffer of `len` bytes.
                    if unsafe { self.cached_copy(buf.as_mut_ptr(), len, offset) } {
                        return Ok(ReadBytes(Repr::Pool {
                            buf,
                            from: 0,
                            to: len,
                            inline: true,
                        }));
                    }
                } else {
                    // Cached, and the poller is awake: it copies while this thread goes on.
                    let fd = Arc::clone(&self.inner.buffered);
                    return self.read_in(buf, &fd, offset, 0, len).await;
                }
            }
            return self.read_bytes(offset, len, true).await;
        }
        let mut out: Vec<u8> = Vec::with_capacity(len);
        // SAFETY: the vector's spare capacity holds `len` > `piece` bytes, ours alone.
        if unsafe { self.cached_copy(out.as_mut_ptr(), piece, offset) } {
            // The range starts cached: the rest most likely is too, read buffered.
            let rest = &mut out.spare_capacity_mut()[piece..];
            let n = self.read_pieces(offset + piece as u64, rest, false).await?;
            // SAFETY: cached_copy initialised `out[..piece]`, read_pieces the `n` bytes
            // after it.
            unsafe { out.set_len(piece + n) };
            return Ok(ReadBytes(Repr::Heap(out, true)));
        }
        drop(out);
        self.read_bytes(offset, len, true).await
    }

    /// The descriptor and split point of a direct or buffered operation.
    fn handle(&self, direct: bool) -> (&Arc<OwnedFd>, u64) {
        match (&self.inner.direct, direct) {
            (Some(d), true) => (d, self.inner.align),
            _ => (&self.inner.buffered, 1),
        }
    }

    /// Read `[offset, offset + out.len())` into `out`; returns how many bytes it wrote, always
    /// a prefix of `out` (pieces are copied out in order), short only at the end of the file.
    async fn read_pieces(
        &self,
        offset: u64,
        out: &mut [MaybeUninit<u8>],
        direct: bool,
    ) -> Result<usize> {
        let (fd, align) = self.handle(direct);
        let end = offset + out.len() as u64;
        let start = offset & !(align - 1);
        let stop = end.div_ceil(align) * align;
        let piece = self.files.piece as u64;
        let mut next = start;
        let mut flight: VecDeque<(u64, IoFuture)> = VecDeque::with_capacity(WINDOW);
        let mut got = 0usize;
        // A finished piece's buffer carries the next piece: a call holds at most WINDOW
        // buffers, and once one is in flight it never waits on the pool (it waits for its
        // own piece instead).
        let mut spare: Option<PoolBuf> = None;
        loop {
            while flight.len() < WINDOW && next < stop {
                let n = piece.min(stop - next);
                let wait = self.files.read_wait();
                let in_flight = !flight.is_empty();
                let Some(buf) = (self.files)
                    .piece_buffer(&mut spare, n as usize, in_flight, wait)
                    .await?
                else {
                    break;
                };
                flight.push_back((next, self.submit(fd, OpKind::Read, next, n, Some(buf))));
                next += n;
            }
            let Some((at, fut)) = flight.pop_front() else {
                return Ok(got);
            };
            let (n, buf) = done_bytes(fut.await)?;
            let buf = spare.insert(buf.expect("a read hands its buffer back"));
            // The wanted part of this piece: [max(at, offset), min(at + n, end)).
            let lo = at.max(offset);
            let hi = (at + n).min(end);
            if hi > lo {
                let src = &buf.as_slice()[(lo - at) as usize..(hi - at) as usize];
                let dst = &mut out[(lo - offset) as usize..(hi - offset) as usize];
                // SAFETY: `dst` and `src` have the same length (both `hi - lo`), and a pool
                // buffer never overlaps the caller's memory.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        src.as_ptr(),
                        dst.as_mut_ptr().cast::<u8>(),
                        src.len(),
                    )
                };
                got = (hi - offset) as usize;
            }
            if at + n < (at + buf.len() as u64).min(stop) {
                // End of file: the pieces after this one read nothing more (dropping their
                // futures hands their buffers home when they complete).
                return Ok(got);
            }
        }
    }

    /// Write all of `data` at `offset`. Any offset and length: with O_DIRECT, the aligned
    /// middle goes direct and an unaligned head or tail through the buffered handle (never
    /// the same page).
    pub async fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.check_writable()?;
        check_range(&self.inner.path, offset, data.len() as u64)?;
        let end = offset + data.len() as u64;
        if self.is_direct() {
            let a = self.inner.align;
            let mid_lo = offset.div_ceil(a) * a;
            let mid_hi = end & !(a - 1);
            if mid_hi > mid_lo {
                let slice =
                    |lo: u64, hi: u64| &data[(lo - offset) as usize..(hi - offset) as usize];
                match self.write_pieces(mid_lo, slice(mid_lo, mid_hi), true).await {
                    Ok(()) => {
                        self.write_pieces(offset, slice(offset, mid_lo), false)
                            .await?;
                        return self.write_pieces(mid_hi, slice(mid_hi, end), false).await;
                    }
                    Err(e) if is_einval(&e) => self.direct_refused(&e),
                    Err(e) => return Err(e),
                }
            }
        }
        self.write_pieces(offset, data, false).await
    }

    fn check_writable(&self) -> Result<()> {
        if self.inner.writable {
            Ok(())
        } else {
            Err(Error::Unsupported {
                op: OpKind::Write,
                backend: "a file opened read-only",
            })
        }
    }

    async fn write_pieces(&self, offset: u64, data: &[u8], direct: bool) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let fd = match (&self.inner.direct, direct) {
            (Some(d), true) => d,
            _ => &self.inner.buffered,
        };
        let piece = self.files.piece;
        let mut flight: VecDeque<(u64, usize, IoFuture)> = VecDeque::with_capacity(WINDOW);
        let mut chunks = data.chunks(piece).enumerate().peekable();
        let mut spare: Option<PoolBuf> = None;
        loop {
            while flight.len() < WINDOW {
                let Some(&(_, c)) = chunks.peek() else { break };
                let in_flight = !flight.is_empty();
                let Some(mut buf) = (self.files)
                    .piece_buffer(&mut spare, c.len(), in_flight, self.files.write_wait())
                    .await?
                else {
                    break;
                };
                let (i, c) = chunks.next().expect("peeked");
                buf.as_mut_slice().copy_from_slice(c);
                let at = offset + (i * piece) as u64;
                let fut = self.submit(fd, OpKind::Write, at, c.len() as u64, Some(buf));
                flight.push_back((at, c.len(), fut));
            }
            let Some((at, len, fut)) = flight.pop_front() else {
                return Ok(());
            };
            let (n, buf) = done_bytes(fut.await)?;
            spare = buf;
            if (n as usize) < len {
                // A short write (the file system ran out of room part way): the rest again,
                // buffered, so the error is the file system's own.
                let rest = &data[(at - offset) as usize + n as usize..(at - offset) as usize + len];
                self.write_rest(at + n, rest, spare.take()).await?;
            }
        }
    }

    /// The remainder of a short write, one buffered write at a time until done or an error;
    /// `spare` (the short write's own buffer, if the caller has it) carries the first piece.
    async fn write_rest(
        &self,
        mut at: u64,
        mut rest: &[u8],
        mut spare: Option<PoolBuf>,
    ) -> Result<()> {
        while !rest.is_empty() {
            let c = &rest[..rest.len().min(self.files.piece)];
            let mut buf = match spare
                .take()
                .and_then(|mut b| b.set_len(c.len()).is_ok().then_some(b))
            {
                Some(b) => b,
                None => self.files.buffer(c.len(), self.files.write_wait()).await?,
            };
            buf.as_mut_slice().copy_from_slice(c);
            let fut = self.submit(
                &self.inner.buffered,
                OpKind::Write,
                at,
                c.len() as u64,
                Some(buf),
            );
            let (n, back) = done_bytes(fut.await)?;
            spare = back;
            if n == 0 {
                return Err(Error::Io(IoError {
                    op: OpKind::Write,
                    offset: at,
                    len: c.len() as u64,
                    kind: IoErrorKind::Short { done: 0 },
                }));
            }
            at += n;
            rest = &rest[n as usize..];
        }
        Ok(())
    }

    /// Make what was written durable (fdatasync, through the runtime).
    pub async fn sync_data(&self) -> Result<()> {
        let fut = self
            .files
            .rt
            .submit_file(&self.inner.buffered, OpKind::Flush, 0, 0, None);
        fut.await.map(|_| ()).map_err(Error::from)
    }

    /// A sequential writer starting at `offset`.
    pub fn writer(&self, offset: u64) -> SeqWriter {
        SeqWriter {
            file: self.clone(),
            pos: offset,
            stage: None,
            fill: 0,
            pending: None,
            written: 0,
        }
    }
}

fn check_range(path: &Path, offset: u64, len: u64) -> Result<()> {
    if offset.checked_add(len).is_none_or(|e| e > i64::MAX as u64) {
        return Err(Error::OutOfRange {
            offset,
            len,
            size: i64::MAX as u64,
        });
    }
    let _ = path;
    Ok(())
}

/// A stream of writes to an [`OpenFile`] (an object part being stored): bytes are staged in
/// a pool buffer, and each whole aligned chunk is written with O_DIRECT from that buffer while
/// the next one fills (one write in flight); [`finish`](Self::finish) writes what is left, the
/// unaligned tail buffered. Dropping it without `finish` loses what was staged and not yet
/// written.
pub struct SeqWriter {
    file: OpenFile,
    /// File offset of the first staged byte.
    pos: u64,
    stage: Option<PoolBuf>,
    fill: usize,
    /// The write in flight: its offset, its length, and the future.
    pending: Option<(u64, usize, IoFuture)>,
    written: u64,
}

impl std::fmt::Debug for SeqWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeqWriter")
            .field("file", &self.file)
            .field("pos", &self.pos)
            .field("staged", &self.fill)
            .finish()
    }
}

impl SeqWriter {
    /// The file written (its path as given when opened or adopted).
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Bytes handed to the writer so far, as a file offset (staged, in flight or written).
    pub fn position(&self) -> u64 {
        self.pos + self.fill as u64
    }

    /// How many bytes the next chunk takes: up to the next alignment boundary first (an
    /// unaligned start), then whole pieces.
    fn chunk_len(&self) -> usize {
        let a = self.file.alignment();
        let head = self.pos % a;
        if head != 0 {
            (a - head) as usize
        } else {
            self.file.files.piece
        }
    }

    /// Stage `data`, writing every chunk that fills.
    pub async fn write(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            self.reserve().await?;
            let n = self.stage(data)?;
            data = &data[n..];
            if self.chunk_full() {
                self.write_staged().await?;
            }
        }
        Ok(())
    }

    /// Whether the next [`stage`](Self::stage) needs a new pool buffer (then
    /// [`reserve`](Self::reserve) it first in async code: `stage` would block for it).
    pub fn needs_buffer(&self) -> bool {
        self.stage.is_none()
    }

    /// Take the next chunk's pool buffer without blocking the thread: a free one, else the
    /// buffer of the write in flight once it completes, else wait (yielding) for one up to the
    /// write wait ([`Files::set_write_buffer_wait`]). Then [`stage`](Self::stage) does not
    /// wait. A writer never holds more than two
    /// buffers (the chunk filling and the one being written), so writers that all wait for
    /// a buffer cannot hold each other up.
    pub async fn reserve(&mut self) -> Result<()> {
        self.reserve_within(self.file.files.write_wait()).await
    }

    /// [`reserve`](Self::reserve), waiting at most `wait` for a free buffer once the write in
    /// flight (if any) has given its own back; `Duration::ZERO` fails at once with
    /// [`Error::BufferUnavailable`], for a host that would rather write the rest another way
    /// (the writer holds no buffer then, and [`flush`](Self::flush) needs none).
    pub async fn reserve_within(&mut self, wait: Duration) -> Result<()> {
        if self.stage.is_some() {
            return Ok(());
        }
        let want = self.chunk_len();
        let mut got = self.file.files.buffer_now(want);
        if got.is_none() && self.pending.is_some() {
            got = self
                .wait_keep()
                .await?
                .and_then(|mut b| b.set_len(want).is_ok().then_some(b));
        }
        let buf = match got {
            Some(b) => b,
            None => self.file.files.buffer(want, wait).await?,
        };
        self.stage = Some(buf);
        self.fill = 0;
        Ok(())
    }

    /// Copy as much of `data` as the current chunk takes (taking a pool buffer for a new
    /// chunk, blocking up to the write wait for one unless [`reserve`](Self::reserve)d);
    /// returns the bytes taken. No I/O: for hosts that drive the writer from `poll_write` (then
    /// [`write_staged`](Self::write_staged) when [`chunk_full`](Self::chunk_full)).
    pub fn stage(&mut self, data: &[u8]) -> Result<usize> {
        self.file.check_writable()?;
        if data.is_empty() {
            return Ok(0);
        }
        let want = match &self.stage {
            Some(b) => b.len(),
            None => {
                let want = self.chunk_len();
                self.stage = Some(
                    self.file
                        .files
                        .rt
                        .buffer(want, self.file.files.write_wait())?,
                );
                self.fill = 0;
                want
            }
        };
        let take = (want - self.fill).min(data.len());
        let b = self.stage.as_mut().expect("staged above");
        b.as_mut_slice()[self.fill..self.fill + take].copy_from_slice(&data[..take]);
        self.fill += take;
        Ok(take)
    }

    /// Whether the staged chunk is complete (time for [`write_staged`](Self::write_staged)).
    pub fn chunk_full(&self) -> bool {
        self.stage.as_ref().is_some_and(|b| self.fill == b.len())
    }

    /// Start writing what is staged (a full chunk, or less), after the write in flight
    /// finished: at most one write in flight, the next chunk fills meanwhile.
    pub async fn write_staged(&mut self) -> Result<()> {
        self.launch().await
    }

    /// Write everything staged and wait until it is written (the file's `flush`): a partial
    /// chunk goes too, and the next chunk starts where it ended (re-aligned by a head chunk).
    pub async fn flush(&mut self) -> Result<()> {
        self.launch().await?;
        self.wait().await
    }

    /// Write the staged chunk (the previous write finished first: one in flight).
    async fn launch(&mut self) -> Result<()> {
        self.wait().await?;
        let Some(buf) = self.stage.take() else {
            return Ok(());
        };
        let (at, len) = (self.pos, std::mem::take(&mut self.fill));
        if len == 0 {
            return Ok(()); // a reserved buffer nothing was staged in
        }
        self.pos += len as u64;
        let a = self.file.inner.align;
        let aligned = self.file.is_direct()
            && len == buf.len()
            && at.is_multiple_of(a)
            && (len as u64).is_multiple_of(a);
        if !aligned {
            // An unaligned head, the tail, or a buffered file: written through the buffered
            // handle straight from the staged buffer (no second buffer), then on.
            let mut buf = buf;
            buf.set_len(len).expect("the staged bytes fit their buffer");
            let fut = self.file.submit(
                &self.file.inner.buffered,
                OpKind::Write,
                at,
                len as u64,
                Some(buf),
            );
            let (n, buf) = done_bytes(fut.await)?;
            if (n as usize) < len {
                let buf = buf.expect("a write hands its buffer back");
                self.file
                    .write_rest(at + n, &buf.as_slice()[n as usize..len], None)
                    .await?;
            }
            self.written += len as u64;
            return Ok(());
        }
        let fd = self
            .file
            .inner
            .direct
            .as_ref()
            .expect("direct checked above");
        let fut = self
            .file
            .submit(fd, OpKind::Write, at, len as u64, Some(buf));
        self.pending = Some((at, len, fut));
        Ok(())
    }

    /// Wait for the write in flight, if any; a refused (EINVAL) or short direct write is done
    /// again through [`OpenFile::write_at`].
    async fn wait(&mut self) -> Result<()> {
        self.wait_keep().await.map(drop)
    }

    /// [`wait`](Self::wait), handing back the written buffer when the write succeeded.
    async fn wait_keep(&mut self) -> Result<Option<PoolBuf>> {
        let Some((at, len, fut)) = self.pending.take() else {
            return Ok(None);
        };
        match fut.await {
            Ok((n, buf)) => {
                self.written += n;
                Ok(buf)
            }
            Err(f) => {
                let IoFailure { error: e, buf } = *f;
                let short = matches!(
                    e,
                    Error::Io(IoError {
                        kind: IoErrorKind::Short { .. },
                        ..
                    })
                );
                let Some(buf) = buf.filter(|_| short || is_einval(&e)) else {
                    return Err(e);
                };
                if is_einval(&e) {
                    self.file.direct_refused(&e);
                }
                self.file.write_at(at, &buf.as_slice()[..len]).await?;
                self.written += len as u64;
                Ok(Some(buf))
            }
        }
    }

    /// Write everything staged and wait for it; returns the bytes written through this
    /// writer. Does not sync (see [`OpenFile::sync_data`]).
    pub async fn finish(mut self) -> Result<u64> {
        self.flush().await?;
        Ok(self.written)
    }

    /// Bytes written through this writer so far (completed writes).
    pub fn written(&self) -> u64 {
        self.written
    }
}
