//! RustFS's object layer over four drives with its own (stock) disk backend: the reference
//! the rio run (`object_layer_rio.rs`, a separate process) is held to.

mod common;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn object_layer_on_rustfs_std_backend() {
    let (_dir, paths) = common::drives("std-");
    let out = common::run(&paths).await;
    assert!(out.verified_bytes > 10 << 20, "{out:?}");
    // No rio backend was installed in this process: rio served nothing.
    assert_eq!(
        rio_rustfs::stats()
            .reads
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}
