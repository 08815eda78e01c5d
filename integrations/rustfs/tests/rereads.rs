//! Cache admission on a second read (`Settings::cache_rereads`): a large range read again
//! goes through the page cache, with the same bytes as RustFS's own backend. Its own test
//! binary: the counters and the table of recent ranges are process-wide, and no other test's
//! reads may evict this test's ranges between its two reads.

use std::sync::atomic::Ordering;

use rio_rustfs::{RioBackend, Settings, stats};
use rustfs_ecstore::api::disk::{LocalIoBackend, StdBackend};

const VOL: &str = "bucket";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_range_read_again_goes_through_the_page_cache() {
    // Under the target directory, not /tmp: O_DIRECT needs a file system that takes it.
    let base = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&base).unwrap();
    let dir = tempfile::tempdir_in(base).unwrap();
    let mut settings = Settings::from_env().expect("rio settings from the environment");
    settings.direct_read_min = 64 << 10;
    settings.cache_rereads = 4096;
    let std_b = StdBackend::new(dir.path().to_path_buf());
    let rio_b = RioBackend::new(dir.path().to_path_buf(), &settings).expect("rio backend");
    let n = 3 * ((512 << 10) + 32);
    let path = "reread/uuid/part.1";
    let file = dir.path().join(VOL).join(path);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    let data: Vec<u8> = (0..n).map(|i| (i * 7 + i / 4099) as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let reread = || stats().cache_rereads.load(Ordering::Relaxed);
    for (o, l) in [(32, 512 << 10), ((512 << 10) + 64, 512 << 10), (7, n - 7)] {
        let before = reread();
        for pass in 0..2 {
            let a = std_b.pread_bytes(VOL, path, o, l, None).await.unwrap();
            let b = rio_b.pread_bytes(VOL, path, o, l, None).await.unwrap();
            assert_eq!(a, b, "pass {pass} of {o}+{l}: bytes differ from RustFS's");
            assert_eq!(
                &b[..],
                &data[o..o + l],
                "pass {pass} of {o}+{l}: not the file's bytes"
            );
        }
        assert_eq!(
            reread() - before,
            1,
            "of two reads of {o}+{l}, exactly the second went through the page cache"
        );
    }
    assert_eq!(stats().io_errors.load(Ordering::Relaxed), 0);
}
