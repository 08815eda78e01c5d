//! Targets: what rio does I/O on, how it is classified, and its geometry.
//!
//! A target string is a path (regular file or block device). Later layers add `pcie://` (the
//! vfio backend) and `sim://` (the software controller model); they are recognised here so the
//! error says what is missing rather than "no such file".

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What kind of thing a target is.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
#[cfg_attr(feature = "serde", serde(tag = "type", rename_all = "snake_case"))]
pub enum TargetKind {
    /// A regular file on a file system.
    File,
    /// A block device; `name` is its sysfs name (e.g. `nvme0n1`, `loop3`).
    BlockDevice { name: String, nvme: bool },
    /// A namespace of an NVMe controller driven by rio's userspace driver (`pcie://`, or the
    /// software model for `sim://`).
    Nvme { controller: String, nsid: u32 },
    /// A directory whose files a runtime serves by descriptor ([`crate::Engine::open_dir`]):
    /// I/O names a file the host opened, never the directory itself (its size is 0).
    Directory,
}

/// Alignment and size rules of an open target, read from the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Geometry {
    /// Offsets and lengths must be multiples of this (logical block size for direct I/O).
    pub block_size: u32,
    /// Buffer addresses must be multiples of this (DMA alignment).
    pub mem_align: u32,
    /// Size of the target in bytes.
    pub size: u64,
}

/// How to open a target.
#[derive(Clone, Copy, Debug, Default)]
pub struct OpenOptions {
    pub write: bool,
    pub direct: bool,
    /// Create a regular file that does not exist (its size is set later by the writer).
    pub create: bool,
}

/// An open target.
#[derive(Debug)]
pub struct Target {
    pub path: PathBuf,
    pub kind: TargetKind,
    pub geometry: Geometry,
    pub direct: bool,
    pub writable: bool,
    /// The open file; `None` for targets the userspace NVMe driver serves.
    pub(crate) file: Option<File>,
}

/// Parse-level classification of a target string, before anything is opened.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetSpec {
    Path(PathBuf),
    /// `pcie://0000:00:04.0[/ns=N]` or SPDK's `trtype:PCIe traddr:0000:00:04.0`.
    Pcie {
        addr: String,
        nsid: u32,
    },
    /// `sim://...` software controller model.
    Sim(String),
    /// Another SPDK transport ID (`trtype:TCP adrfam:IPv4 traddr:... trsvcid:... subnqn:...`,
    /// optionally ` ns:N`): only the `spdk` backend serves it.
    Trid {
        trid: String,
        nsid: u32,
    },
}

impl TargetSpec {
    pub fn parse(s: &str) -> TargetSpec {
        if let Some(rest) = s.strip_prefix("pcie://") {
            let (addr, nsid) = match rest.split_once("/ns=") {
                Some((a, n)) => (a, n.parse().unwrap_or(0)),
                None => (rest, 1),
            };
            return TargetSpec::Pcie {
                addr: addr.to_string(),
                nsid,
            };
        }
        if s.to_ascii_lowercase().starts_with("trtype:") {
            // SPDK's transport-ID syntax, plus `ns:N` as its tools (spdk_nvme_perf -r) take it.
            let nsid = s
                .split_whitespace()
                .find_map(|w| w.strip_prefix("ns:"))
                .map_or(1, |n| n.parse().unwrap_or(0));
            if s.to_ascii_lowercase().starts_with("trtype:pcie") {
                let addr = s
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("traddr:"))
                    .unwrap_or("")
                    .to_string();
                return TargetSpec::Pcie { addr, nsid };
            }
            let trid = s
                .split_whitespace()
                .filter(|w| !w.starts_with("ns:"))
                .collect::<Vec<_>>()
                .join(" ");
            return TargetSpec::Trid { trid, nsid };
        }
        if let Some(rest) = s.strip_prefix("sim://") {
            return TargetSpec::Sim(rest.to_string());
        }
        TargetSpec::Path(PathBuf::from(s))
    }
}

impl Target {
    /// Open a file or block device. Writes to a block device that is mounted, used as swap or
    /// held by another driver (dm, md, partitions in use) are refused with the reason.
    pub fn open(path: &Path, opts: OpenOptions) -> Result<Target> {
        let os = |op: &'static str| {
            let path = path.to_path_buf();
            move |source| Error::Os { op, path, source }
        };
        let meta = match std::fs::metadata(path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(os("stat")(e)),
        };
        let kind = match &meta {
            None if opts.create => TargetKind::File,
            None => {
                return Err(Error::NotFound {
                    path: path.to_path_buf(),
                });
            }
            Some(m) if m.is_dir() => {
                return Err(Error::BadTarget {
                    path: path.to_path_buf(),
                    what: "is a directory, not a file or block device".into(),
                });
            }
            Some(m) if m.file_type().is_block_device() => {
                let name = sysfs_block_name(m.rdev()).ok_or_else(|| Error::BadTarget {
                    path: path.to_path_buf(),
                    what: "block device not found in /sys/dev/block".into(),
                })?;
                let nvme = name.starts_with("nvme");
                TargetKind::BlockDevice { name, nvme }
            }
            Some(m) if m.file_type().is_char_device() => {
                return Err(Error::BadTarget {
                    path: path.to_path_buf(),
                    what: "is a character device; use the block device (e.g. /dev/nvme0n1)".into(),
                });
            }
            Some(m) if m.is_file() => TargetKind::File,
            Some(_) => {
                return Err(Error::BadTarget {
                    path: path.to_path_buf(),
                    what: "is neither a regular file nor a block device".into(),
                });
            }
        };
        if opts.write
            && let TargetKind::BlockDevice { name, .. } = &kind
        {
            if let Some(reason) = block_device_in_use(name) {
                return Err(Error::InUse {
                    path: path.to_path_buf(),
                    reason,
                });
            }
            // The kernel lets a read-only device be opened for writing and fails each write
            // with EPERM; refuse up front instead.
            let ro = std::fs::read_to_string(format!("/sys/class/block/{name}/ro"));
            if ro.is_ok_and(|s| s.trim() == "1") {
                return Err(Error::BadTarget {
                    path: path.to_path_buf(),
                    what: "is a read-only device and cannot be opened for writing".into(),
                });
            }
        }
        let mut oo = std::fs::OpenOptions::new();
        oo.read(true).write(opts.write);
        if opts.create && opts.write && meta.is_none() {
            oo.create(true);
        }
        let mut flags = libc::O_CLOEXEC;
        if opts.direct {
            flags |= libc::O_DIRECT;
        }
        if opts.write && matches!(kind, TargetKind::BlockDevice { .. }) {
            // O_EXCL on a block device: the kernel refuses it while mounted or claimed.
            flags |= libc::O_EXCL;
        }
        oo.custom_flags(flags);
        let file = oo.open(path).map_err(|e| match e.raw_os_error() {
            Some(libc::EINVAL) if opts.direct => Error::BadTarget {
                path: path.to_path_buf(),
                what: "the file system does not support O_DIRECT (use --direct 0)".into(),
            },
            Some(libc::EROFS | libc::EACCES | libc::EPERM) if opts.write => Error::BadTarget {
                path: path.to_path_buf(),
                what: format!("cannot be opened for writing: {e}"),
            },
            Some(libc::EBUSY) => Error::InUse {
                path: path.to_path_buf(),
                reason: "the kernel reports it busy (mounted or claimed by another driver)".into(),
            },
            _ => os("open")(e),
        })?;
        let geometry = geometry(&file, &kind, opts.direct).map_err(os("query geometry of"))?;
        Ok(Target {
            path: path.to_path_buf(),
            kind,
            geometry,
            direct: opts.direct,
            writable: opts.write,
            file: Some(file),
        })
    }

    /// Open a directory as the target of a runtime that serves its files by descriptor. The
    /// geometry is the file system's direct-I/O alignment (statx DIOALIGN; 4 KiB when the
    /// kernel does not say), which files opened with O_DIRECT there must follow; size 0.
    pub fn open_dir(path: &Path, opts: OpenOptions) -> Result<Target> {
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound {
                path: path.to_path_buf(),
            },
            _ => Error::Os {
                op: "stat",
                path: path.to_path_buf(),
                source: e,
            },
        })?;
        if !meta.is_dir() {
            return Err(Error::BadTarget {
                path: path.to_path_buf(),
                what: "is not a directory".into(),
            });
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| Error::Os {
                op: "open",
                path: path.to_path_buf(),
                source: e,
            })?;
        let dio = rio_sys::stat::dio_align(file.as_fd()).unwrap_or_default();
        let (bs, mem) = match (dio.offset_align, dio.mem_align) {
            (0, _) => (4096, 4096),
            (o, m) => (o, m.max(1)),
        };
        Ok(Target {
            path: path.to_path_buf(),
            kind: TargetKind::Directory,
            geometry: Geometry {
                block_size: bs,
                mem_align: mem,
                size: 0,
            },
            direct: opts.direct,
            writable: opts.write,
            file: Some(file),
        })
    }

    /// Grow a regular file to `len` bytes (sparse). No-op for block devices or larger files.
    pub fn ensure_len(&mut self, len: u64) -> Result<()> {
        if let (TargetKind::File, Some(file)) = (&self.kind, &self.file)
            && self.geometry.size < len
        {
            file.set_len(len).map_err(|e| Error::Os {
                op: "extend",
                path: self.path.clone(),
                source: e,
            })?;
            self.geometry.size = len;
        }
        Ok(())
    }
}

impl Geometry {
    /// Check that `[offset, offset+len)` is non-empty, aligned to the block size and inside
    /// the target. The error names the alignment or the size.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let bs = self.block_size as u64;
        // Block sizes are powers of two in practice: a mask instead of two divisions, which
        // were a tenth of the per-I/O cost at millions of IOPS.
        let aligned = |v: u64| {
            if bs.is_power_of_two() {
                v & (bs - 1) == 0
            } else {
                v.is_multiple_of(bs)
            }
        };
        if !aligned(offset) {
            return Err(Error::Alignment {
                what: "offset",
                value: offset,
                align_name: "logical block size",
                align: bs,
            });
        }
        if len == 0 || !aligned(len) {
            return Err(Error::Alignment {
                what: "length",
                value: len,
                align_name: "logical block size",
                align: bs,
            });
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }
}

fn geometry(file: &File, kind: &TargetKind, direct: bool) -> std::io::Result<Geometry> {
    let fd = file.as_fd();
    let dio = rio_sys::stat::dio_align(fd).unwrap_or_default();
    match kind {
        TargetKind::Nvme { .. } => unreachable!("NVMe targets have no file"),
        TargetKind::Directory => unreachable!("directories are opened by open_dir"),
        TargetKind::BlockDevice { .. } => {
            let lbs = rio_sys::blk::logical_block_size(fd)?;
            let mem = if dio.mem_align != 0 {
                dio.mem_align
            } else {
                lbs
            };
            Ok(Geometry {
                block_size: lbs,
                mem_align: if direct { mem } else { 1 },
                size: rio_sys::blk::size_bytes(fd)?,
            })
        }
        TargetKind::File => {
            let size = file.metadata()?.len();
            // Without DIOALIGN (older kernels), 4 KiB is safe for O_DIRECT on every common
            // file system. Buffered I/O has no alignment rule, but rio keeps 512 so that block
            // headers and trims stay sector-shaped.
            let (bs, mem) = match (direct, dio.offset_align, dio.mem_align) {
                (true, 0, _) => (4096, 4096),
                (true, o, m) => (o, m.max(1)),
                (false, _, _) => (512, 1),
            };
            Ok(Geometry {
                block_size: bs,
                mem_align: mem,
                size,
            })
        }
    }
}

/// sysfs name of a block device from its device number (`/sys/dev/block/MAJ:MIN`).
fn sysfs_block_name(rdev: u64) -> Option<String> {
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    let link = std::fs::read_link(format!("/sys/dev/block/{maj}:{min}")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// Why writing the block device `name` would be unsafe, or `None` if nothing uses it.
/// Looks at the device and all its partitions: mounts (/proc/self/mountinfo), swap
/// (/proc/swaps) and holders (/sys/class/block/*/holders: dm, md, bcache...).
pub fn block_device_in_use(name: &str) -> Option<String> {
    in_use_at(Path::new("/sys"), Path::new("/proc"), name)
}

/// [`block_device_in_use`] with sysfs and procfs read under `sys` and `proc` (tests and
/// `rio setup`'s fake trees use other roots).
pub fn in_use_at(sys: &Path, proc: &Path, name: &str) -> Option<String> {
    let block = sys.join("class/block");
    let mut devs = vec![name.to_string()];
    if let Ok(rd) = std::fs::read_dir(block.join(name)) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with(name) && e.path().join("partition").exists() {
                devs.push(n);
            }
        }
    }
    let numbers: Vec<(String, String)> = devs
        .iter()
        .filter_map(|d| {
            let n = std::fs::read_to_string(block.join(d).join("dev")).ok()?;
            Some((d.clone(), n.trim().to_string()))
        })
        .collect();
    if let Ok(mi) = std::fs::read_to_string(proc.join("self/mountinfo")) {
        for line in mi.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() > 4
                && let Some((d, _)) = numbers.iter().find(|(_, n)| n == f[2])
            {
                return Some(format!("/dev/{d} is mounted on {}", f[4]));
            }
        }
    }
    if let Ok(sw) = std::fs::read_to_string(proc.join("swaps")) {
        for line in sw.lines().skip(1) {
            let Some(p) = line.split_whitespace().next() else {
                continue;
            };
            // By device number when the listed path is a block device node, else by name
            // (a node under another name, or a test's fake tree).
            let by_number = std::fs::metadata(p)
                .ok()
                .filter(|m| m.file_type().is_block_device());
            let hit = match by_number {
                Some(m) => {
                    let n = format!("{}:{}", libc::major(m.rdev()), libc::minor(m.rdev()));
                    numbers.iter().find(|(_, x)| *x == n).map(|(d, _)| d)
                }
                None => {
                    let base = p.rsplit('/').next().unwrap_or(p);
                    devs.iter().find(|d| *d == base)
                }
            };
            if let Some(d) = hit {
                return Some(format!("/dev/{d} is in use as swap"));
            }
        }
    }
    for d in &devs {
        if let Ok(rd) = std::fs::read_dir(block.join(d).join("holders")) {
            let holders: Vec<String> = rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            if !holders.is_empty() {
                return Some(format!("/dev/{d} is held by {}", holders.join(", ")));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_spec_forms() {
        assert_eq!(
            TargetSpec::parse("pcie://0000:00:04.0"),
            TargetSpec::Pcie {
                addr: "0000:00:04.0".into(),
                nsid: 1
            }
        );
        assert_eq!(
            TargetSpec::parse("pcie://0000:00:04.0/ns=2"),
            TargetSpec::Pcie {
                addr: "0000:00:04.0".into(),
                nsid: 2
            }
        );
        assert_eq!(
            TargetSpec::parse("trtype:PCIe traddr:0000:00:05.0"),
            TargetSpec::Pcie {
                addr: "0000:00:05.0".into(),
                nsid: 1
            }
        );
        assert_eq!(
            TargetSpec::parse("trtype:PCIe traddr:0000:00:05.0 ns:3"),
            TargetSpec::Pcie {
                addr: "0000:00:05.0".into(),
                nsid: 3
            }
        );
        // Other transports are SPDK's alone; ns:N is rio's (and spdk_nvme_perf's), not SPDK's
        // transport-ID syntax, so it is taken out.
        assert_eq!(
            TargetSpec::parse(
                "trtype:TCP adrfam:IPv4 traddr:10.0.0.1 trsvcid:4420 ns:2 subnqn:nqn.2016-06.io.spdk:cnode1"
            ),
            TargetSpec::Trid {
                trid: "trtype:TCP adrfam:IPv4 traddr:10.0.0.1 trsvcid:4420 subnqn:nqn.2016-06.io.spdk:cnode1"
                    .into(),
                nsid: 2
            }
        );
        assert_eq!(
            TargetSpec::parse("/tmp/x"),
            TargetSpec::Path("/tmp/x".into())
        );
    }

    #[test]
    fn file_geometry_and_range_checks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
        let t = Target::open(
            &p,
            OpenOptions {
                write: false,
                direct: true,
                create: false,
            },
        )
        .unwrap();
        assert_eq!(t.kind, TargetKind::File);
        assert_eq!(t.geometry.size, 1 << 20);
        let bs = t.geometry.block_size as u64;
        assert!(bs >= 512 && bs.is_power_of_two());
        t.geometry.check_range(0, 4096).unwrap();
        let e = t.geometry.check_range(1, 4096).unwrap_err().to_string();
        assert!(
            e.contains("offset 1") && e.contains(&format!("({bs} bytes)")),
            "{e}"
        );
        assert!(t.geometry.check_range(0, 1000).is_err());
        assert!(matches!(
            t.geometry.check_range((1 << 20) - 4096, 8192),
            Err(Error::OutOfRange { .. })
        ));
        assert!(matches!(
            t.geometry.check_range(u64::MAX - 4095, 4096),
            Err(Error::Alignment { .. } | Error::OutOfRange { .. })
        ));
    }

    /// Holders (dm, md) cannot be created on the development host (its kernel has no
    /// device-mapper), so this case runs against a faked sysfs; mounts, swap and partitions
    /// are exercised on real loop devices in tests/cli.rs.
    #[test]
    fn holders_of_a_partition_mark_the_disk_in_use() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        let mk = |p: &str, content: Option<&str>| {
            let path = r.join(p);
            match content {
                Some(c) => {
                    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
                    std::fs::write(path, c).unwrap();
                }
                None => std::fs::create_dir_all(path).unwrap(),
            }
        };
        mk("sys/class/block/vdz/dev", Some("250:0\n"));
        mk("sys/class/block/vdz/holders", None);
        mk("sys/class/block/vdz/vdz1/partition", Some("1\n"));
        mk("sys/class/block/vdz1/dev", Some("250:1\n"));
        mk("sys/class/block/vdz1/holders", None);
        mk(
            "proc/self/mountinfo",
            Some("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n"),
        );
        mk("proc/swaps", Some("Filename Type Size Used Priority\n"));
        assert_eq!(in_use_at(&r.join("sys"), &r.join("proc"), "vdz"), None);
        mk("sys/class/block/vdz1/holders/dm-3", Some(""));
        assert_eq!(
            in_use_at(&r.join("sys"), &r.join("proc"), "vdz").as_deref(),
            Some("/dev/vdz1 is held by dm-3")
        );
        mk(
            "proc/self/mountinfo",
            Some("22 1 250:1 / /data rw - ext4 /dev/vdz1 rw\n"),
        );
        assert_eq!(
            in_use_at(&r.join("sys"), &r.join("proc"), "vdz").as_deref(),
            Some("/dev/vdz1 is mounted on /data")
        );
    }

    #[test]
    fn bad_targets() {
        let dir = tempfile::tempdir().unwrap();
        let o = OpenOptions::default();
        assert!(matches!(
            Target::open(dir.path(), o),
            Err(Error::BadTarget { .. })
        ));
        assert!(matches!(
            Target::open(&dir.path().join("missing"), o),
            Err(Error::NotFound { .. })
        ));
        assert!(matches!(
            Target::open(Path::new("/dev/null"), o),
            Err(Error::BadTarget { .. })
        ));
    }
}
