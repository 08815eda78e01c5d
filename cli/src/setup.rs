//! `rio setup`: show and prepare the host for the userspace driver: NVMe controllers and their
//! drivers, IOMMU, modules, hugepages; bind a controller to vfio-pci (or, opted in,
//! uio_pci_generic) and give it back to the kernel.
//!
//! Everything is read under a sysfs root (`/sys`); `/proc` and `/dev` are its siblings
//! (`<root>/../proc`, `<root>/../dev`), so tests run the whole logic against a fake tree in a
//! temporary directory. Every refusal is decided before the first sysfs write.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rio_sys::hugepages;
use rio_sys::pci::{self, PciAddr, PciDevice};

use rio::error::{Error, Result};

/// `rio setup` arguments.
#[derive(clap::Args, Debug)]
pub struct SetupArgs {
    #[command(subcommand)]
    pub cmd: SetupCmd,
}

/// `rio setup` subcommands.
#[derive(clap::Subcommand, Debug)]
pub enum SetupCmd {
    /// NVMe controllers (driver, IOMMU group, NUMA node, namespaces in use), IOMMU, modules,
    /// hugepages.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Set the hugepage pool to COUNT pages.
    Hugepages {
        count: u64,
        /// Page size: 2M or 1G.
        #[arg(long, default_value = "2M")]
        size: String,
        /// Reserve on this NUMA node only.
        #[arg(long)]
        node: Option<u32>,
    },
    /// Detach an NVMe controller from the kernel and bind it to vfio-pci (or uio_pci_generic).
    Bind {
        /// PCI address (0000:00:04.0), controller (nvme0, /dev/nvme0) or namespace
        /// (nvme0n1, /dev/nvme0n1).
        device: String,
        /// vfio-pci or uio_pci_generic.
        #[arg(long, default_value = "vfio-pci")]
        driver: String,
        /// Accept uio_pci_generic, which lets the device DMA to any host memory.
        #[arg(long)]
        allow_unsafe_dma: bool,
    },
    /// Give a controller back to the kernel nvme driver.
    Unbind {
        /// PCI address, or a kernel name while it is still bound to nvme.
        device: String,
    },
}

/// How long to wait for the kernel to bind a driver after `drivers_probe`.
const BIND_WAIT: Duration = Duration::from_secs(5);

/// Run a `rio setup` command, printing to stdout (warnings to stderr).
pub fn run(args: &SetupArgs, sysfs_root: &Path) -> Result<()> {
    let out = std::io::stdout();
    let err = std::io::stderr();
    run_to(args, sysfs_root, &mut out.lock(), &mut err.lock())
}

/// [`run`] with the output streams given (tests capture them).
pub fn run_to(
    args: &SetupArgs,
    sysfs_root: &Path,
    out: &mut dyn Write,
    warn: &mut dyn Write,
) -> Result<()> {
    let host = Host::new(sysfs_root);
    match &args.cmd {
        SetupCmd::Status { json } => {
            let s = status(sysfs_root)?;
            if *json {
                let text = serde_json::to_string_pretty(&s).expect("status serialises");
                let _ = writeln!(out, "{text}");
            } else {
                print_status(&s, out);
            }
            Ok(())
        }
        SetupCmd::Hugepages { count, size, node } => {
            run_hugepages(&host, *count, size, *node, out, warn)
        }
        SetupCmd::Bind {
            device,
            driver,
            allow_unsafe_dma,
        } => run_bind(&host, device, driver, *allow_unsafe_dma, out, warn),
        SetupCmd::Unbind { device } => run_unbind(&host, device, out),
    }
}

/// The roots everything is read under.
struct Host {
    sys: PathBuf,
    proc: PathBuf,
    dev: PathBuf,
    /// `sys` is the real `/sys`: in-use checks go through [`rio::target`], and modules may be
    /// loaded with modprobe.
    real: bool,
}

impl Host {
    fn new(sysfs_root: &Path) -> Host {
        let real = sysfs_root == Path::new("/sys");
        let base = sysfs_root.parent().unwrap_or(Path::new("/"));
        Host {
            sys: sysfs_root.to_path_buf(),
            proc: base.join("proc"),
            dev: base.join("dev"),
            real,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// status

/// One namespace block device of a controller.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NamespaceStatus {
    pub name: String,
    /// Why it is in use (mounted, swap, held), or `None` when free.
    pub in_use: Option<String>,
}

/// One NVMe controller.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ControllerStatus {
    pub addr: String,
    pub vendor: String,
    pub device: String,
    pub model: Option<String>,
    pub driver: Option<String>,
    pub iommu_group: Option<u32>,
    pub numa_node: Option<i32>,
    pub namespaces: Vec<NamespaceStatus>,
}

/// One NUMA node's hugepages.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeHugepages {
    pub node: u32,
    pub total: u64,
    pub free: u64,
}

/// One hugepage pool.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HugepageStatus {
    pub size: String,
    pub size_kb: u64,
    pub total: u64,
    pub free: u64,
    pub reserved: u64,
    pub surplus: u64,
    pub nodes: Vec<NodeHugepages>,
}

/// A kernel module rio may need.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModuleStatus {
    pub name: &'static str,
    pub loaded: bool,
}

/// Everything `rio setup status` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Status {
    pub controllers: Vec<ControllerStatus>,
    /// IOMMU groups exist (an IOMMU is enabled): vfio-pci can be used.
    pub iommu: bool,
    pub modules: Vec<ModuleStatus>,
    pub hugepages: Vec<HugepageStatus>,
    pub hugetlbfs_mounts: Vec<String>,
}

const MODULES: [&str; 4] = ["vfio", "vfio_pci", "vfio_iommu_type1", "uio_pci_generic"];

/// Gather the status (reads only).
pub fn status(sysfs_root: &Path) -> Result<Status> {
    let host = Host::new(sysfs_root);
    let os = |op: &'static str, path: &Path, source: std::io::Error| Error::Os {
        op,
        path: path.to_path_buf(),
        source,
    };
    let devs = pci::list_nvme(&host.sys)
        .map_err(|e| os("list PCI devices", &host.sys.join("bus/pci/devices"), e))?;
    let controllers = devs
        .iter()
        .map(|d| ControllerStatus {
            addr: d.addr.to_string(),
            vendor: format!("{:04x}", d.vendor),
            device: format!("{:04x}", d.device),
            model: pci::nvme_model(&host.sys, &d.addr),
            driver: d.driver.clone(),
            iommu_group: d.iommu_group,
            numa_node: d.numa_node,
            namespaces: pci::namespaces_of(&host.sys, &d.addr)
                .into_iter()
                .map(|n| NamespaceStatus {
                    in_use: namespace_in_use(&host, &n),
                    name: n,
                })
                .collect(),
        })
        .collect();
    let pools = hugepages::state(&host.sys)
        .map_err(|e| os("read hugepages", &host.sys.join("kernel/mm/hugepages"), e))?;
    let mounts = std::fs::read_to_string(host.proc.join("mounts"))
        .map(|t| hugepages::parse_mounts(&t))
        .unwrap_or_default();
    Ok(Status {
        controllers,
        iommu: pci::iommu_present(&host.sys),
        modules: MODULES
            .iter()
            .map(|&name| ModuleStatus {
                name,
                loaded: pci::module_loaded(&host.sys, name),
            })
            .collect(),
        hugepages: pools
            .into_iter()
            .map(|p| HugepageStatus {
                size: hugepages::format_size_kb(p.size_kb),
                size_kb: p.size_kb,
                total: p.total,
                free: p.free,
                reserved: p.reserved,
                surplus: p.surplus,
                nodes: p
                    .nodes
                    .iter()
                    .map(|n| NodeHugepages {
                        node: n.node,
                        total: n.total,
                        free: n.free,
                    })
                    .collect(),
            })
            .collect(),
        hugetlbfs_mounts: mounts
            .into_iter()
            .map(|m| m.path.display().to_string())
            .collect(),
    })
}

fn print_status(s: &Status, out: &mut dyn Write) {
    let _ = writeln!(out, "NVMe controllers:");
    if s.controllers.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for c in &s.controllers {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "  {}  {} [{}:{}]  driver {}  iommu group {}  numa node {}",
            c.addr,
            c.model.as_deref().unwrap_or("(model unknown)"),
            c.vendor,
            c.device,
            c.driver.as_deref().unwrap_or("none"),
            opt(c.iommu_group.map(|g| g.to_string())),
            opt(c.numa_node.map(|n| n.to_string())),
        );
        for n in &c.namespaces {
            let _ = match &n.in_use {
                Some(why) => writeln!(out, "    /dev/{}: in use ({why})", n.name),
                None => writeln!(out, "    /dev/{}: not in use", n.name),
            };
        }
        if c.driver.as_deref() == Some("vfio-pci") {
            let _ = writeln!(out, "    ready for rio: pcie://{}", c.addr);
        }
    }
    let _ = if s.iommu {
        writeln!(out, "IOMMU: enabled")
    } else {
        writeln!(
            out,
            "IOMMU: not enabled (vfio-pci needs intel_iommu=on or amd_iommu=on on the kernel command line)"
        )
    };
    let mods: Vec<String> = s
        .modules
        .iter()
        .map(|m| {
            format!(
                "{} {}",
                m.name,
                if m.loaded { "loaded" } else { "not loaded" }
            )
        })
        .collect();
    let _ = writeln!(out, "Modules: {}", mods.join(", "));
    let _ = writeln!(out, "Hugepages:");
    if s.hugepages.is_empty() {
        let _ = writeln!(out, "  (hugetlb not available)");
    }
    for p in &s.hugepages {
        let nodes: Vec<String> = p
            .nodes
            .iter()
            .map(|n| format!("node{} {}/{}", n.node, n.free, n.total))
            .collect();
        let _ = writeln!(
            out,
            "  {}: {} total, {} free, {} reserved, {} surplus{}",
            p.size,
            p.total,
            p.free,
            p.reserved,
            p.surplus,
            if nodes.is_empty() {
                String::new()
            } else {
                format!(" (free/total: {})", nodes.join(", "))
            }
        );
    }
    if !s.hugetlbfs_mounts.is_empty() {
        let _ = writeln!(
            out,
            "hugetlbfs mounted at {}",
            s.hugetlbfs_mounts.join(", ")
        );
    }
}

// ---------------------------------------------------------------------------------------------
// hugepages

fn run_hugepages(
    host: &Host,
    count: u64,
    size: &str,
    node: Option<u32>,
    out: &mut dyn Write,
    warn: &mut dyn Write,
) -> Result<()> {
    let size_kb = hugepages::parse_size_kb(size)
        .filter(|kb| kb.is_power_of_two())
        .ok_or_else(|| {
            Error::config(
                "--size",
                format!("'{size}' is not a page size (use 2M or 1G)"),
            )
        })?;
    let label = hugepages::format_size_kb(size_kb);
    let got = hugepages::reserve(&host.sys, size_kb, count, node).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::config(
            if node.is_some() && e.to_string().contains("NUMA") {
                "--node"
            } else {
                "--size"
            },
            e.to_string(),
        ),
        _ => Error::Os {
            op: "reserve hugepages",
            path: host.sys.join("kernel/mm/hugepages"),
            source: e,
        },
    })?;
    let (line, short) = hugepage_report(&label, count, got, node);
    let _ = writeln!(out, "{line}");
    if let Some(w) = short {
        let _ = writeln!(warn, "warning: {w}");
    }
    Ok(())
}

/// The result line, and a warning when the kernel gave fewer pages than asked.
fn hugepage_report(
    label: &str,
    requested: u64,
    got: u64,
    node: Option<u32>,
) -> (String, Option<String>) {
    let where_ = node.map(|n| format!(" on node {n}")).unwrap_or_default();
    let line = format!("{label} hugepages{where_}: requested {requested}, obtained {got}");
    let short = (got < requested).then(|| {
        format!(
            "only {got} of {requested} {label} hugepages{where_} could be reserved (memory is \
             fragmented or short); reserve them at boot (hugepages={requested} \
             hugepagesz={label} on the kernel command line) or free memory and retry"
        )
    });
    (line, short)
}

// ---------------------------------------------------------------------------------------------
// bind / unbind

fn bad(addr: impl ToString, what: impl Into<String>) -> Error {
    Error::BadTarget {
        path: PathBuf::from(addr.to_string()),
        what: what.into(),
    }
}

/// Turn the user's device argument into a PCI NVMe controller, refusing anything else. Reads
/// only.
fn resolve(host: &Host, device: &str) -> Result<PciDevice> {
    let addr = match device.parse::<PciAddr>() {
        Ok(a) => a,
        Err(parse_err) => {
            let name = device.strip_prefix("/dev/").unwrap_or(device);
            if name.starts_with("nvme") {
                pci::controller_of_block(&host.sys, name).ok_or_else(|| {
                    bad(
                        device,
                        "no NVMe controller of that name is bound to the kernel nvme driver \
                         (give its PCI address, such as 0000:00:04.0)",
                    )
                })?
            } else {
                return Err(bad(device, parse_err.to_string()));
            }
        }
    };
    let dev = pci::device(&host.sys, &addr).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => bad(addr, "no such PCI device"),
        _ => Error::Os {
            op: "read PCI device",
            path: pci::device_dir(&host.sys, &addr),
            source: e,
        },
    })?;
    if !dev.is_nvme() {
        return Err(bad(
            addr,
            format!(
                "not an NVMe controller (PCI class {:#08x}, NVMe is 0x010802); refusing to touch it",
                dev.class
            ),
        ));
    }
    Ok(dev)
}

/// Why namespace `name` is in use, if it is (the checks of [`rio::target`], under this
/// host's roots).
fn namespace_in_use(host: &Host, name: &str) -> Option<String> {
    rio::target::in_use_at(&host.sys, &host.proc, name)
}

/// Refuse if any namespace of the controller is in use.
fn check_namespaces_free(host: &Host, dev: &PciDevice) -> Result<()> {
    for ns in pci::namespaces_of(&host.sys, &dev.addr) {
        if let Some(why) = namespace_in_use(host, &ns) {
            return Err(Error::InUse {
                path: PathBuf::from(dev.addr.to_string()),
                reason: format!(
                    "its namespace {why}; detaching the controller would pull it from under its users"
                ),
            });
        }
    }
    Ok(())
}

/// Processes holding `/dev/vfio/<group>` open, as "pid (comm)".
fn vfio_group_users(host: &Host, group: u32) -> Vec<String> {
    let node = host.dev.join("vfio").join(group.to_string());
    let mut users = Vec::new();
    let Ok(rd) = std::fs::read_dir(&host.proc) else {
        return users;
    };
    for e in rd.flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else {
            continue;
        };
        if fds
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t == node))
        {
            let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            users.push(format!("{pid} ({})", comm.trim()));
        }
    }
    users.sort();
    users
}

/// Load `module` (on the real host), or insist it is there (fake trees never run modprobe).
fn need_module(host: &Host, module: &str) -> Result<()> {
    if pci::module_loaded(&host.sys, module) {
        return Ok(());
    }
    if !host.real {
        return Err(Error::BackendUnavailable {
            backend: "setup",
            reason: format!("module {module} is not loaded under {}", host.sys.display()),
        });
    }
    pci::ensure_module(&host.sys, module).map_err(|e| Error::Os {
        op: "modprobe",
        path: PathBuf::from(module),
        source: e,
    })
}

/// Wait (bounded) until `addr` is bound to `driver` and, for vfio-pci, its group node exists.
fn wait_bound(host: &Host, addr: &PciAddr, driver: &str, group: Option<u32>) -> Result<()> {
    let deadline = Instant::now() + BIND_WAIT;
    let node = group.map(|g| host.dev.join("vfio").join(g.to_string()));
    loop {
        let cur = pci::current_driver(&host.sys, addr);
        let node_ok = node.as_ref().is_none_or(|n| n.exists());
        if cur.as_deref() == Some(driver) && node_ok {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let why = if cur.as_deref() != Some(driver) {
                format!(
                    "after {BIND_WAIT:?} it is bound to {} instead of {driver} (see dmesg)",
                    cur.as_deref().unwrap_or("no driver")
                )
            } else {
                format!(
                    "bound to {driver}, but {} did not appear within {BIND_WAIT:?}",
                    node.as_ref()
                        .map(|n| n.display().to_string())
                        .unwrap_or_default()
                )
            };
            return Err(Error::Os {
                op: "bind",
                path: PathBuf::from(addr.to_string()),
                source: std::io::Error::new(std::io::ErrorKind::TimedOut, why),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_bind(
    host: &Host,
    device: &str,
    driver: &str,
    allow_unsafe_dma: bool,
    out: &mut dyn Write,
    warn: &mut dyn Write,
) -> Result<()> {
    let module = match driver {
        "vfio-pci" => "vfio_pci",
        "uio_pci_generic" => "uio_pci_generic",
        other => {
            return Err(Error::config(
                "--driver",
                format!("'{other}' (use vfio-pci, or uio_pci_generic with --allow-unsafe-dma)"),
            ));
        }
    };
    let dev = resolve(host, device)?;
    let addr = dev.addr;
    if dev.driver.as_deref() == Some(driver) {
        let _ = writeln!(out, "{addr}: already bound to {driver}");
        return Ok(());
    }
    let mut group = None;
    if driver == "uio_pci_generic" {
        if !allow_unsafe_dma {
            return Err(bad(
                addr,
                "uio_pci_generic gives the device unrestricted DMA to all host memory (no IOMMU \
                 protection: a bug or a bad device can overwrite the kernel); pass \
                 --allow-unsafe-dma to accept that, or use vfio-pci",
            ));
        }
        if pci::iommu_translates(&host.sys, &addr) {
            return Err(bad(
                addr,
                format!(
                    "the IOMMU translates this device's DMA (domain type {}), so the physical \
                     addresses uio_pci_generic needs would fault; use vfio-pci, or boot with \
                     iommu=pt",
                    pci::iommu_domain_type(&host.sys, &addr).unwrap_or_else(|| "unknown".into())
                ),
            ));
        }
    } else {
        if !pci::iommu_present(&host.sys) {
            return Err(bad(
                addr,
                "no IOMMU groups: vfio-pci needs an IOMMU; enable VT-d/AMD-Vi in firmware and boot \
                 with intel_iommu=on (Intel) or amd_iommu=on (AMD); vfio no-IOMMU mode is not supported",
            ));
        }
        let g = dev.iommu_group.ok_or_else(|| {
            bad(
                addr,
                "the device has no IOMMU group although the host has an IOMMU",
            )
        })?;
        let others: Vec<String> = pci::group_members(&host.sys, g)
            .map_err(|e| Error::Os {
                op: "read IOMMU group",
                path: host.sys.join(format!("kernel/iommu_groups/{g}")),
                source: e,
            })?
            .into_iter()
            .filter(|m| m.name != addr.to_string() && !m.dma_safe())
            .map(|m| {
                format!(
                    "{} (bound to {})",
                    m.name,
                    m.driver.as_deref().unwrap_or("?")
                )
            })
            .collect();
        if !others.is_empty() {
            return Err(bad(
                addr,
                format!(
                    "IOMMU group {g} also holds {}; vfio needs every device of the group unbound \
                     or on vfio-pci",
                    others.join(", ")
                ),
            ));
        }
        group = Some(g);
    }
    check_namespaces_free(host, &dev)?;
    need_module(host, module)?;
    if driver == "uio_pci_generic" {
        let _ = writeln!(
            warn,
            "warning: binding {addr} to uio_pci_generic: the device can DMA to any host memory"
        );
    }
    pci::bind(&host.sys, &addr, driver).map_err(|e| Error::Os {
        op: "bind",
        path: PathBuf::from(addr.to_string()),
        source: e,
    })?;
    wait_bound(host, &addr, driver, group)?;
    let from = dev.driver.as_deref().unwrap_or("no driver");
    match group {
        Some(g) => writeln!(
            out,
            "{addr}: bound to {driver} (was {from}); IOMMU group {g}, {}; use pcie://{addr}",
            host.dev.join(format!("vfio/{g}")).display()
        ),
        None => writeln!(
            out,
            "{addr}: bound to {driver} (was {from}); use pcie://{addr} with allow_unsafe_dma"
        ),
    }
    .map_err(|e| Error::Os {
        op: "write output",
        path: PathBuf::from("stdout"),
        source: e,
    })
}

fn run_unbind(host: &Host, device: &str, out: &mut dyn Write) -> Result<()> {
    let dev = resolve(host, device)?;
    let addr = dev.addr;
    if dev.driver.as_deref() == Some("nvme") {
        let _ = writeln!(out, "{addr}: already bound to nvme");
        return Ok(());
    }
    if dev.driver.as_deref() == Some("vfio-pci")
        && let Some(g) = dev.iommu_group
    {
        let users = vfio_group_users(host, g);
        if !users.is_empty() {
            return Err(Error::InUse {
                path: PathBuf::from(addr.to_string()),
                reason: format!(
                    "/dev/vfio/{g} is open in process {}; stop it first (the unbind would block until it exits)",
                    users.join(", ")
                ),
            });
        }
    }
    need_module(host, "nvme")?;
    pci::unbind_to_kernel(&host.sys, &addr).map_err(|e| Error::Os {
        op: "unbind",
        path: PathBuf::from(addr.to_string()),
        source: e,
    })?;
    wait_bound(host, &addr, "nvme", None)?;
    let _ = writeln!(
        out,
        "{addr}: given back to nvme (was {})",
        dev.driver.as_deref().unwrap_or("no driver")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugepage_report_warns_when_short() {
        let (l, w) = hugepage_report("2M", 64, 64, None);
        assert_eq!(l, "2M hugepages: requested 64, obtained 64");
        assert!(w.is_none());
        let (l, w) = hugepage_report("1G", 8, 3, Some(1));
        assert_eq!(l, "1G hugepages on node 1: requested 8, obtained 3");
        assert!(w.unwrap().contains("only 3 of 8 1G hugepages on node 1"));
    }

    #[test]
    fn host_paths() {
        let h = Host::new(Path::new("/sys"));
        assert!(h.real);
        assert_eq!(
            (h.proc.as_path(), h.dev.as_path()),
            (Path::new("/proc"), Path::new("/dev"))
        );
        let h = Host::new(Path::new("/tmp/x/sys"));
        assert!(!h.real);
        assert_eq!(h.proc, Path::new("/tmp/x/proc"));
    }
}
