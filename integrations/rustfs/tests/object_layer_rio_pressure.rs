//! rio's buffer pools spent under RustFS's object layer: 16 objects of 12 MiB PUT at once,
//! then GET at once (whole and ranged), through pools of two buffers per class per core that
//! never grow. Every byte comes back, rio reports no I/O error, and no drive is lost: a read
//! that finds the pool spent is served by a plain pread (counted as a pool overflow), a writer
//! waits for a buffer without blocking its thread. Before that, a spent pool made reads wait
//! on the executor's threads for buffers only those threads could return, and after 5 s the
//! drive was marked faulty (a 32 x 16 MiB GET run of scripts/rustfs-e2e).

use std::sync::atomic::Ordering;

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_large_objects_at_once_on_a_spent_pool() {
    let mut settings = rio_rustfs::Settings::from_env().expect("rio settings");
    settings.engine.pool_adaptive = false;
    settings.engine.pool_initial_buffers = 2;
    settings.direct_read_min = 64 << 10;
    settings.direct_write_min = 64 << 10;
    settings.rio_writes = true;
    assert!(
        rio_rustfs::install(settings),
        "the first factory of the process"
    );
    let (_dir, paths) = common::drives("rio-pressure-");
    let (n, size) = (16, (12 << 20) + 4097);
    let out = common::concurrent(&paths, n, size).await;
    assert_eq!(out.objects, n);
    assert!(out.verified_bytes > (n * size) as u64, "{out:?}");
    let st = rio_rustfs::stats();
    eprintln!(
        "rio served reads={} streams={} writers={} (direct {}) pool_overflows={} delegated={} io_errors={}",
        st.reads.load(Ordering::Relaxed),
        st.streams.load(Ordering::Relaxed),
        st.writers.load(Ordering::Relaxed),
        st.direct_writers.load(Ordering::Relaxed),
        st.pool_overflows.load(Ordering::Relaxed),
        st.delegated.load(Ordering::Relaxed),
        st.io_errors.load(Ordering::Relaxed),
    );
    assert!(
        st.writers.load(Ordering::Relaxed) >= (4 * n) as u64,
        "rio wrote the part files"
    );
    assert_eq!(st.io_errors.load(Ordering::Relaxed), 0, "no rio I/O error");
}
