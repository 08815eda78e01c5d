//! RustFS's object layer over four drives with rio as every drive's disk backend: the same
//! sequence as the stock run (`object_layer_std.rs`), every byte compared, and rio (not
//! the fallback to RustFS's own backend) doing the part-file I/O.

use std::sync::atomic::Ordering;

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn object_layer_on_rio() {
    let mut settings = rio_rustfs::Settings::from_env().expect("rio settings");
    // Objects of the test are a few MiB: let their shard reads and writes take O_DIRECT.
    settings.direct_read_min = 64 << 10;
    settings.direct_write_min = 64 << 10;
    // This test is about rio's writer as much as its reads (the default leaves writes to
    // RustFS's own writer).
    settings.rio_writes = true;
    assert!(
        rio_rustfs::install(settings),
        "the first factory of the process"
    );
    let (_dir, paths) = common::drives("rio-");
    let out = common::run(&paths).await;
    assert!(out.verified_bytes > 10 << 20, "{out:?}");
    let st = rio_rustfs::stats();
    let (reads, streams, writers) = (
        st.reads.load(Ordering::Relaxed),
        st.streams.load(Ordering::Relaxed),
        st.writers.load(Ordering::Relaxed),
    );
    eprintln!(
        "rio served reads={reads} (direct {}, inline {}) streams={streams} writers={writers} (direct {}) delegated={} io_errors={}",
        st.direct_reads.load(Ordering::Relaxed),
        st.inline_reads.load(Ordering::Relaxed),
        st.direct_writers.load(Ordering::Relaxed),
        st.delegated.load(Ordering::Relaxed),
        st.io_errors.load(Ordering::Relaxed),
    );
    // Every GET of a part-file object reads its shards through the backend (about 25 GETs
    // of 2+ shards each; 3 when RustFS's batched local shard read bypassed the seam, which
    // our patch turns off when a factory is installed).
    assert!(
        reads + streams > 40,
        "rio served the part-file reads: {reads} + {streams}"
    );
    // Part files on 4 drives: 3 objects put, 2 still over the inline limit after the
    // overwrite (the 300 KB one shrinks to 200 KB and goes inline), 1 healed.
    assert!(writers >= 21, "rio wrote the part files: {writers}");
    assert!(
        st.direct_writers.load(Ordering::Relaxed) > 0,
        "shard files written O_DIRECT"
    );
    assert_eq!(
        st.io_errors.load(Ordering::Relaxed),
        0,
        "lost files are not rio I/O errors"
    );
}
