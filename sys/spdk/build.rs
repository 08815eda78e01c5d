//! Finds an installed SPDK, generates bindings to the parts of it rio uses, and links it.
//!
//! Where SPDK is looked for, in order:
//! 1. `SPDK_DIR`: an installed prefix (`make install` of SPDK's source tree, or a package)
//!    holding `include/spdk/nvme.h` and `lib/pkgconfig/spdk_nvme.pc`;
//! 2. pkg-config's own search path (`PKG_CONFIG_PATH`) for `spdk_nvme` and `spdk_env_dpdk`.
//!
//! Without either, the build stops with one error that says so. SPDK must be built with shared
//! libraries (`./configure --with-shared`): its NVMe transports register themselves from
//! constructors, which a static link would drop unless every archive were linked whole.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The libraries rio needs, by pkg-config name (their `Requires` bring DPDK and the rest).
const MODULES: &[&str] = &["spdk_nvme", "spdk_env_dpdk", "spdk_syslibs"];

/// Linked when the installed SPDK has them: the socket implementations (POSIX, and uring where
/// SPDK was built with it) that NVMe/TCP needs. They register themselves from constructors, so
/// without them a `trtype:TCP` target fails to connect ("Cannot find any sock
/// implementation") while PCIe works.
const OPTIONAL_MODULES: &[&str] = &["spdk_sock_modules"];

/// Everything rio calls; nothing else is let through the bindings.
const FUNCTIONS: &[&str] = &[
    "spdk_env_opts_init",
    "spdk_env_init",
    "spdk_env_fini",
    "spdk_env_get_core_count",
    "spdk_mem_register",
    "spdk_mem_unregister",
    "spdk_zmalloc",
    "spdk_free",
    "spdk_log_set_print_level",
    "spdk_nvme_transport_id_parse",
    "spdk_nvme_trid_populate_transport",
    "spdk_nvme_connect",
    "spdk_nvme_detach",
    "spdk_nvme_ctrlr_get_data",
    "spdk_nvme_ctrlr_get_ns",
    "spdk_nvme_ctrlr_is_active_ns",
    "spdk_nvme_ctrlr_get_first_active_ns",
    "spdk_nvme_ctrlr_get_next_active_ns",
    "spdk_nvme_ctrlr_get_max_xfer_size",
    "spdk_nvme_ctrlr_get_num_ns",
    "spdk_nvme_ctrlr_get_default_io_qpair_opts",
    "spdk_nvme_ctrlr_alloc_io_qpair",
    "spdk_nvme_ctrlr_free_io_qpair",
    "spdk_nvme_ctrlr_process_admin_completions",
    "spdk_nvme_ns_get_id",
    "spdk_nvme_ns_is_active",
    "spdk_nvme_ns_get_sector_size",
    "spdk_nvme_ns_get_extended_sector_size",
    "spdk_nvme_ns_get_num_sectors",
    "spdk_nvme_ns_get_size",
    "spdk_nvme_ns_get_md_size",
    "spdk_nvme_ns_get_max_io_xfer_size",
    "spdk_nvme_ns_cmd_read",
    "spdk_nvme_ns_cmd_write",
    "spdk_nvme_ns_cmd_flush",
    "spdk_nvme_ns_cmd_write_zeroes",
    "spdk_nvme_ns_cmd_dataset_management",
    "spdk_nvme_qpair_process_completions",
];

const TYPES: &[&str] = &[
    "spdk_env_opts",
    "spdk_nvme_transport_id",
    "spdk_nvme_io_qpair_opts",
    "spdk_nvme_cpl",
    "spdk_nvme_dsm_range",
    "spdk_nvme_dsm_attribute",
    "spdk_nvme_transport_type",
    "spdk_log_level",
];

/// Types passed by pointer only, or reached only through fields rio does not touch: opaque
/// blobs of the right size and alignment. The command dwords and feature words are unions of
/// packed bitfields whose layout Rust cannot express (bindgen's layout checks fail on them);
/// rio reads the one Identify Controller field it shows, the model number, at its offset in
/// the NVMe specification.
const OPAQUE: &[&str] = &[
    "spdk_nvme_ctrlr_data",
    "spdk_nvme_cmd",
    "spdk_nvme_cmd_cdw1[0-3]",
    "spdk_nvme_feat_.*",
    "spdk_nvme_ctrlr",
    "spdk_nvme_ns",
    "spdk_nvme_qpair",
];

const VARS: &[&str] = &[
    "SPDK_MALLOC_DMA",
    "SPDK_ENV_NUMA_ID_ANY",
    "SPDK_NVME_DATASET_MANAGEMENT_MAX_RANGES",
];

fn fail(msg: &str) -> ! {
    eprintln!("error: rio-spdk-sys: {msg}");
    std::process::exit(1);
}

/// `pkg-config <args> MODULES`, with `extra` prepended to the search path.
fn pkg_config(args: &[&str], extra: Option<&Path>) -> Result<String, String> {
    pkg_config_of(args, MODULES, extra)
}

fn pkg_config_of(args: &[&str], modules: &[&str], extra: Option<&Path>) -> Result<String, String> {
    let mut cmd = Command::new(env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".into()));
    if let Some(dir) = extra {
        let mut path = dir.as_os_str().to_owned();
        if let Some(old) = env::var_os("PKG_CONFIG_PATH") {
            path.push(":");
            path.push(old);
        }
        cmd.env("PKG_CONFIG_PATH", path);
    }
    let out = cmd
        .args(args)
        .args(modules)
        .output()
        .map_err(|e| format!("cannot run pkg-config ({e}); install it (Debian: pkg-config)"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=SPDK_DIR");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    println!("cargo:rerun-if-changed=wrapper.h");

    let spdk_dir = env::var_os("SPDK_DIR").map(PathBuf::from);
    let pc_dir = spdk_dir.as_ref().map(|d| d.join("lib/pkgconfig"));
    if let Some(dir) = &spdk_dir
        && !dir.join("include/spdk/nvme.h").is_file()
    {
        fail(&format!(
            "SPDK_DIR={} has no include/spdk/nvme.h: point SPDK_DIR at an installed SPDK prefix \
             (the --prefix of SPDK's ./configure, after `make install`)",
            dir.display()
        ));
    }
    let cflags = pkg_config(&["--cflags"], pc_dir.as_deref());
    let libs = pkg_config(&["--libs"], pc_dir.as_deref());
    let (cflags, mut libs) = match (cflags, libs) {
        (Ok(c), Ok(l)) => (c, l),
        (Err(e), _) | (_, Err(e)) => fail(&format!(
            "the `spdk` feature needs an installed SPDK and none was found: set SPDK_DIR to its \
             install prefix (holding include/spdk/nvme.h and lib/pkgconfig/spdk_nvme.pc), or add \
             that lib/pkgconfig to PKG_CONFIG_PATH; or build rio without `--features spdk` \
             (pkg-config said: {})",
            e.lines().map(str::trim).collect::<Vec<_>>().join(" ")
        )),
    };

    for m in OPTIONAL_MODULES {
        match pkg_config_of(&["--libs"], &[m], pc_dir.as_deref()) {
            Ok(l) => {
                libs.push(' ');
                libs.push_str(&l);
            }
            Err(_) => println!(
                "cargo:warning=the installed SPDK has no {m}: NVMe/TCP targets will not connect"
            ),
        }
    }
    // Link: every -L is a search path (and, for the loader, the place the shared objects live),
    // every -l a shared library.
    let mut lib_dirs = Vec::new();
    let mut libs_named = Vec::new();
    let mut args_seen = Vec::new();
    for tok in libs.split_whitespace() {
        if let Some(dir) = tok.strip_prefix("-L") {
            if !lib_dirs.iter().any(|d: &PathBuf| d.as_os_str() == dir) {
                lib_dirs.push(PathBuf::from(dir));
            }
        } else if let Some(lib) = tok.strip_prefix("-l") {
            if !libs_named.iter().any(|l| l == lib) {
                libs_named.push(lib.to_string());
            }
        } else if (tok.starts_with("-Wl,") || tok == "-pthread")
            && !args_seen.iter().any(|a| a == tok)
        {
            println!("cargo:rustc-link-arg={tok}");
            args_seen.push(tok.to_string());
        }
    }
    for dir in &lib_dirs {
        println!("cargo:rustc-link-search=native={}", dir.display());
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // A library SPDK installed beside its own (the ISA-L it was built against) is linked
    // through an alias of its own name: a system library of the same name in a directory
    // another crate puts first on the search path (Debian's older libisal, which DPDK's
    // packages pull in) would otherwise be linked instead, and lacks symbols SPDK needs. The
    // program still records the library's SONAME, so the loader finds it as usual (at run
    // time SPDK's lib directory must come first too: LD_LIBRARY_PATH, or an rpath).
    let alias_dir = out.join("alias");
    let Some(spdk_lib_dir) = lib_dirs
        .iter()
        .find(|d| d.join("libspdk_nvme.so").exists())
        .cloned()
    else {
        fail(&format!(
            "no libspdk_nvme.so in {:?}: rio links SPDK's shared libraries; configure SPDK with \
             --with-shared",
            lib_dirs
        ));
    };
    for lib in &libs_named {
        // Only a library with a SONAME: the program records that, not the alias's name.
        let own = Some(spdk_lib_dir.join(format!("lib{lib}.so")))
            .filter(|p| !lib.starts_with("spdk_") && p.exists() && has_soname(p));
        match own {
            Some(path) => {
                let alias = format!("rio_spdk_{lib}");
                let link = alias_dir.join(format!("lib{alias}.so"));
                let _ = std::fs::create_dir_all(&alias_dir);
                let _ = std::fs::remove_file(&link);
                if let Err(e) = std::os::unix::fs::symlink(&path, &link) {
                    fail(&format!(
                        "cannot make the symlink {} to {}: {e}",
                        link.display(),
                        path.display()
                    ));
                }
                println!("cargo:rustc-link-lib=dylib={alias}");
            }
            None => println!("cargo:rustc-link-lib=dylib={lib}"),
        }
    }
    if alias_dir.exists() {
        println!("cargo:rustc-link-search=native={}", alias_dir.display());
    }
    // Where the shared objects are, for dependents that set an rpath (links = "spdk_nvme").
    let rpath: Vec<String> = lib_dirs
        .iter()
        .filter(|d| d.join("libspdk_nvme.so").exists())
        .map(|d| d.display().to_string())
        .collect();
    println!("cargo:libdir={}", rpath.join(":"));

    // A library that exports no function (SPDK's socket modules: all they have is the
    // constructor that registers them) cannot be kept by a reference, and a
    // link argument of this library crate would not reach the programs linking it: the
    // backend loads them itself (`PRELOAD`, dlopen) before SPDK starts.
    // DPDK's own (its mempool drivers) are not listed: DPDK loads them from its plugin
    // directory itself.
    let bare = write_keep(&out.join("keep.rs"), &libs_named, &lib_dirs);
    let preload: Vec<String> = bare
        .iter()
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libspdk_"))
        })
        .map(|p| p.display().to_string())
        .collect();
    println!("cargo:rustc-env=RIO_SPDK_PRELOAD={}", preload.join(":"));

    let mut builder = bindgen::Builder::default()
        .header("wrapper.h")
        .clang_args(cflags.split_whitespace())
        .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
        .derive_default(true)
        .layout_tests(true)
        .prepend_enum_name(false)
        .default_enum_style(bindgen::EnumVariation::ModuleConsts)
        .generate_comments(false);
    for f in FUNCTIONS {
        builder = builder.allowlist_function(f);
    }
    for t in TYPES {
        builder = builder.allowlist_type(t);
    }
    for t in OPAQUE {
        builder = builder.opaque_type(t);
    }
    for v in VARS {
        builder = builder.allowlist_var(v);
    }
    // bindgen panics (rather than erring) when it cannot load libclang at all: that panic's
    // own report is silenced, the error below says what to do.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let generated = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| builder.generate()));
    std::panic::set_hook(hook);
    let generated = generated.unwrap_or_else(|_| {
        fail(
            "bindgen could not load libclang, which it needs to read SPDK's headers: install \
             it (Debian: libclang-dev) or set LIBCLANG_PATH to the directory holding \
             libclang.so",
        )
    });
    let bindings = generated.unwrap_or_else(|e| {
        fail(&format!(
            "bindgen could not read SPDK's headers ({e}); it needs libclang (Debian: libclang-dev)"
        ))
    });
    bindings
        .write_to_file(out.join("bindings.rs"))
        .unwrap_or_else(|e| fail(&format!("cannot write the bindings: {e}")));
}

/// SPDK's shared objects do not record all their own dependencies (libspdk_env_dpdk.so names
/// no DPDK library, libspdk_util.so not libcrypto): SPDK's apps link every library themselves,
/// without `--as-needed`. rustc links with `--as-needed`, which would drop a library no object
/// of ours calls, and the program would then fail at load time with an undefined symbol. So
/// `keep.rs` references one exported function of each library pkg-config names, which makes
/// the linker record it. Libraries that are linker scripts (libm.so) or cannot be found are
/// skipped: glibc's are always linked. Returns the libraries found that export no function
/// (their real files, symbolic links resolved).
fn write_keep(path: &Path, libs: &[String], dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut bare = Vec::new();
    let system = [
        "/usr/lib/x86_64-linux-gnu",
        "/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/lib64",
        "/lib",
    ];
    let mut syms = Vec::new();
    for lib in libs {
        let file = format!("lib{lib}.so");
        let Some(so) = dirs
            .iter()
            .cloned()
            .chain(system.iter().map(PathBuf::from))
            .map(|d| d.join(&file))
            .find(|p| p.exists())
        else {
            continue;
        };
        let Ok(out) = Command::new("nm")
            .args(["-D", "--defined-only", "--format=posix"])
            .arg(&so)
            .output()
        else {
            fail(
                "cannot run nm (binutils), which rio-spdk-sys uses to keep SPDK's libraries linked",
            );
        };
        if !out.status.success() {
            continue; // a linker script, e.g. libm.so
        }
        let text = String::from_utf8_lossy(&out.stdout);
        // "name T value size": the first exported function.
        match text.lines().find_map(|l| {
            let mut f = l.split_whitespace();
            let (name, kind) = (f.next()?, f.next()?);
            (kind == "T").then(|| name.split('@').next().unwrap_or(name).to_string())
        }) {
            Some(sym) => syms.push(sym),
            None => bare.push(std::fs::canonicalize(&so).unwrap_or(so)),
        }
    }
    let mut src = String::from(
        "// Generated by build.rs (write_keep): one function of each library SPDK needs.\n",
    );
    src.push_str("unsafe extern \"C\" {\n");
    for (i, s) in syms.iter().enumerate() {
        src.push_str(&format!("    #[link_name = \"{s}\"]\n    fn keep_{i}();\n"));
    }
    src.push_str("}\n#[used]\nstatic KEEP: [unsafe extern \"C\" fn(); ");
    src.push_str(&format!("{}] = [", syms.len()));
    for i in 0..syms.len() {
        src.push_str(&format!("keep_{i}, "));
    }
    src.push_str("];\n");
    std::fs::write(path, src)
        .unwrap_or_else(|e| fail(&format!("cannot write {}: {e}", path.display())));
    bare
}

/// Whether the shared object at `path` names itself (DT_SONAME), by `readelf -d` (binutils);
/// false when that cannot be told, which links the library by its plain name instead.
fn has_soname(path: &Path) -> bool {
    Command::new("readelf")
        .arg("-d")
        .arg(path)
        .output()
        .is_ok_and(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains("(SONAME)")
        })
}
