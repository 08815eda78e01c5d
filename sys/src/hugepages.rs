//! The hugetlb pool: per-size and per-NUMA-node state from sysfs, reserving pages, and
//! hugetlbfs mounts. All sysfs paths are under a root (`/sys` normally) so tests use fake trees.

use std::io;
use std::path::{Path, PathBuf};

/// One NUMA node's share of a hugepage pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePool {
    pub node: u32,
    pub total: u64,
    pub free: u64,
    pub surplus: u64,
}

/// A hugepage pool of one page size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pool {
    /// Page size in KiB (2048, 1048576).
    pub size_kb: u64,
    /// `nr_hugepages`: pages in the pool.
    pub total: u64,
    pub free: u64,
    /// Promised to mappings but not yet faulted in.
    pub reserved: u64,
    pub surplus: u64,
    /// Per node, when the platform exposes NUMA nodes.
    pub nodes: Vec<NodePool>,
}

fn read_u64(p: &Path) -> io::Result<u64> {
    let s = std::fs::read_to_string(p)
        .map_err(|e| io::Error::new(e.kind(), format!("read {}: {e}", p.display())))?;
    s.trim().parse().map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: '{}' is not a number", p.display(), s.trim()),
        )
    })
}

fn size_dir_name(size_kb: u64) -> String {
    format!("hugepages-{size_kb}kB")
}

/// Directories named `hugepages-<n>kB` under `dir`, as (n, path), sorted by size.
fn size_dirs(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    let kb = n
                        .strip_prefix("hugepages-")?
                        .strip_suffix("kB")?
                        .parse()
                        .ok()?;
                    Some((kb, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// NUMA node numbers under `root/devices/system/node`, sorted.
fn nodes(root: &Path) -> Vec<u32> {
    let mut v: Vec<u32> = std::fs::read_dir(root.join("devices/system/node"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("node")?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn node_size_dir(root: &Path, node: u32, size_kb: u64) -> PathBuf {
    root.join(format!("devices/system/node/node{node}/hugepages"))
        .join(size_dir_name(size_kb))
}

/// Every hugepage pool the kernel offers, smallest page size first. Empty without hugetlb.
pub fn state(root: &Path) -> io::Result<Vec<Pool>> {
    let mut out = Vec::new();
    for (size_kb, dir) in size_dirs(&root.join("kernel/mm/hugepages")) {
        let mut pool = Pool {
            size_kb,
            total: read_u64(&dir.join("nr_hugepages"))?,
            free: read_u64(&dir.join("free_hugepages"))?,
            reserved: read_u64(&dir.join("resv_hugepages")).unwrap_or(0),
            surplus: read_u64(&dir.join("surplus_hugepages")).unwrap_or(0),
            nodes: Vec::new(),
        };
        for node in nodes(root) {
            let nd = node_size_dir(root, node, size_kb);
            if let (Ok(total), Ok(free)) = (
                read_u64(&nd.join("nr_hugepages")),
                read_u64(&nd.join("free_hugepages")),
            ) {
                pool.nodes.push(NodePool {
                    node,
                    total,
                    free,
                    surplus: read_u64(&nd.join("surplus_hugepages")).unwrap_or(0),
                });
            }
        }
        out.push(pool);
    }
    Ok(out)
}

/// Set the pool of `size_kb` pages to `count` pages (on `node` only, when given) and return how
/// many the kernel actually has afterwards (it gives fewer when memory is fragmented).
pub fn reserve(root: &Path, size_kb: u64, count: u64, node: Option<u32>) -> io::Result<u64> {
    let dir = match node {
        Some(n) => node_size_dir(root, n, size_kb),
        None => root
            .join("kernel/mm/hugepages")
            .join(size_dir_name(size_kb)),
    };
    if !dir.exists() {
        let have: Vec<String> = size_dirs(&root.join("kernel/mm/hugepages"))
            .iter()
            .map(|(kb, _)| format_size_kb(*kb))
            .collect();
        let what = match node {
            Some(n) if !root.join(format!("devices/system/node/node{n}")).exists() => {
                format!("NUMA node {n} does not exist (nodes: {:?})", nodes(root))
            }
            _ => format!(
                "{} hugepages are not supported here (available: {})",
                format_size_kb(size_kb),
                if have.is_empty() {
                    "none".to_string()
                } else {
                    have.join(", ")
                }
            ),
        };
        return Err(io::Error::new(io::ErrorKind::NotFound, what));
    }
    let f = dir.join("nr_hugepages");
    std::fs::write(&f, format!("{count}\n"))
        .map_err(|e| io::Error::new(e.kind(), format!("write {count} to {}: {e}", f.display())))?;
    read_u64(&f)
}

/// `2048` → `2M`, `1048576` → `1G`, else `<n>k`.
pub fn format_size_kb(kb: u64) -> String {
    if kb >= 1 << 20 && kb.is_multiple_of(1 << 20) {
        format!("{}G", kb >> 20)
    } else if kb >= 1 << 10 && kb.is_multiple_of(1 << 10) {
        format!("{}M", kb >> 10)
    } else {
        format!("{kb}k")
    }
}

/// Parse a page size (`2M`, `2MB`, `1G`, `1GiB`, `2048k`, `2048kB`) into KiB.
pub fn parse_size_kb(s: &str) -> Option<u64> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (num, mult) = match body.as_bytes().last()? {
        b'k' => (&body[..body.len() - 1], 1),
        b'm' => (&body[..body.len() - 1], 1 << 10),
        b'g' => (&body[..body.len() - 1], 1 << 20),
        _ => return None,
    };
    let n: u64 = num.parse().ok()?;
    n.checked_mul(mult).filter(|&kb| kb > 0)
}

/// A hugetlbfs mount point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HugetlbfsMount {
    pub path: PathBuf,
    /// From `pagesize=`; `None` means the default hugepage size.
    pub size_kb: Option<u64>,
}

/// hugetlbfs mounts from `/proc/mounts` text.
pub fn parse_mounts(text: &str) -> Vec<HugetlbfsMount> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 4 || f[2] != "hugetlbfs" {
                return None;
            }
            let size_kb = f[3]
                .split(',')
                .find_map(|o| o.strip_prefix("pagesize="))
                .and_then(parse_size_kb);
            // /proc/mounts escapes spaces as \040.
            Some(HugetlbfsMount {
                path: PathBuf::from(f[1].replace("\\040", " ")),
                size_kb,
            })
        })
        .collect()
}

/// hugetlbfs mounts of this system (`/proc/mounts`). rio maps hugepages with `MAP_HUGETLB` and
/// does not need one; SPDK-style tools do.
pub fn hugetlbfs_mounts() -> io::Result<Vec<HugetlbfsMount>> {
    Ok(parse_mounts(&std::fs::read_to_string("/proc/mounts")?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    fn pool_files(dir: &Path, total: u64, free: u64) {
        std::fs::create_dir_all(dir).unwrap();
        for (f, v) in [
            ("nr_hugepages", total),
            ("free_hugepages", free),
            ("resv_hugepages", 1),
            ("surplus_hugepages", 0),
        ] {
            std::fs::write(dir.join(f), format!("{v}\n")).unwrap();
        }
    }

    fn tree() -> TempDir {
        let t = TempDir::new();
        let r = t.path();
        pool_files(&r.join("kernel/mm/hugepages/hugepages-2048kB"), 8, 6);
        pool_files(&r.join("kernel/mm/hugepages/hugepages-1048576kB"), 0, 0);
        for n in 0..2 {
            pool_files(&node_size_dir(r, n, 2048), 4, 3);
            pool_files(&node_size_dir(r, n, 1048576), 0, 0);
        }
        t
    }

    #[test]
    fn reads_pools_and_nodes() {
        let t = tree();
        let s = state(t.path()).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].size_kb, s[0].total, s[0].free, s[0].reserved),
            (2048, 8, 6, 1)
        );
        assert_eq!(s[0].nodes.len(), 2);
        assert_eq!(
            s[0].nodes[1],
            NodePool {
                node: 1,
                total: 4,
                free: 3,
                surplus: 0
            }
        );
        assert_eq!(s[1].size_kb, 1 << 20);
        assert!(state(Path::new("/nonexistent")).unwrap().is_empty());
    }

    #[test]
    fn reserve_writes_and_reads_back() {
        let t = tree();
        assert_eq!(reserve(t.path(), 2048, 64, None).unwrap(), 64);
        assert_eq!(
            std::fs::read_to_string(
                t.path()
                    .join("kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
            )
            .unwrap(),
            "64\n"
        );
        assert_eq!(reserve(t.path(), 2048, 16, Some(1)).unwrap(), 16);
        assert_eq!(
            std::fs::read_to_string(node_size_dir(t.path(), 1, 2048).join("nr_hugepages")).unwrap(),
            "16\n"
        );
        let e = reserve(t.path(), 64, 1, None).unwrap_err();
        assert!(
            e.to_string().contains("64k hugepages are not supported"),
            "{e}"
        );
        assert!(e.to_string().contains("2M, 1G"), "{e}");
        let e = reserve(t.path(), 2048, 1, Some(5)).unwrap_err();
        assert!(e.to_string().contains("NUMA node 5 does not exist"), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size_kb("2M"), Some(2048));
        assert_eq!(parse_size_kb("2MB"), Some(2048));
        assert_eq!(parse_size_kb("1G"), Some(1 << 20));
        assert_eq!(parse_size_kb("1GiB"), Some(1 << 20));
        assert_eq!(parse_size_kb("2048kB"), Some(2048));
        for bad in ["", "2", "M", "0M", "2X", "-2M"] {
            assert_eq!(parse_size_kb(bad), None, "{bad}");
        }
        assert_eq!(format_size_kb(2048), "2M");
        assert_eq!(format_size_kb(1 << 20), "1G");
        assert_eq!(format_size_kb(64), "64k");
    }

    #[test]
    fn hugetlbfs_mount_lines() {
        let m = parse_mounts(
            "proc /proc proc rw 0 0\nhugetlbfs /dev/hugepages hugetlbfs rw,relatime,pagesize=2M 0 0\nnone /mnt/huge\\0401g hugetlbfs rw,pagesize=1024M 0 0\n",
        );
        assert_eq!(
            m,
            vec![
                HugetlbfsMount {
                    path: "/dev/hugepages".into(),
                    size_kb: Some(2048)
                },
                HugetlbfsMount {
                    path: "/mnt/huge 1g".into(),
                    size_kb: Some(1 << 20)
                },
            ]
        );
        hugetlbfs_mounts().unwrap();
    }
}
