//! RustFS 1.0.1 started in-process (`rustfs::embedded::RustFSServerBuilder`) with its local
//! disks' I/O backend chosen at start-up:
//!
//! - `std`: RustFS's own default (`StdBackend`): this is stock RustFS;
//! - `uring`: RustFS's own io_uring reads (`RUSTFS_IO_URING_READ_ENABLE=true`);
//! - `rio`: rio's backend (`rio_rustfs::install`), configured from the environment
//!   (`RIO_*`, `RUSTFS_TARGET_LATENCY_US`, `RIO_RUSTFS_*`).
//!
//! ```text
//! rio-rustfs-server --backend rio --address 127.0.0.1:9000 /srv/d1 /srv/d2 /srv/d3 /srv/d4
//! ```
//! Prints `READY <endpoint>` once it serves S3, runs until SIGINT or SIGTERM, then shuts the
//! server down and (for rio) prints its counters as `RIO_STATS key=value ...`.

use std::process::ExitCode;

struct Args {
    backend: String,
    address: String,
    access_key: String,
    secret_key: String,
    drives: Vec<String>,
}

const USAGE: &str = "usage: rio-rustfs-server [--backend std|uring|rio] [--address HOST:PORT] [--access-key K] [--secret-key S] DRIVE...";

fn args() -> Result<Args, String> {
    let mut a = Args {
        backend: "std".into(),
        address: "127.0.0.1:9000".into(),
        access_key: "rustfsadmin".into(),
        secret_key: "rustfsadmin".into(),
        drives: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        match k.as_str() {
            "--backend" => a.backend = val("--backend")?,
            "--address" => a.address = val("--address")?,
            "--access-key" => a.access_key = val("--access-key")?,
            "--secret-key" => a.secret_key = val("--secret-key")?,
            "-h" | "--help" => return Err(USAGE.into()),
            s if s.starts_with('-') => return Err(format!("unknown option {s}\n{USAGE}")),
            d => a.drives.push(d.to_string()),
        }
    }
    if !matches!(a.backend.as_str(), "std" | "uring" | "rio") {
        return Err(format!(
            "--backend: expected std, uring or rio; got {}",
            a.backend
        ));
    }
    if a.drives.is_empty() {
        return Err(format!("no drives given\n{USAGE}"));
    }
    Ok(a)
}

fn main() -> ExitCode {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("rio-rustfs-server: {e}");
            return ExitCode::from(2);
        }
    };
    match a.backend.as_str() {
        "uring" => {
            // SAFETY: no other thread exists yet (the tokio runtime is built below), so
            // nothing reads the environment concurrently.
            unsafe { std::env::set_var("RUSTFS_IO_URING_READ_ENABLE", "true") };
        }
        "rio" => {
            let settings = match rio_rustfs::Settings::from_env() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("rio-rustfs-server: rio settings: {e}");
                    return ExitCode::from(2);
                }
            };
            rio_rustfs::install(settings);
        }
        _ => {}
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rio-rustfs-server: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(serve(a))
}

async fn serve(a: Args) -> ExitCode {
    let server = rustfs::embedded::RustFSServerBuilder::new()
        .address(a.address.clone())
        .access_key(a.access_key.clone())
        .secret_key(a.secret_key.clone())
        .volumes(a.drives.clone())
        .build()
        .await;
    let server = match server {
        Ok(s) => s,
        Err(e) => {
            eprintln!("rio-rustfs-server: cannot start RustFS: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("READY {} backend={}", server.endpoint(), a.backend);
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("rio-rustfs-server: SIGTERM handler: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    server.shutdown().await;
    if a.backend == "rio" {
        use std::sync::atomic::Ordering::Relaxed;
        let s = rio_rustfs::stats();
        println!(
            "RIO_STATS reads={} read_bytes={} direct_reads={} inline_reads={} cache_rereads={} streams={} writers={} direct_writers={} delegated={} io_errors={} pool_overflows={}",
            s.reads.load(Relaxed),
            s.read_bytes.load(Relaxed),
            s.direct_reads.load(Relaxed),
            s.inline_reads.load(Relaxed),
            s.cache_rereads.load(Relaxed),
            s.streams.load(Relaxed),
            s.writers.load(Relaxed),
            s.direct_writers.load(Relaxed),
            s.delegated.load(Relaxed),
            s.io_errors.load(Relaxed),
            s.pool_overflows.load(Relaxed)
        );
    }
    ExitCode::SUCCESS
}
