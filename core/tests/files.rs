//! A runtime over a directory serving many files by descriptor (`rio::runtime::Files`): every
//! read shape an object store uses gives the same bytes as `std::fs` (whole files, ranges,
//! unaligned offsets and lengths, empty files, reads past the end, files growing while read),
//! writes of any shape land byte for byte, on io_uring and on psync.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use rio::config::BackendChoice;
use rio::runtime::{Files, InlineReads, OpenFile};
use rio::{EngineConfig, Error};

/// A small deterministic generator (the tests' own; no timing, no host state).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn config(backend: BackendChoice) -> EngineConfig {
    let mut c = EngineConfig {
        backend,
        ..EngineConfig::default()
    };
    c.hugepages = false;
    c.buffer_pool_bytes = 64 << 20;
    c.pool_initial_buffers = 4;
    c
}

/// A runtime that copies cached data inline whenever it can (the default does so only when
/// the poller is parked, which depends on timing; the tests judge the bytes and the path).
fn files(dir: &Path, backend: BackendChoice) -> Arc<Files> {
    let fs = Files::open(dir, &config(backend)).expect("a Files runtime on a temp directory");
    fs.set_inline_cached_reads(InlineReads::Always);
    fs
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap()
}

fn read_opts() -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    o.read(true);
    o
}

fn rw_opts() -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(true).create(true);
    o
}

/// What `std` reads at `offset` for `len` bytes (short at the end of the file).
fn std_read(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let f = std::fs::File::open(path).unwrap();
    let mut out = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = f.read_at(&mut out[got..], offset + got as u64).unwrap();
        if n == 0 {
            break;
        }
        got += n;
    }
    out.truncate(got);
    out
}

fn shapes(size: u64, rng: &mut Rng) -> Vec<(u64, usize)> {
    let mut v = vec![
        (0, size as usize),                   // the whole file
        (0, size as usize + 4096),            // past the end
        (size, 100),                          // at the end: nothing
        (size + 8192, 10),                    // beyond the end: nothing
        (32, 1),                              // one byte, unaligned
        (4095, 2),                            // across a page boundary
        (4096, 4096),                         // one aligned page
        (1, size.saturating_sub(2) as usize), // all but the first and last byte
        (524_320, 524_288),                   // a RustFS shard block (32-byte hash, 512 KiB)
        (3 << 20, 2 << 20),                   // several pieces
    ];
    for _ in 0..40 {
        let off = rng.below(size + 4096);
        let len = rng.below(3 << 20) as usize;
        v.push((off, len));
    }
    v
}

fn differential_reads(backend: BackendChoice) {
    let dir = tempfile::tempdir().unwrap();
    let fs = files(dir.path(), backend);
    let mut rng = Rng(0x5eed_f11e);
    let sizes = [0u64, 1, 31, 4096, 4097, 100_000, (5 << 20) + 33];
    let rt = rt();
    for (i, &size) in sizes.iter().enumerate() {
        let name = format!("part.{i}");
        let path = dir.path().join(&name);
        std::fs::write(&path, rng.bytes(size as usize)).unwrap();
        let f = fs.open_file(Path::new(&name), &read_opts()).unwrap();
        for (off, len) in shapes(size, &mut rng) {
            let was_direct = f.is_direct();
            let got = rt.block_on(f.read_at(off, len)).unwrap();
            assert_eq!(
                f.is_direct(),
                was_direct,
                "{name}: a direct read was refused (EINVAL)"
            );
            let want = std_read(&path, off, len);
            assert_eq!(got.len(), want.len(), "{name} (size {size}) at {off}+{len}");
            assert!(
                got == want,
                "{name} (size {size}) at {off}+{len}: bytes differ"
            );
            for direct in [true, false] {
                let b = rt.block_on(f.read_bytes(off, len, direct)).unwrap();
                assert!(
                    b[..] == want[..],
                    "{name} (size {size}) at {off}+{len}, read_bytes direct={direct}: bytes differ"
                );
                // A range that fits one pool buffer once widened is that buffer, not a copy.
                if len > 0 && len + 2 * 4096 <= 1 << 20 {
                    assert!(b.is_pooled(), "{name} at {off}+{len}: copied");
                }
            }
            let b = rt.block_on(f.read_bytes_auto(off, len)).unwrap();
            assert!(
                b[..] == want[..],
                "{name} (size {size}) at {off}+{len}, read_bytes_auto: bytes differ"
            );
        }
    }
    // The files were just written: buffered read_bytes found them cached and copied them on
    // the calling thread. With that off, the same reads go through the poller.
    let inline = fs.inline_reads();
    assert!(inline > 0, "no read was served from the page cache inline");
    fs.set_inline_cached_reads(InlineReads::Off);
    let name = format!("part.{}", sizes.len() - 1);
    let f = fs.open_file(Path::new(&name), &read_opts()).unwrap();
    let want = std_read(&dir.path().join(&name), 4097, 300_000);
    let b = rt.block_on(f.read_bytes(4097, 300_000, false)).unwrap();
    assert!(
        b[..] == want[..],
        "read_bytes without the inline path: bytes differ"
    );
    assert_eq!(
        fs.inline_reads(),
        inline,
        "a read went inline while that was off"
    );
}

#[test]
fn reads_match_std_on_io_uring() {
    differential_reads(BackendChoice::Uring);
}

#[test]
fn reads_match_std_on_psync() {
    differential_reads(BackendChoice::Psync);
}

#[test]
fn files_on_ext4_or_xfs_go_direct_with_page_alignment() {
    let dir = tempfile::tempdir().unwrap();
    let fs = files(dir.path(), BackendChoice::Uring);
    let f = fs.open_file(Path::new("a"), &rw_opts()).unwrap();
    // Whether the temp directory's file system takes O_DIRECT is the host's; what rio must do
    // either way is checked: direct files split at a page or more, buffered ones at 1.
    if f.is_direct() {
        assert!(f.alignment() >= 4096 && f.alignment().is_power_of_two());
    } else {
        assert_eq!(f.alignment(), 1);
    }
    let mut c = config(BackendChoice::Uring);
    c.direct = false;
    let fs2 = Files::open(dir.path(), &c).unwrap();
    let g = fs2.open_file(Path::new("a"), &rw_opts()).unwrap();
    assert!(!g.is_direct(), "direct=false opens files buffered");
}

#[test]
fn a_file_growing_while_read_is_read_as_it_is_at_each_call() {
    let dir = tempfile::tempdir().unwrap();
    let fs = files(dir.path(), BackendChoice::Uring);
    let path = dir.path().join("growing");
    let mut w = std::fs::File::create(&path).unwrap();
    let f = fs.open_file(Path::new("growing"), &read_opts()).unwrap();
    let rt = rt();
    let mut rng = Rng(7);
    let mut all = Vec::new();
    for step in 0..20 {
        let n = rng.below(70_000) as usize + 1;
        let add = rng.bytes(n);
        w.write_all(&add).unwrap(); // buffered, not synced: the page cache holds it
        all.extend_from_slice(&add);
        let got = rt.block_on(f.read_at(0, all.len() + 10_000)).unwrap();
        assert!(
            got == all,
            "step {step}: read {} of {} bytes",
            got.len(),
            all.len()
        );
        let tail = all.len().saturating_sub(5000) as u64;
        let got = rt.block_on(f.read_at(tail + 3, 9000)).unwrap();
        assert!(got == all[tail as usize + 3..], "step {step}: tail differs");
        assert_eq!(f.len().unwrap(), all.len() as u64);
    }
}

fn differential_writes(backend: BackendChoice) {
    let dir = tempfile::tempdir().unwrap();
    let fs = files(dir.path(), backend);
    let f = fs.open_file(Path::new("w"), &rw_opts()).unwrap();
    let was_direct = f.is_direct();
    let rt = rt();
    let mut rng = Rng(99);
    let mut model: Vec<u8> = Vec::new();
    let mut writes: Vec<(u64, usize)> =
        vec![(0, 0), (0, 1), (4095, 2), (5000, 3 << 20), (8192, 4096)];
    for _ in 0..30 {
        writes.push((rng.below(4 << 20), rng.below(2 << 20) as usize));
    }
    for (off, len) in writes {
        let data = rng.bytes(len);
        rt.block_on(f.write_at(off, &data)).unwrap();
        if len > 0 {
            let end = off as usize + len;
            if model.len() < end {
                model.resize(end, 0);
            }
            model[off as usize..end].copy_from_slice(&data);
        }
        let got = std::fs::read(dir.path().join("w")).unwrap();
        assert_eq!(got.len(), model.len(), "after a write at {off}+{len}");
        assert!(got == model, "after a write at {off}+{len}: bytes differ");
    }
    rt.block_on(f.sync_data()).unwrap();
    let back = rt.block_on(f.read_at(0, model.len())).unwrap();
    assert!(back == model, "read back through rio differs");
    // rio split every write where the file system takes it: none fell back to buffered.
    assert_eq!(
        f.is_direct(),
        was_direct,
        "a direct write was refused (EINVAL)"
    );
}

#[test]
fn writes_of_any_shape_land_byte_for_byte_on_io_uring() {
    differential_writes(BackendChoice::Uring);
}

#[test]
fn writes_of_any_shape_land_byte_for_byte_on_psync() {
    differential_writes(BackendChoice::Psync);
}

/// RustFS's shard file: blocks of a 32-byte hash then the shard, one after the other, so
/// nothing after the first block is aligned; written as a stream, read back by block.
#[test]
fn a_stream_of_hash_and_shard_blocks_lands_and_reads_back_by_block() {
    let dir = tempfile::tempdir().unwrap();
    let fs = files(dir.path(), BackendChoice::Uring);
    let rt = rt();
    let mut rng = Rng(3);
    for (shard, blocks, start) in [
        (524_288usize, 9usize, 0u64),
        (1000, 50, 0),
        (524_288, 3, 77),
    ] {
        let name = format!("part.{shard}.{start}");
        let f = fs.open_file(Path::new(&name), &rw_opts()).unwrap();
        let direct = f.is_direct();
        let mut model = vec![0u8; start as usize];
        let mut w = f.writer(start);
        for _ in 0..blocks {
            let hash = rng.bytes(32);
            let data = rng.bytes(shard);
            // Fed in pieces of varying size, as a network stream arrives.
            let mut block = hash.clone();
            block.extend_from_slice(&data);
            let mut rest = &block[..];
            while !rest.is_empty() {
                let n = (rng.below(200_000) as usize + 1).min(rest.len());
                rt.block_on(w.write(&rest[..n])).unwrap();
                rest = &rest[n..];
            }
            model.extend_from_slice(&block);
        }
        let written = rt.block_on(w.finish()).unwrap();
        assert_eq!(written, model.len() as u64 - start);
        assert_eq!(
            f.is_direct(),
            direct,
            "{name}: a direct write was refused (EINVAL)"
        );
        let on_disk = std::fs::read(dir.path().join(&name)).unwrap();
        assert!(on_disk == model, "{name}: the stream differs on disk");
        let bs = (shard + 32) as u64;
        for k in 0..blocks as u64 {
            let got = rt.block_on(f.read_at(start + k * bs, bs as usize)).unwrap();
            let lo = (start + k * bs) as usize;
            assert!(
                got == model[lo..lo + bs as usize],
                "{name}: block {k} differs"
            );
        }
    }
}

#[test]
fn many_files_at_once_through_one_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let fs = files(dir.path(), BackendChoice::Uring);
    let rt = rt();
    let mut rng = Rng(11);
    let contents: Vec<Vec<u8>> = (0..64).map(|i| rng.bytes(1000 + i * 7919)).collect();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for (i, c) in contents.iter().enumerate() {
            let fs = Arc::clone(&fs);
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                let f = fs
                    .open_file(Path::new(&format!("obj{i}")), &rw_opts())
                    .unwrap();
                let mut w = f.writer(0);
                w.write(&c).await.unwrap();
                w.finish().await.unwrap();
                let back = f.read_at(0, c.len() + 1).await.unwrap();
                assert!(back == c, "obj{i} differs");
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    for (i, c) in contents.iter().enumerate() {
        assert!(std::fs::read(dir.path().join(format!("obj{i}"))).unwrap() == *c);
    }
}

#[test]
fn bad_inputs_are_typed_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let fs = files(dir.path(), BackendChoice::Uring);
    let rt = rt();
    std::fs::write(dir.path().join("ro"), b"hello").unwrap();
    let ro: OpenFile = fs.open_file(Path::new("ro"), &read_opts()).unwrap();
    assert!(matches!(
        rt.block_on(ro.write_at(0, b"x")),
        Err(Error::Unsupported { .. })
    ));
    assert!(matches!(
        fs.open_file(Path::new("missing"), &read_opts()),
        Err(Error::NotFound { .. })
    ));
    let mut app = std::fs::OpenOptions::new();
    app.append(true);
    assert!(matches!(
        fs.open_file(Path::new("ro"), &app),
        Err(Error::BadTarget { .. })
    ));
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    assert!(matches!(
        fs.open_file(Path::new("sub"), &read_opts()),
        Err(Error::BadTarget { .. })
    ));
    assert!(matches!(
        rt.block_on(ro.read_at(u64::MAX - 10, 100)),
        Err(Error::OutOfRange { .. })
    ));
    // Nothing was changed by the refused write.
    assert_eq!(std::fs::read(dir.path().join("ro")).unwrap(), b"hello");
    // A directory runtime on a file, and the NVMe driver for a directory, are refused.
    assert!(Files::open(&dir.path().join("ro"), &config(BackendChoice::Uring)).is_err());
    assert!(matches!(
        Files::open(dir.path(), &config(BackendChoice::Vfio)),
        Err(Error::BackendUnavailable { .. })
    ));
}

#[test]
fn the_nvme_driver_refuses_host_files() {
    let mut c = config(BackendChoice::Auto);
    c.queue_depth = 8;
    let rt = rio::runtime::Runtime::open("sim://size=16m", &c).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x"), [1u8; 4096]).unwrap();
    let f = Arc::new(std::os::fd::OwnedFd::from(
        std::fs::File::open(dir.path().join("x")).unwrap(),
    ));
    let buf = rt.buffer(4096, std::time::Duration::from_secs(5)).unwrap();
    let out = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(rt.submit_file(&f, rio::OpKind::Read, 0, 4096, Some(buf)));
    match out {
        Err(f) if matches!((&f.error, &f.buf), (Error::Unsupported { .. }, Some(_))) => {}
        other => panic!("expected Unsupported with the buffer back, got {other:?}"),
    }
    assert!(matches!(
        Files::with_runtime(rt),
        Err(Error::BadTarget { .. })
    ));
}

/// A writer flushed mid-chunk (a host's `poll_flush`) writes the partial chunk and goes on
/// from where it ended: the file is still the stream, byte for byte, and still direct.
#[test]
fn a_writer_flushed_mid_chunk_goes_on_where_it_ended() {
    let dir = tempfile::tempdir().unwrap();
    let fs = files(dir.path(), BackendChoice::Uring);
    let rt = rt();
    let f = fs.open_file(Path::new("flushed"), &rw_opts()).unwrap();
    let direct = f.is_direct();
    let mut rng = Rng(21);
    let mut model = Vec::new();
    let mut w = f.writer(0);
    for i in 0..12 {
        let n = rng.below(900_000) as usize + 1;
        let data = rng.bytes(n);
        rt.block_on(w.write(&data)).unwrap();
        model.extend_from_slice(&data);
        if i % 3 == 1 {
            rt.block_on(w.flush()).unwrap();
            assert_eq!(
                w.written(),
                model.len() as u64,
                "flush {i} left bytes unwritten"
            );
            assert!(std::fs::read(dir.path().join("flushed")).unwrap() == model);
        }
        assert_eq!(w.position(), model.len() as u64);
    }
    rt.block_on(w.finish()).unwrap();
    assert_eq!(f.is_direct(), direct, "a direct write was refused (EINVAL)");
    assert!(std::fs::read(dir.path().join("flushed")).unwrap() == model);
    let back = rt.block_on(f.read_buffered_at(5, model.len())).unwrap();
    assert!(back == model[5..], "buffered read back differs");
}

/// A runtime whose pools hold two buffers per class per core and never grow.
fn scarce_files(dir: &Path) -> Arc<Files> {
    let mut c = config(BackendChoice::Uring);
    c.pool_adaptive = false;
    c.pool_initial_buffers = 2;
    Files::open(dir, &c).expect("a Files runtime on a temp directory")
}

/// Buffers come back when the tasks holding them run again: a read or writer waiting for one
/// must not block its thread. On a one-thread executor, 24 tasks each write and read back
/// 3 MiB through pools of two 1 MiB buffers per core: every one finishes, byte for byte (a
/// blocking wait would hold the only thread, whose tasks hold the buffers, until its deadline
/// and fail the task).
///
/// The waits are long (2 min) so that the deadline is not what is judged: the last task to
/// get a buffer waits for most of the others, which takes as long as the host is slow (about
/// 1 s of 6.5 s beside eight CPU hogs here; past the default 5 s beside a CI build).
#[test]
fn more_readers_and_writers_than_pool_buffers_on_one_thread_all_finish() {
    let dir = tempfile::tempdir().unwrap();
    let fs = scarce_files(dir.path());
    fs.set_read_buffer_wait(std::time::Duration::from_secs(120));
    fs.set_write_buffer_wait(std::time::Duration::from_secs(120));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut rng = Rng(29);
    let contents: Vec<Vec<u8>> = (0..24).map(|i| rng.bytes((3 << 20) + i * 4099)).collect();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for (i, c) in contents.iter().enumerate() {
            let fs = Arc::clone(&fs);
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                let f = fs
                    .open_file(Path::new(&format!("big{i}")), &rw_opts())
                    .unwrap();
                let mut w = f.writer(0);
                for part in c.chunks(300_000) {
                    w.write(part).await.expect("write");
                    tokio::task::yield_now().await;
                }
                w.finish().await.expect("finish");
                let back = f.read_at(0, c.len() + 1).await.expect("read");
                assert!(back == c, "big{i} differs");
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
    for (i, c) in contents.iter().enumerate() {
        assert!(std::fs::read(dir.path().join(format!("big{i}"))).unwrap() == *c);
    }
}

/// Every 1 MiB buffer the pools have now (round robin over the cores until each refused).
fn hold_every_buffer(fs: &Files) -> Vec<rio::pool::PoolBuf> {
    let mut held = Vec::new();
    let cores = fs.runtime().cores().len();
    let mut misses = 0;
    while misses < cores {
        match fs.runtime().try_buffer(1 << 20) {
            Some(b) => {
                held.push(b);
                misses = 0;
            }
            None => misses += 1,
        }
    }
    held
}

/// With no read wait, a read that finds the pool spent and nothing of its own in flight fails
/// at once with `BufferUnavailable` (the host serves it another way); once buffers are back
/// the same read succeeds.
#[test]
fn a_read_without_buffer_wait_fails_at_once_on_a_spent_pool() {
    let dir = tempfile::tempdir().unwrap();
    let fs = scarce_files(dir.path());
    let data = Rng(31).bytes(1 << 20);
    std::fs::write(dir.path().join("obj"), &data).unwrap();
    let f = fs.open_file(Path::new("obj"), &read_opts()).unwrap();
    fs.set_read_buffer_wait(std::time::Duration::ZERO);
    let held = hold_every_buffer(&fs);
    assert!(!held.is_empty());
    let rt = rt();
    match rt.block_on(f.read_at(0, 1 << 20)) {
        Err(Error::BufferUnavailable { requested, .. }) => assert_eq!(requested, 1 << 20),
        other => panic!("expected BufferUnavailable, got {other:?}"),
    }
    drop(held);
    assert!(rt.block_on(f.read_at(0, 1 << 20)).unwrap() == data);
}

/// The write wait is the host's too: with none, a write that finds the pool spent before its
/// first piece fails at once with `BufferUnavailable` and leaves the file as it was; once buffers are back the
/// same write lands.
#[test]
fn a_write_without_buffer_wait_fails_at_once_on_a_spent_pool() {
    let dir = tempfile::tempdir().unwrap();
    let fs = scarce_files(dir.path());
    let data = Rng(37).bytes(1 << 20);
    let f = fs.open_file(Path::new("obj"), &rw_opts()).unwrap();
    fs.set_write_buffer_wait(std::time::Duration::ZERO);
    let held = hold_every_buffer(&fs);
    let rt = rt();
    match rt.block_on(f.write_at(0, &data)) {
        Err(Error::BufferUnavailable { requested, reason }) => {
            assert_eq!(requested, 1 << 20);
            // Gave up on its first look (the default wait would say 5 s here).
            assert!(reason.ends_with("gave up after 0ns"), "{reason}");
        }
        other => panic!("expected BufferUnavailable, got {other:?}"),
    }
    assert_eq!(std::fs::metadata(dir.path().join("obj")).unwrap().len(), 0);
    drop(held);
    rt.block_on(f.write_at(0, &data)).unwrap();
    assert!(std::fs::read(dir.path().join("obj")).unwrap() == data);
}

/// `read_bytes_auto` gives the same bytes whether the page cache holds the range (copied on
/// the calling thread) or not (O_DIRECT): the file is read once as written (cached), then
/// again after its pages were dropped (fdatasync + POSIX_FADV_DONTNEED; whether the kernel
/// dropped them is printed, the bytes are checked either way), single- and multi-piece.
#[test]
fn read_bytes_auto_reads_cached_and_dropped_ranges_alike() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().unwrap();
    let fs = files(dir.path(), BackendChoice::Uring);
    let mut rng = Rng(0xa070);
    let data = rng.bytes((3 << 20) + 777);
    let path = dir.path().join("part.1");
    std::fs::write(&path, &data).unwrap();
    let f = fs.open_file(Path::new("part.1"), &read_opts()).unwrap();
    let rt = rt();
    let shapes = [
        (32u64, 512 << 10),
        (0, 4096),
        (5000, (2 << 20) + 99),
        (1 << 20, 1 << 20),
    ];
    for round in ["cached", "dropped"] {
        if round == "dropped" {
            let file = std::fs::File::open(&path).unwrap();
            file.sync_data().unwrap();
            // SAFETY: a plain advice call on an open descriptor; no memory is passed.
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
        for &(off, len) in &shapes {
            let b = rt.block_on(f.read_bytes_auto(off, len)).unwrap();
            let end = (off as usize + len).min(data.len());
            assert!(
                b[..] == data[off as usize..end],
                "{round} {off}+{len}: bytes differ"
            );
            eprintln!(
                "{round} {off}+{len}: from the page cache inline: {}",
                b.served_inline()
            );
        }
    }
}

/// `InlineReads::WhenPollerIdle` (the default): a cached read is copied on the calling thread
/// while the poller that would serve it is parked (a hand-off would wake it), and handed to
/// the poller while it is awake (a busy-polling one never parks).
#[test]
fn cached_reads_go_inline_only_while_the_poller_is_parked() {
    use rio::runtime::IdlePolicy;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let data = Rng(0x1d1e).bytes(600 << 10);
    std::fs::write(dir.path().join("part.1"), &data).unwrap();
    let rt = rt();
    for (idle, parks) in [
        (
            IdlePolicy::SleepAfter {
                polls: 16,
                max_sleep: Duration::from_secs(60),
            },
            true,
        ),
        (IdlePolicy::BusyPoll, false),
    ] {
        let c = config(BackendChoice::Uring);
        let mut rc = c.runtime_config();
        rc.cores = Some(vec![0]);
        rc.idle = idle;
        let fs = Files::open_with(dir.path(), &c, rc).unwrap();
        let f = fs.open_file(Path::new("part.1"), &read_opts()).unwrap();
        // Warm the page cache through the runtime, then let the poller settle.
        rt.block_on(f.read_bytes(0, data.len(), false)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while parks && !fs.runtime().poller_parked(0) {
            assert!(Instant::now() < deadline, "the poller never parked");
            std::thread::sleep(Duration::from_millis(5));
        }
        let b = rt.block_on(f.read_bytes(32, 512 << 10, false)).unwrap();
        assert!(
            b[..] == data[32..32 + (512 << 10)],
            "{idle:?}: bytes differ"
        );
        assert_eq!(b.served_inline(), parks, "{idle:?}: inline copy");
        fs.runtime().shutdown();
    }
}

/// Counts what a Files runtime's pollers report: I/Os in the windows, and failed I/Os.
#[derive(Default)]
struct CountingSink {
    reads: std::sync::atomic::AtomicU64,
    read_bytes: std::sync::atomic::AtomicU64,
    errors: std::sync::atomic::AtomicU64,
}

impl rio::WindowSink for CountingSink {
    fn window(&self, w: &rio::Window) {
        use std::sync::atomic::Ordering::Relaxed;
        self.reads.fetch_add(w.read.ios, Relaxed);
        self.read_bytes.fetch_add(w.read.bytes, Relaxed);
    }
    fn io_error(&self, _job: u32, _e: &rio::IoError) {
        self.errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A direct read widened to the alignment runs past the end of its file and comes back short:
/// `Files` takes that as the end of the file, and so do the windows its pollers hand the sink
/// (the telemetry's): a read of the bytes there were, not a failed I/O. (They reported every
/// such read as a `short_transfer` error, and RustFS's shard reads, each to its file's end,
/// never reached the latency histogram.)
#[test]
fn a_direct_read_short_at_the_end_of_its_file_is_a_read_in_the_windows() {
    use std::sync::atomic::Ordering::Relaxed;
    // On the target's file system (O_DIRECT), not /tmp (tmpfs may refuse it).
    let base = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let dir = tempfile::tempdir_in(base).unwrap();
    let sink = Arc::new(CountingSink::default());
    let cfg = config(BackendChoice::Uring);
    let rtc = rio::runtime::RuntimeConfig {
        sink: Some(sink.clone()),
        ..cfg.runtime_config()
    };
    let fs = Files::open_with(dir.path(), &cfg, rtc).unwrap();
    fs.set_inline_cached_reads(InlineReads::Off);
    // A RustFS shard file of a 1 MiB object on four drives: one block, a 32-byte hash and
    // 512 KiB; widened, the read asks for 528,384 bytes.
    let data = Rng(0xe0f).bytes(524_320);
    std::fs::write(dir.path().join("part.1"), &data).unwrap();
    let f = fs.open_file(Path::new("part.1"), &read_opts()).unwrap();
    assert!(
        f.is_direct(),
        "{} does not take O_DIRECT: this test needs a file system that does",
        dir.path().display()
    );
    let rt = rt();
    let b = rt.block_on(f.read_bytes(0, data.len(), true)).unwrap();
    assert!(b[..] == data[..], "bytes differ");
    drop(b);
    // An idle poller closes its last window on its own.
    let t0 = std::time::Instant::now();
    while sink.reads.load(Relaxed) == 0 && t0.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        sink.errors.load(Relaxed),
        0,
        "the short read was reported as a failure"
    );
    assert_eq!(sink.reads.load(Relaxed), 1, "the read is in the windows");
    assert_eq!(sink.read_bytes.load(Relaxed), data.len() as u64);
    drop(f);
    fs.runtime().shutdown();
}
