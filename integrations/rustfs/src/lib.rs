//! rio as the disk I/O backend of RustFS's local disks.
//!
//! RustFS 1.0.1 routes the data path of a local disk (`rustfs-ecstore`'s `LocalDisk`) through
//! one trait, `LocalIoBackend`: positioned reads of part files (`pread_bytes`, what a GET
//! does), streaming readers, and the writer a PUT streams a shard into. With our patch to
//! `rustfs-ecstore` (`rustfs-ecstore.patch`, docs/RUSTFS.md) the trait is public and an
//! embedder installs a factory before the server starts; [`install`] installs this one.
//!
//! [`RioBackend`] serves every local disk of the process through **one** rio runtime
//! ([`rio::runtime::Files`]: one io_uring (or psync) queue per poller core for all files),
//! with pool buffers that never allocate on the hot path:
//! - `pread_bytes`: the part file opened and handed to rio; ranges of at least
//!   `direct_read_min` bytes are copied from the page cache when it holds them (checked
//!   without waiting, on RustFS's thread) and otherwise go O_DIRECT (cold data straight from
//!   the device, no page-cache pollution; RustFS's shard blocks are not 4 KiB aligned, so
//!   the range is widened); smaller ones go through the page cache, first copied inline
//!   when cached. A range that fits one pool buffer (1 MiB) is
//!   returned as that buffer (`Bytes::from_owner`: no copy); a longer one is read in pieces
//!   of 1 MiB, 4 in flight, copied into one allocation.
//! - The runtime's pollers sleep in the kernel while reads are in flight
//!   (`Settings::block_poll`) instead of spinning beside RustFS's own work.
//! - `open_read_stream` / `open_full_read`: a reader that keeps the next pieces in flight
//!   while the caller consumes the current one (read-ahead).
//! - `open_write` (truncate): by default RustFS's own writer (`Settings::rio_writes`: through
//!   the page cache, as stock, which measured faster end to end); with `RIO_RUSTFS_WRITES=rio`
//!   a [`rio::runtime::SeqWriter`]: the stream staged in pool buffers, whole aligned chunks
//!   written O_DIRECT while the next fills (objects of at least `direct_write_min` bytes), the
//!   unaligned tail buffered at shutdown. RustFS's commit (fdatasync, rename, directory
//!   fsync) is outside the trait and unchanged.
//! - Open part files are kept per disk (`fd_cache`, like RustFS's own backend's cache), and
//!   dropped by the invalidation hooks RustFS calls on every rename, delete and close.
//! - Anything rio cannot do as RustFS would, it leaves to RustFS's own `StdBackend`: a path
//!   RustFS's rules reject, a file that is missing or shorter than the range, an I/O error
//!   (logged with rio's typed error, then read again by `StdBackend`, so the error RustFS
//!   acts on, e.g. `FileNotFound` that triggers a heal, is exactly its own), append writes.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use rio::runtime::{Files, OpenFile, SeqWriter};
use rustfs_ecstore::api::disk::error::Result;
use rustfs_ecstore::api::disk::{
    FileReader, FileWriter, LocalIoBackend, MmapCopyStageMetrics, StdBackend, WriteMode,
    local_disk_object_path,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Settings of the rio backend (environment: [`Settings::from_env`]).
#[derive(Clone, Debug)]
pub struct Settings {
    /// The engine: backend, queue depth, pools, direct I/O, the p99 target
    /// (`RUSTFS_TARGET_LATENCY_US`), all of rio's `RIO_*` knobs.
    pub engine: rio::EngineConfig,
    /// Reads of at least this many bytes go O_DIRECT unless the page cache holds them
    /// (`RIO_RUSTFS_DIRECT_READ_MIN`, bytes; default 256 KiB: the shards of objects from
    /// 512 KiB up on four drives). Smaller ones go through the page cache, as RustFS's own do.
    pub direct_read_min: usize,
    /// Part files of at least this size hint are written O_DIRECT (`RIO_RUSTFS_DIRECT_WRITE_MIN`,
    /// bytes; default 1 MiB; an unknown size counts as large).
    pub direct_write_min: i64,
    /// Part files are left to RustFS's own writer (`RIO_RUSTFS_WRITES=std`, the default:
    /// through the page cache, as stock RustFS writes them; rio serves every read) or written
    /// by rio (`rio`: O_DIRECT from `direct_write_min`, else buffered through rio's pollers).
    /// With `std`, freshly written parts sit in the page cache as they do under stock, and
    /// rio reads what the cache holds from there and the rest O_DIRECT. Measured in the
    /// end-to-end run (docs/RUSTFS.md, session 14): `std` GETs 1.11-1.14x stock against
    /// 0.98-1.10x with `rio` in the same runs, PUTs the same; rio's O_DIRECT writes kept
    /// large parts out of the page cache, so warm GETs of them read the device (0.75-0.90x).
    /// `rio` suits a node whose data dwarfs its memory (writes do not evict hot data).
    pub rio_writes: bool,
    /// Pieces a streaming reader keeps in flight ahead of the caller (`RIO_RUSTFS_READ_AHEAD`,
    /// default 2).
    pub read_ahead: usize,
    /// Pollers sleep in the kernel while reads are in flight, woken by a completion or a
    /// submission (`RIO_RUSTFS_POLL=block`, the default), or spin until idle
    /// (`RIO_RUSTFS_POLL=spin`, rio's default elsewhere). A RustFS node's CPUs hash, encode
    /// and serve the network; a poller spinning through a 500 µs read takes a core from them.
    pub block_poll: bool,
    /// When cached data is copied on RustFS's own thread rather than by rio's poller
    /// (`RIO_RUSTFS_INLINE_CACHED`: `idle`, the default: when the poller is parked; `always`;
    /// `off`). See `rio::runtime::InlineReads`.
    pub inline_cached: rio::runtime::InlineReads,
    /// Open part files kept per disk between reads (`RIO_RUSTFS_FD_CACHE`, default 256; 0
    /// turns the cache off). Each holds two descriptors (buffered and O_DIRECT); the cache is
    /// off when RLIMIT_NOFILE's soft limit is under 4096, as RustFS's own is when low.
    pub fd_cache: usize,
    /// Ranges remembered as recently read, for cache admission on a second read
    /// (`RIO_RUSTFS_CACHE_REREADS`: how many ranges; default 0, off). A large read that the page
    /// cache does not hold goes O_DIRECT the first time; read again while still remembered,
    /// it goes through the page cache, which then keeps it for the reads after (data written
    /// O_DIRECT, as large parts are, is otherwise never cached, and an object read over and
    /// over would come from the device every time). Read once, data stays out of the cache,
    /// as in a 2Q cache's admission. A fixed table of hashes: no allocation per read; a
    /// collision only makes one read go the other way. Off by default: in the end-to-end run
    /// (docs/RUSTFS.md, session 12) 4096 ranges made warm 1 MiB GETs about 11% faster and
    /// cold GETs about 10% slower, since the cold pass re-reads objects the warm pass read
    /// and a buffered read of uncached data is slower here than O_DIRECT.
    pub cache_rereads: usize,
}

impl Settings {
    /// rio's engine settings from its environment (`RIO_*`, `RUSTFS_TARGET_LATENCY_US`) and
    /// the adapter's own (`RIO_RUSTFS_*`).
    pub fn from_env() -> std::result::Result<Settings, String> {
        let mut engine = rio::EngineConfig::from_env().map_err(|e| e.to_string())?;
        // A drive under 32 concurrent large GETs keeps 32 x (shard streams) x read-ahead
        // 1 MiB pieces in flight: rio's default cap (64 MiB per core) runs dry, and each read
        // that finds it so goes to a plain pread. The pools grow on demand up to this cap
        // (nothing is mapped until then); an explicit setting wins.
        if ["RIO_BUFFER_POOL_BYTES", "RUSTFS_MAX_BUFFER_POOL_SIZE"]
            .iter()
            .all(|k| std::env::var_os(k).is_none())
        {
            engine.buffer_pool_bytes = engine.buffer_pool_bytes.max(DEFAULT_POOL_BYTES);
        }
        let num = |name: &str, default: u64| -> std::result::Result<u64, String> {
            match std::env::var(name) {
                Ok(v) => v
                    .trim()
                    .parse::<u64>()
                    .map_err(|e| format!("{name}={v}: {e}")),
                Err(_) => Ok(default),
            }
        };
        Ok(Settings {
            engine,
            direct_read_min: num("RIO_RUSTFS_DIRECT_READ_MIN", 256 << 10)? as usize,
            direct_write_min: num("RIO_RUSTFS_DIRECT_WRITE_MIN", 1 << 20)?.min(i64::MAX as u64)
                as i64,
            rio_writes: match std::env::var("RIO_RUSTFS_WRITES").as_deref() {
                Ok("rio") => true,
                Err(_) | Ok("std") => false,
                Ok(v) => return Err(format!("RIO_RUSTFS_WRITES={v}: expected rio or std")),
            },
            read_ahead: num("RIO_RUSTFS_READ_AHEAD", 2)?.clamp(1, 16) as usize,
            fd_cache: num("RIO_RUSTFS_FD_CACHE", 256)?.min(1 << 16) as usize,
            cache_rereads: num("RIO_RUSTFS_CACHE_REREADS", 0)?.min(1 << 24) as usize,
            inline_cached: match std::env::var("RIO_RUSTFS_INLINE_CACHED").as_deref() {
                Err(_) | Ok("idle") => rio::runtime::InlineReads::WhenPollerIdle,
                Ok("always") => rio::runtime::InlineReads::Always,
                Ok("off") => rio::runtime::InlineReads::Off,
                Ok(v) => {
                    return Err(format!(
                        "RIO_RUSTFS_INLINE_CACHED={v}: expected idle, always or off"
                    ));
                }
            },
            block_poll: match std::env::var("RIO_RUSTFS_POLL").as_deref() {
                Err(_) | Ok("block") => true,
                Ok("spin") => false,
                Ok(v) => return Err(format!("RIO_RUSTFS_POLL={v}: expected block or spin")),
            },
        })
    }
}

/// Empty polls before a poller sleeps (`Settings::block_poll`): a few microseconds, short
/// against a part file read.
const BLOCK_AFTER_POLLS: u32 = 200;

/// The adapter's default cap on rio's buffer pools, per core (`RIO_BUFFER_POOL_BYTES`).
pub const DEFAULT_POOL_BYTES: usize = 256 << 20;

/// Counters of the rio backend, for every disk of the process.
#[derive(Debug, Default)]
pub struct Stats {
    /// `pread_bytes` served by rio.
    pub reads: AtomicU64,
    /// Bytes they returned.
    pub read_bytes: AtomicU64,
    /// Of the reads, those that went O_DIRECT (straight from the device: long enough, and
    /// not in the page cache).
    pub direct_reads: AtomicU64,
    /// Of the reads, those sent through the page cache (rather than O_DIRECT, whatever
    /// `cachestat` says) because the same range was read recently
    /// ([`Settings::cache_rereads`]); those served inline count in `inline_reads` too.
    pub cache_rereads: AtomicU64,
    /// Of the reads, those copied from the page cache on the calling thread
    /// (`RWF_NOWAIT`; see `rio::runtime::Files::set_inline_cached_reads`).
    pub inline_reads: AtomicU64,
    /// Streaming readers (`open_read_stream`, `open_full_read`) served by rio.
    pub streams: AtomicU64,
    /// Writers opened on rio.
    pub writers: AtomicU64,
    /// Of the writers, those writing whole chunks O_DIRECT.
    pub direct_writers: AtomicU64,
    /// Calls left to RustFS's `StdBackend` (a path it rejects, a missing or short file, an
    /// append writer).
    pub delegated: AtomicU64,
    /// rio I/O errors (each logged with rio's typed error; the call then went to `StdBackend`).
    pub io_errors: AtomicU64,
    /// Reads done outside rio because its buffer pool was spent (more reads in flight than
    /// pool buffers, e.g. many large GETs at once): a plain `pread` on a blocking thread for a
    /// stream's piece, RustFS's own backend for a `pread_bytes`. Backpressure, not an error.
    pub pool_overflows: AtomicU64,
}

struct Shared {
    files: Arc<Files>,
    /// Recently read ranges ([`Settings::cache_rereads`]).
    rereads: Option<ReReads>,
    settings: Settings,
    stats: Arc<Stats>,
    /// rio's OTLP exporter (with `RIO_OTEL=1`): the runtime's latency windows, pools and
    /// alerts, beside RustFS's own metrics. Lives as long as the process.
    _telemetry: Option<rio_otel::Telemetry>,
}

static SHARED: OnceLock<std::result::Result<Arc<Shared>, String>> = OnceLock::new();
static STATS: OnceLock<Arc<Stats>> = OnceLock::new();

/// The process-wide counters (all disks).
pub fn stats() -> Arc<Stats> {
    Arc::clone(STATS.get_or_init(Default::default))
}

/// The runtime every disk of the process shares, started on the first disk's root.
fn shared(root: &Path, settings: &Settings) -> std::result::Result<Arc<Shared>, String> {
    SHARED
        .get_or_init(|| {
            let mut rt = settings.engine.runtime_config();
            if settings.block_poll && !settings.engine.busy_poll {
                rt.idle = rio::runtime::IdlePolicy::Block {
                    spin: BLOCK_AFTER_POLLS,
                    max_sleep: std::time::Duration::from_millis(1),
                };
            }
            let telemetry = if settings.engine.otel_export {
                let t = rio_otel::TelemetryConfig::from_env(&settings.engine)
                    .and_then(rio_otel::Telemetry::start)
                    .map_err(|e| format!("rio telemetry: {e}"))?;
                rt.sink = Some(Arc::new(t.sink("files", "rustfs")));
                Some(t)
            } else {
                None
            };
            let files = Files::open_with(root, &settings.engine, rt).map_err(|e| e.to_string())?;
            // A read that finds the pool spent is served by a plain pread at once rather than
            // queued behind the pool (Stats::pool_overflows).
            files.set_read_buffer_wait(std::time::Duration::ZERO);
            files.set_inline_cached_reads(settings.inline_cached);
            if let Some(t) = &telemetry {
                t.watch_pools(Arc::clone(files.runtime().pools()));
            }
            tracing::info!(
                backend = files.runtime().engine().selection().backend.name(),
                reason = %files.runtime().engine().selection().reason,
                cores = ?files.runtime().cores(),
                "rio serves RustFS's local disks"
            );
            Ok(Arc::new(Shared {
                files,
                rereads: (settings.cache_rereads > 0).then(|| ReReads::new(settings.cache_rereads)),
                settings: settings.clone(),
                stats: stats(),
                _telemetry: telemetry,
            }))
        })
        .clone()
}

/// Install the rio backend for every local disk RustFS opens from now on (call before the
/// server starts). Returns `false` if a factory was installed already. A disk whose runtime
/// cannot start keeps RustFS's own backend (logged).
pub fn install(settings: Settings) -> bool {
    rustfs_ecstore::api::disk::set_local_io_backend_factory(Arc::new(move |root: PathBuf| {
        match RioBackend::new(root.clone(), &settings) {
            Ok(b) => Some(Arc::new(b) as Arc<dyn LocalIoBackend>),
            Err(e) => {
                tracing::error!(root = %root.display(), error = %e, "rio backend unavailable; this disk keeps RustFS's own");
                None
            }
        }
    }))
}

/// A table of range hashes, one per slot ([`Settings::cache_rereads`]).
struct ReReads {
    slots: Box<[AtomicU64]>,
}

impl ReReads {
    fn new(n: usize) -> ReReads {
        ReReads {
            slots: (0..n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Whether `(root, volume, path, offset, length)` was read recently; remembered if not.
    fn seen(&self, root: &Path, volume: &str, path: &str, offset: usize, length: usize) -> bool {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (root, volume, path, offset, length).hash(&mut h);
        let h = h.finish() | 1; // never 0, an empty slot
        let slot = &self.slots[(h % self.slots.len() as u64) as usize];
        if slot.load(Ordering::Relaxed) == h {
            return true;
        }
        slot.store(h, Ordering::Relaxed);
        false
    }
}

/// Open part files of one disk, kept between reads (RustFS's own backend keeps such a cache
/// too; without one every GET would open its part files again). RustFS calls the
/// invalidation hooks on every path that replaces or removes a file (rename_data,
/// rename_file, delete, delete_volume, close); a generation counter keeps a descriptor
/// opened before an invalidation from being inserted after it.
struct FdCache {
    map: Mutex<std::collections::HashMap<(String, String), (OpenFile, u64)>>,
    generation: AtomicU64,
    cap: usize,
}

impl FdCache {
    fn new(cap: usize) -> Option<FdCache> {
        (cap > 0 && nofile_allows(cap)).then(|| FdCache {
            map: Mutex::new(std::collections::HashMap::with_capacity(cap)),
            generation: AtomicU64::new(0),
            cap,
        })
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<(String, String), (OpenFile, u64)>>
    {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, volume: &str, path: &str) -> Option<(OpenFile, u64)> {
        self.lock()
            .get(&(volume.to_owned(), path.to_owned()))
            .cloned()
    }

    fn insert(&self, volume: &str, path: &str, entry: (OpenFile, u64), generation: u64) {
        let mut m = self.lock();
        if self.generation.load(Ordering::Acquire) != generation {
            return; // invalidated while it was being opened
        }
        if m.len() >= self.cap {
            // Any entry: the cache is a shortcut, not a working set to protect.
            if let Some(k) = m.keys().next().cloned() {
                m.remove(&k);
            }
        }
        m.insert((volume.to_owned(), path.to_owned()), entry);
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn invalidate_exact(&self, volume: &str, path: &str) {
        self.bump();
        self.lock().remove(&(volume.to_owned(), path.to_owned()));
    }

    fn invalidate_under(&self, volume: &str, path: &str) {
        self.bump();
        let prefix = format!("{}/", path.trim_end_matches('/'));
        self.lock()
            .retain(|(v, p), _| !(v == volume && (p == path || p.starts_with(&prefix))));
    }

    fn invalidate_volume(&self, volume: &str) {
        self.bump();
        self.lock().retain(|(v, _), _| v != volume);
    }

    fn clear(&self) {
        self.bump();
        self.lock().clear();
    }
}

/// Whether RLIMIT_NOFILE leaves room for a cache of `cap` entries (two descriptors each) per
/// disk beside everything else the server opens.
fn nofile_allows(cap: usize) -> bool {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a live out-parameter of the right type.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return false;
    }
    r.rlim_cur >= 4096 && r.rlim_cur as usize >= cap * 16
}

/// A local disk's I/O through rio (see the crate doc).
pub struct RioBackend {
    root: PathBuf,
    std: StdBackend,
    shared: Arc<Shared>,
    cache: Option<FdCache>,
}

impl std::fmt::Debug for RioBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RioBackend")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl RioBackend {
    /// The backend of the disk whose I/O root is `root` (what RustFS hands the factory).
    pub fn new(root: PathBuf, settings: &Settings) -> std::result::Result<RioBackend, String> {
        Ok(RioBackend {
            shared: shared(&root, settings)?,
            std: StdBackend::new(root.clone()),
            cache: FdCache::new(settings.fd_cache),
            root,
        })
    }

    /// The runtime serving this disk (shared by every disk of the process).
    pub fn files(&self) -> &Arc<Files> {
        &self.shared.files
    }

    fn delegated(&self) {
        self.shared.stats.delegated.fetch_add(1, Ordering::Relaxed);
    }

    /// Open `volume`/`path` for reading on rio, if RustFS's path rules accept it and it
    /// exists and holds at least `end` bytes; `None` leaves the call to `StdBackend`.
    fn open_read(
        &self,
        volume: &str,
        path: &str,
        end: Option<u64>,
        direct: bool,
    ) -> Option<(OpenFile, u64)> {
        let cached = self.cache.as_ref().and_then(|c| c.get(volume, path));
        let (f, len) = match cached {
            Some(e) => e,
            None => {
                let generation = self
                    .cache
                    .as_ref()
                    .map(|c| c.generation.load(Ordering::Acquire));
                let p = local_disk_object_path(&self.root, volume, path).ok()?;
                let file = std::fs::File::open(&p).ok()?;
                // A cached file may serve large reads later: give it its O_DIRECT twin now.
                let f = self
                    .shared
                    .files
                    .adopt_with(file, p, direct || self.cache.is_some())
                    .ok()?;
                let len = f.len().ok()?;
                if let (Some(c), Some(g)) = (&self.cache, generation) {
                    c.insert(volume, path, (f.clone(), len), g);
                }
                (f, len)
            }
        };
        if end.is_some_and(|e| len < e) {
            return None;
        }
        Some((f, len))
    }

    fn io_error(&self, what: &str, volume: &str, path: &str, e: &rio::Error) {
        self.shared.stats.io_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(volume, path, error = %e, "rio {what} failed; RustFS's own backend tries it");
    }

    async fn pread_rio(
        &self,
        volume: &str,
        path: &str,
        offset: usize,
        length: usize,
    ) -> Option<Bytes> {
        let end = offset.checked_add(length)? as u64;
        let direct = length >= self.shared.settings.direct_read_min;
        let (f, _) = self.open_read(volume, path, Some(end), direct)?;
        let direct = direct && f.is_direct();
        // One pool buffer's worth (a shard of objects up to a few MiB) comes back as that
        // buffer, handed to RustFS as the `Bytes`' owner: no copy, no zeroing; the buffer
        // goes home when RustFS drops the bytes.
        let reread = direct
            && self
                .shared
                .rereads
                .as_ref()
                .is_some_and(|r| r.seen(&self.root, volume, path, offset, length));
        let r = if reread {
            // Read before: through the page cache, which keeps it for the next reads.
            f.read_bytes(offset as u64, length, false).await
        } else if direct {
            // From the page cache if it holds the range (warm: no device read), else O_DIRECT.
            f.read_bytes_auto(offset as u64, length).await
        } else {
            f.read_bytes(offset as u64, length, false).await
        };
        match r {
            Ok(v) if v.len() == length => {
                let st = &self.shared.stats;
                st.reads.fetch_add(1, Ordering::Relaxed);
                st.read_bytes.fetch_add(length as u64, Ordering::Relaxed);
                if reread {
                    st.cache_rereads.fetch_add(1, Ordering::Relaxed);
                }
                if v.served_inline() {
                    st.inline_reads.fetch_add(1, Ordering::Relaxed);
                } else if direct && !reread {
                    st.direct_reads.fetch_add(1, Ordering::Relaxed);
                }
                Some(Bytes::from_owner(v))
            }
            Ok(_) => None, // the file shrank under us: StdBackend reports it its way
            Err(rio::Error::BufferUnavailable { .. }) => {
                self.shared
                    .stats
                    .pool_overflows
                    .fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(e) => {
                self.io_error("read", volume, path, &e);
                None
            }
        }
    }
}

#[async_trait::async_trait]
impl LocalIoBackend for RioBackend {
    async fn pread_bytes(
        &self,
        volume: &str,
        path: &str,
        offset: usize,
        length: usize,
        metrics: Option<MmapCopyStageMetrics>,
    ) -> Result<Bytes> {
        if let Some(b) = self.pread_rio(volume, path, offset, length).await {
            return Ok(b);
        }
        self.delegated();
        self.std
            .pread_bytes(volume, path, offset, length, metrics)
            .await
    }

    async fn open_read_stream(
        &self,
        volume: &str,
        path: &str,
        offset: usize,
        length: usize,
    ) -> Result<FileReader> {
        // RustFS's own stream checks that `offset + length` is within the file, then reads
        // from `offset` to the end of the file (its callers stop after `length`): the same
        // here, with read-ahead over the asked range and on demand past it.
        let direct = length >= self.shared.settings.direct_read_min;
        let want = offset.checked_add(length).map(|e| e as u64);
        if let Some(want) = want
            && let Some((f, _)) = self.open_read(volume, path, Some(want), direct)
            && let Ok(len) = f.len()
        {
            self.shared.stats.streams.fetch_add(1, Ordering::Relaxed);
            let direct = direct && f.is_direct();
            return Ok(Box::new(RioReader::new(
                f,
                offset as u64,
                want,
                len,
                direct,
                &self.shared.settings,
                Arc::clone(&self.shared.stats),
            )));
        }
        self.delegated();
        self.std
            .open_read_stream(volume, path, offset, length)
            .await
    }

    async fn open_full_read(&self, volume: &str, path: &str) -> Result<FileReader> {
        if let Some((f, _)) = self.open_read(volume, path, None, true)
            && let Ok(len) = f.len()
        {
            let direct = len as usize >= self.shared.settings.direct_read_min && f.is_direct();
            self.shared.stats.streams.fetch_add(1, Ordering::Relaxed);
            return Ok(Box::new(RioReader::new(
                f,
                0,
                len,
                len,
                direct,
                &self.shared.settings,
                Arc::clone(&self.shared.stats),
            )));
        }
        self.delegated();
        self.std.open_full_read(volume, path).await
    }

    async fn open_write(&self, volume: &str, path: &str, mode: WriteMode) -> Result<FileWriter> {
        if let WriteMode::Truncate { size_hint } = mode
            && self.shared.settings.rio_writes
            && let Some(w) = self.open_write_rio(volume, path, size_hint)
        {
            self.shared.stats.writers.fetch_add(1, Ordering::Relaxed);
            return Ok(Box::new(w));
        }
        self.delegated();
        self.std.open_write(volume, path, mode).await
    }

    async fn invalidate_cached_fd(&self, volume: &str, path: &str) {
        if let Some(c) = &self.cache {
            c.invalidate_exact(volume, path);
        }
        self.std.invalidate_cached_fd(volume, path).await;
    }

    fn invalidate_cached_fds_under(&self, volume: &str, path: &str) {
        if let Some(c) = &self.cache {
            c.invalidate_under(volume, path);
        }
        self.std.invalidate_cached_fds_under(volume, path);
    }

    fn invalidate_cached_fds_for_volume(&self, volume: &str) {
        if let Some(c) = &self.cache {
            c.invalidate_volume(volume);
        }
        self.std.invalidate_cached_fds_for_volume(volume);
    }

    async fn clear_cached_fds(&self) {
        if let Some(c) = &self.cache {
            c.clear();
        }
        self.std.clear_cached_fds().await;
    }
}

impl RioBackend {
    /// A truncating writer on rio, if the volume exists and RustFS's path rules accept the
    /// path; the parent directories are made as RustFS's own writer makes them.
    fn open_write_rio(&self, volume: &str, path: &str, size_hint: i64) -> Option<RioWriter> {
        let p = local_disk_object_path(&self.root, volume, path).ok()?;
        let vol = self.root.join(volume);
        if !vol.is_dir() {
            return None; // StdBackend reports the missing volume its way
        }
        if let Some(parent) = p.parent()
            && parent != vol
        {
            std::fs::create_dir_all(parent).ok()?;
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .ok()?;
        let direct = size_hint < 0 || size_hint >= self.shared.settings.direct_write_min;
        let f = self.shared.files.adopt_with(file, p, direct).ok()?;
        if f.is_direct() {
            self.shared
                .stats
                .direct_writers
                .fetch_add(1, Ordering::Relaxed);
        }
        Some(RioWriter {
            state: WState::Idle(Box::new(f.writer(0))),
            stats: Arc::clone(&self.shared.stats),
        })
    }
}

fn to_io(e: rio::Error) -> io::Error {
    io::Error::other(e)
}

type Pending<T> = Mutex<Pin<Box<dyn Future<Output = T> + Send>>>;

/// A part file's reader: pieces of at most 1 MiB read ahead of the caller up to the end of
/// the range asked for (`want`), one at a time on demand past it, up to the end of the file.
struct RioReader {
    file: OpenFile,
    /// Next offset to request, the end of the asked range, and the end of the stream.
    next: u64,
    want: u64,
    end: u64,
    direct: bool,
    ahead: usize,
    flight: VecDeque<Piece>,
    cur: Vec<u8>,
    pos: usize,
    stats: Arc<Stats>,
}

const PIECE: u64 = 1 << 20;

/// A piece of a stream: its read in flight (polled from `poll_read` whether or not it is the
/// next one the caller needs, so the read-ahead is really in flight), or its result.
enum Piece {
    Running(Pending<rio::Result<Vec<u8>>>),
    Done(rio::Result<Vec<u8>>),
}

impl RioReader {
    fn new(
        file: OpenFile,
        offset: u64,
        want: u64,
        end: u64,
        direct: bool,
        s: &Settings,
        stats: Arc<Stats>,
    ) -> RioReader {
        RioReader {
            file,
            next: offset,
            want,
            end,
            direct,
            ahead: s.read_ahead,
            flight: VecDeque::new(),
            cur: Vec::new(),
            pos: 0,
            stats,
        }
    }

    fn launch(&mut self) {
        loop {
            let (limit, ahead) = if self.next < self.want {
                (self.want, self.ahead)
            } else {
                (self.end, 1)
            };
            if self.flight.len() >= ahead || self.next >= limit {
                break;
            }
            let n = PIECE.min(limit - self.next) as usize;
            let (f, at, direct) = (self.file.clone(), self.next, self.direct);
            let stats = Arc::clone(&self.stats);
            self.next += n as u64;
            self.flight
                .push_back(Piece::Running(Mutex::new(Box::pin(async move {
                    let r = if direct {
                        f.read_at(at, n).await
                    } else {
                        f.read_buffered_at(at, n).await
                    };
                    let v = match r {
                        // rio's pool is spent (more pieces in flight than buffers): read this one
                        // outside it rather than fail the stream (RustFS would mark the drive
                        // faulty); see Stats::pool_overflows.
                        Err(rio::Error::BufferUnavailable { .. }) => {
                            stats.pool_overflows.fetch_add(1, Ordering::Relaxed);
                            overflow_read(f.path().to_path_buf(), at, n).await?
                        }
                        r => r?,
                    };
                    if v.len() < n {
                        // The file shrank while streamed.
                        return Err(rio::Error::Io(rio::IoError {
                            op: rio::OpKind::Read,
                            offset: at,
                            len: n as u64,
                            kind: rio::IoErrorKind::Short {
                                done: v.len() as u32,
                            },
                        }));
                    }
                    Ok(v)
                }))));
        }
    }

    /// Poll every piece still running (each registers `cx`'s waker); true if the next piece
    /// is done.
    fn poll_pieces(&mut self, cx: &mut Context<'_>) -> bool {
        for p in self.flight.iter_mut() {
            if let Piece::Running(f) = p {
                let r = f
                    .get_mut()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_mut()
                    .poll(cx);
                if let Poll::Ready(r) = r {
                    *p = Piece::Done(r);
                }
            }
        }
        matches!(self.flight.front(), Some(Piece::Done(_)))
    }
}

/// A stream piece read with a plain `pread` on a blocking thread (rio's pool was spent);
/// fewer bytes than asked at the end of the file.
async fn overflow_read(path: PathBuf, at: u64, n: usize) -> rio::Result<Vec<u8>> {
    let p = path.clone();
    let r = tokio::task::spawn_blocking(move || -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&p)?;
        let mut v = vec![0u8; n];
        let mut done = 0;
        while done < n {
            match f.read_at(&mut v[done..], at + done as u64) {
                Ok(0) => break,
                Ok(k) => done += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        v.truncate(done);
        Ok(v)
    })
    .await
    .unwrap_or_else(|e| Err(io::Error::other(e)));
    r.map_err(|source| rio::Error::Os {
        op: "pread (rio's buffer pool spent)",
        path,
        source,
    })
}

impl AsyncRead for RioReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.pos < this.cur.len() {
                let n = (this.cur.len() - this.pos).min(out.remaining());
                out.put_slice(&this.cur[this.pos..this.pos + n]);
                this.pos += n;
                return Poll::Ready(Ok(()));
            }
            this.launch();
            if this.flight.is_empty() {
                return Poll::Ready(Ok(())); // end of the stream
            }
            if !this.poll_pieces(cx) {
                return Poll::Pending;
            }
            let Some(Piece::Done(r)) = this.flight.pop_front() else {
                unreachable!("poll_pieces said the next piece is done")
            };
            this.cur = r.map_err(to_io)?;
            this.pos = 0;
            this.launch();
        }
    }
}

enum WState {
    Idle(Box<SeqWriter>),
    Busy(Pending<(Box<SeqWriter>, rio::Result<()>)>),
    Closing(Pending<rio::Result<u64>>),
    /// Taking the next chunk's pool buffer, or, the pool being spent, going on as `Plain`.
    Reserving(Pending<io::Result<Reserved>>),
    /// The rest of the file written through the page cache by tokio's file (what RustFS's
    /// own writer does): rio's pool was spent and this writer held none of it.
    Plain(tokio::fs::File),
    Done,
    Failed,
}

enum Reserved {
    Rio(Box<SeqWriter>),
    Plain(tokio::fs::File),
}

/// A part file's writer over a [`SeqWriter`]: `poll_write` stages (no I/O unless a chunk
/// filled), `poll_flush` writes what is staged, `poll_shutdown` finishes the file.
struct RioWriter {
    state: WState,
    stats: Arc<Stats>,
}

/// The next chunk's buffer for `w`, or, with rio's pool spent and no write of `w`'s in
/// flight to take one from, the rest of the file handed to a plain writer at `w`'s position
/// (never waiting on the pool: 32 PUTs x 4 shard writers, each holding a chunk while
/// RustFS waits for all four, could otherwise wait on each other). The position is a chunk
/// boundary (nothing is staged), so no page is shared with rio's O_DIRECT writes.
async fn reserve_or_plain(mut w: Box<SeqWriter>, stats: Arc<Stats>) -> io::Result<Reserved> {
    match w.reserve_within(std::time::Duration::ZERO).await {
        Ok(()) => Ok(Reserved::Rio(w)),
        Err(rio::Error::BufferUnavailable { .. }) => {
            stats.pool_overflows.fetch_add(1, Ordering::Relaxed);
            w.flush().await.map_err(to_io)?;
            let (path, pos) = (w.path().to_path_buf(), w.position());
            drop(w);
            let f = tokio::task::spawn_blocking(move || -> io::Result<std::fs::File> {
                use std::io::Seek;
                let mut f = std::fs::OpenOptions::new().write(true).open(&path)?;
                f.seek(io::SeekFrom::Start(pos))?;
                Ok(f)
            })
            .await
            .map_err(io::Error::other)??;
            Ok(Reserved::Plain(tokio::fs::File::from_std(f)))
        }
        Err(e) => Err(to_io(e)),
    }
}

impl RioWriter {
    /// Drive a write in flight (or a reservation) to its end.
    fn settle(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let WState::Reserving(f) = &self.state {
            let r = {
                let mut fut = f.lock().unwrap_or_else(|p| p.into_inner());
                std::task::ready!(fut.as_mut().poll(cx))
            };
            match r {
                Ok(Reserved::Rio(w)) => self.state = WState::Idle(w),
                Ok(Reserved::Plain(f)) => self.state = WState::Plain(f),
                Err(e) => {
                    self.state = WState::Failed;
                    return Poll::Ready(Err(e));
                }
            }
        }
        if let WState::Busy(f) = &self.state {
            let (w, r) = {
                let mut fut = f.lock().unwrap_or_else(|p| p.into_inner());
                match fut.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(v) => v,
                }
            };
            match r {
                Ok(()) => self.state = WState::Idle(w),
                Err(e) => {
                    self.state = WState::Failed;
                    return Poll::Ready(Err(to_io(e)));
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    fn closed() -> io::Error {
        io::Error::new(
            io::ErrorKind::BrokenPipe,
            "rio writer already shut down or failed",
        )
    }
}

impl AsyncWrite for RioWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Err(e) = std::task::ready!(this.settle(cx)) {
            return Poll::Ready(Err(e));
        }
        if let WState::Plain(f) = &mut this.state {
            return Pin::new(f).poll_write(cx, buf);
        }
        let WState::Idle(w) = &mut this.state else {
            return Poll::Ready(Err(Self::closed()));
        };
        if w.needs_buffer() && !buf.is_empty() {
            // Take the next chunk's pool buffer without blocking this thread (stage would).
            let WState::Idle(w) = std::mem::replace(&mut this.state, WState::Failed) else {
                unreachable!("idle checked above")
            };
            let stats = Arc::clone(&this.stats);
            this.state = WState::Reserving(Mutex::new(Box::pin(reserve_or_plain(w, stats))));
            if let Err(e) = std::task::ready!(this.settle(cx)) {
                return Poll::Ready(Err(e));
            }
            if let WState::Plain(f) = &mut this.state {
                return Pin::new(f).poll_write(cx, buf);
            }
        }
        let WState::Idle(w) = &mut this.state else {
            return Poll::Ready(Err(Self::closed()));
        };
        let n = match w.stage(buf) {
            Ok(n) => n,
            Err(e) => {
                this.state = WState::Failed;
                return Poll::Ready(Err(to_io(e)));
            }
        };
        if w.chunk_full() {
            let WState::Idle(mut w) = std::mem::replace(&mut this.state, WState::Failed) else {
                unreachable!("idle checked above")
            };
            this.state = WState::Busy(Mutex::new(Box::pin(async move {
                let r = w.write_staged().await;
                (w, r)
            })));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if let Err(e) = std::task::ready!(this.settle(cx)) {
                return Poll::Ready(Err(e));
            }
            if let WState::Plain(f) = &mut this.state {
                return Pin::new(f).poll_flush(cx);
            }
            match std::mem::replace(&mut this.state, WState::Failed) {
                WState::Idle(mut w) if w.position() > w.written() => {
                    this.state = WState::Busy(Mutex::new(Box::pin(async move {
                        let r = w.flush().await;
                        (w, r)
                    })));
                }
                WState::Idle(w) => {
                    this.state = WState::Idle(w);
                    return Poll::Ready(Ok(()));
                }
                WState::Done => {
                    this.state = WState::Done;
                    return Poll::Ready(Ok(()));
                }
                _ => return Poll::Ready(Err(Self::closed())),
            }
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if let Err(e) = std::task::ready!(this.settle(cx)) {
                return Poll::Ready(Err(e));
            }
            if let WState::Plain(f) = &mut this.state {
                std::task::ready!(Pin::new(f).poll_shutdown(cx))?;
                this.state = WState::Done;
                return Poll::Ready(Ok(()));
            }
            match std::mem::replace(&mut this.state, WState::Failed) {
                WState::Idle(w) => {
                    this.state =
                        WState::Closing(Mutex::new(Box::pin(async move { w.finish().await })));
                }
                WState::Closing(f) => {
                    let r = {
                        let mut fut = f.lock().unwrap_or_else(|p| p.into_inner());
                        fut.as_mut().poll(cx)
                    };
                    match r {
                        Poll::Pending => {
                            this.state = WState::Closing(f);
                            return Poll::Pending;
                        }
                        Poll::Ready(Ok(_)) => {
                            this.state = WState::Done;
                            return Poll::Ready(Ok(()));
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(to_io(e))),
                    }
                }
                WState::Done => {
                    this.state = WState::Done;
                    return Poll::Ready(Ok(()));
                }
                _ => return Poll::Ready(Err(Self::closed())),
            }
        }
    }
}
