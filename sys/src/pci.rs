//! PCI through sysfs: find NVMe controllers, their namespaces, IOMMU groups and drivers; bind a
//! controller to another driver and give it back; map BARs and config space for uio.
//!
//! Every function takes the sysfs root (`/sys` on a real system) so tests run against fake
//! trees in temporary directories. Nothing here writes sysfs except [`bind`] and
//! [`unbind_to_kernel`], which callers reach only after their own checks.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

pub use crate::mmio::MmioRegion;

/// A BAR mapped through sysfs `resource<N>` (the uio path): the same type as a VFIO BAR.
pub type MmioResource = MmioRegion;

/// PCI class code of an NVM Express controller (mass storage / NVM / NVMe).
pub const CLASS_NVME: u32 = 0x01_08_02;

/// A PCI address, `dddd:bb:dd.f`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddr {
    /// PCI segment (domain). Usually 0; VMD domains go above 0xffff.
    pub domain: u32,
    pub bus: u8,
    /// 0..=31
    pub device: u8,
    /// 0..=7
    pub function: u8,
}

impl fmt::Display for PciAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

impl FromStr for PciAddr {
    type Err = io::Error;

    /// `0000:00:04.0`, or `00:04.0` (domain 0).
    fn from_str(s: &str) -> io::Result<PciAddr> {
        let bad = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "'{s}' is not a PCI address ({why}; expected dddd:bb:dd.f such as 0000:00:04.0)"
                ),
            )
        };
        let (head, func) = s.rsplit_once('.').ok_or_else(|| bad("no '.function'"))?;
        let parts: Vec<&str> = head.split(':').collect();
        let (dom, bus, dev) = match parts.as_slice() {
            [d, b, v] => (*d, *b, *v),
            [b, v] => ("0", *b, *v),
            _ => return Err(bad("wrong number of ':' fields")),
        };
        let hex = |t: &str, max_len: usize, what: &str| -> io::Result<u32> {
            if t.is_empty() || t.len() > max_len || !t.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(bad(&format!("bad {what} '{t}'")));
            }
            u32::from_str_radix(t, 16).map_err(|_| bad(&format!("bad {what} '{t}'")))
        };
        let domain = hex(dom, 8, "domain")?;
        let bus = hex(bus, 2, "bus")? as u8;
        let device = hex(dev, 2, "device")?;
        let function = hex(func, 1, "function")?;
        if device > 0x1f {
            return Err(bad("device above 1f"));
        }
        if function > 7 {
            return Err(bad("function above 7"));
        }
        Ok(PciAddr {
            domain,
            bus,
            device: device as u8,
            function: function as u8,
        })
    }
}

/// What sysfs says about one PCI function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciDevice {
    pub addr: PciAddr,
    pub vendor: u16,
    pub device: u16,
    /// 24-bit class code (`0x010802` for NVMe).
    pub class: u32,
    /// Name of the bound driver (`nvme`, `vfio-pci`…), if any.
    pub driver: Option<String>,
    pub iommu_group: Option<u32>,
    /// NUMA node; `None` when the platform reports -1.
    pub numa_node: Option<i32>,
}

impl PciDevice {
    pub fn is_nvme(&self) -> bool {
        self.class == CLASS_NVME
    }
}

/// `root/bus/pci/devices/<addr>`.
pub fn device_dir(root: &Path, addr: &PciAddr) -> PathBuf {
    root.join("bus/pci/devices").join(addr.to_string())
}

fn read_trim(p: &Path) -> io::Result<String> {
    Ok(std::fs::read_to_string(p)?.trim().to_string())
}

fn read_hex(p: &Path) -> io::Result<u32> {
    let s = read_trim(p)?;
    u32::from_str_radix(s.trim_start_matches("0x"), 16).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: '{s}' is not a hex number", p.display()),
        )
    })
}

/// The last component of the target of symlink `p`, if `p` is a symlink.
fn link_name(p: &Path) -> Option<String> {
    let t = std::fs::read_link(p).ok()?;
    Some(t.file_name()?.to_string_lossy().into_owned())
}

/// Name of the driver bound to the device at `dir` (a sysfs device directory).
fn driver_at(dir: &Path) -> Option<String> {
    link_name(&dir.join("driver"))
}

/// Read one device. `NotFound` if sysfs has no such device.
pub fn device(root: &Path, addr: &PciAddr) -> io::Result<PciDevice> {
    let dir = device_dir(root, addr);
    if !dir.exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no PCI device {addr} (no {})", dir.display()),
        ));
    }
    Ok(PciDevice {
        addr: *addr,
        vendor: read_hex(&dir.join("vendor")).unwrap_or(0) as u16,
        device: read_hex(&dir.join("device")).unwrap_or(0) as u16,
        class: read_hex(&dir.join("class"))?,
        driver: driver_at(&dir),
        iommu_group: link_name(&dir.join("iommu_group")).and_then(|g| g.parse().ok()),
        numa_node: read_trim(&dir.join("numa_node"))
            .ok()
            .and_then(|n| n.parse::<i32>().ok())
            .filter(|&n| n >= 0),
    })
}

/// All NVMe controllers (class 0x010802), sorted by address. Empty if the host has no PCI.
pub fn list_nvme(root: &Path) -> io::Result<Vec<PciDevice>> {
    let rd = match std::fs::read_dir(root.join("bus/pci/devices")) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut v = Vec::new();
    for e in rd.flatten() {
        let Ok(addr) = e.file_name().to_string_lossy().parse::<PciAddr>() else {
            continue;
        };
        if let Ok(d) = device(root, &addr)
            && d.is_nvme()
        {
            v.push(d);
        }
    }
    v.sort_by_key(|d| d.addr);
    Ok(v)
}

/// The PCI address a sysfs path resolves to, if its last component is one.
fn pci_of(p: &Path) -> Option<PciAddr> {
    let c = std::fs::canonicalize(p).ok()?;
    c.file_name()?.to_str()?.parse().ok()
}

/// The NVMe controller behind a kernel name: a controller (`nvme0`, `/dev/nvme0`), a namespace
/// (`nvme0n1`, `/dev/nvme0n1`), a multipath path (`nvme0c1n1`) or a partition (`nvme0n1p2`).
pub fn controller_of_block(root: &Path, name: &str) -> Option<PciAddr> {
    let name = name.strip_prefix("/dev/").unwrap_or(name);
    let rest = name.strip_prefix("nvme")?;
    let digits = |s: &str| s.bytes().take_while(u8::is_ascii_digit).count();
    let n = digits(rest);
    if n == 0 {
        return None;
    }
    if rest.len() == n {
        // A controller: /sys/class/nvme/nvme0/device -> the PCI device.
        return pci_of(&root.join("class/nvme").join(name).join("device"));
    }
    // A namespace: /sys/block/nvme0n1/device -> ../../nvme0 (the controller), whose device is
    // the PCI function. Partitions: go to the parent disk.
    let disk = match name.rfind('p') {
        Some(i)
            if i > 4 && name[i + 1..].bytes().all(|c| c.is_ascii_digit()) && name.len() > i + 1 =>
        {
            &name[..i]
        }
        _ => name,
    };
    if let Some(a) = pci_of(&root.join("block").join(disk).join("device/device")) {
        return Some(a);
    }
    // nvmeXcYnZ (a multipath path): controller nvmeY.
    let after = &rest[n..];
    if let Some(c) = after.strip_prefix('c') {
        let m = digits(c);
        if m > 0 {
            return controller_of_block(root, &format!("nvme{}", &c[..m]));
        }
    }
    // A multipath head: follow its first path.
    if let Ok(rd) = std::fs::read_dir(root.join("block").join(disk).join("multipath")) {
        let mut paths: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        paths.sort();
        if let Some(p) = paths.first() {
            return controller_of_block(root, p);
        }
    }
    // Last resort: the usual nvmeXnY naming without native multipath.
    controller_of_block(root, &format!("nvme{}", &rest[..n]))
}

/// Kernel controller names (`nvme0`) of the NVMe function at `addr`.
pub fn controllers_of(root: &Path, addr: &PciAddr) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(device_dir(root, addr).join("nvme"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("nvme"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Model string of the controller at `addr`, when the nvme driver has it.
pub fn nvme_model(root: &Path, addr: &PciAddr) -> Option<String> {
    controllers_of(root, addr)
        .iter()
        .find_map(|c| read_trim(&device_dir(root, addr).join("nvme").join(c).join("model")).ok())
        .filter(|m| !m.is_empty())
}

/// Block devices (names as in /dev) of the namespaces the kernel driver exposes for the
/// controller at `addr`. A multipath path `nvmeXcYnZ` is reported as its head `nvmeXnZ`.
pub fn namespaces_of(root: &Path, addr: &PciAddr) -> Vec<String> {
    let mut v = Vec::new();
    for c in controllers_of(root, addr) {
        let Ok(rd) = std::fs::read_dir(device_dir(root, addr).join("nvme").join(&c)) else {
            continue;
        };
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(ns) = namespace_name(&n) {
                v.push(ns);
            }
        }
    }
    v.sort();
    v.dedup();
    v
}

/// `nvme0n1` → itself; `nvme1c0n2` → `nvme1n2`; anything else (`nvme0n1p1`, `device`) → None.
fn namespace_name(n: &str) -> Option<String> {
    let rest = n.strip_prefix("nvme")?;
    let num = |s: &str| s.bytes().take_while(u8::is_ascii_digit).count();
    let a = num(rest);
    if a == 0 {
        return None;
    }
    let (sub, mut tail) = rest.split_at(a);
    if let Some(t) = tail.strip_prefix('c') {
        let b = num(t);
        if b == 0 {
            return None;
        }
        tail = &t[b..];
    }
    let t = tail.strip_prefix('n')?;
    let z = num(t);
    (z > 0 && z == t.len()).then(|| format!("nvme{sub}n{t}"))
}

/// IOMMU groups exist (`root/kernel/iommu_groups` is non-empty): an IOMMU is on.
pub fn iommu_present(root: &Path) -> bool {
    std::fs::read_dir(root.join("kernel/iommu_groups")).is_ok_and(|mut rd| rd.next().is_some())
}

/// A device in an IOMMU group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMember {
    /// Device name (a PCI address for PCI devices).
    pub name: String,
    pub driver: Option<String>,
    pub class: Option<u32>,
}

impl GroupMember {
    /// Whether VFIO accepts this member in a viable group: no driver, a VFIO-safe driver
    /// (vfio-pci, pci-stub, pcieport), or a PCI bridge.
    pub fn dma_safe(&self) -> bool {
        matches!(
            self.driver.as_deref(),
            None | Some("vfio-pci" | "pci-stub" | "pcieport")
        ) || self.class.is_some_and(|c| c >> 8 == 0x0604)
    }
}

/// Members of IOMMU group `group`, sorted by name.
pub fn group_members(root: &Path, group: u32) -> io::Result<Vec<GroupMember>> {
    let dir = root
        .join("kernel/iommu_groups")
        .join(group.to_string())
        .join("devices");
    let mut v = Vec::new();
    for e in std::fs::read_dir(&dir)?.flatten() {
        let p = e.path();
        v.push(GroupMember {
            name: e.file_name().to_string_lossy().into_owned(),
            driver: driver_at(&p),
            class: read_hex(&p.join("class")).ok(),
        });
    }
    v.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(v)
}

#[cfg(test)]
thread_local! {
    /// Every sysfs write made by this thread, in order (path, value).
    pub(crate) static WRITES: std::cell::RefCell<Vec<(PathBuf, String)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Write one sysfs attribute in a single write(2), as sysfs expects.
fn write_attr(p: &Path, value: &str) -> io::Result<()> {
    #[cfg(test)]
    WRITES.with_borrow_mut(|w| w.push((p.to_path_buf(), value.to_string())));
    let f = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(p)
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", p.display())))?;
    f.write_all_at(value.as_bytes(), 0).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("write '{}' to {}: {e}", value.trim(), p.display()),
        )
    })
}

/// Name of the driver bound to `addr`, if any.
pub fn current_driver(root: &Path, addr: &PciAddr) -> Option<String> {
    driver_at(&device_dir(root, addr))
}

/// Bind `addr` to `driver` the way SPDK's setup.sh and dpdk-devbind do: set `driver_override`,
/// unbind from the current driver, then ask the PCI core to probe (`drivers_probe`). Checks
/// (class, use, IOMMU group) are the caller's job and must come first.
pub fn bind(root: &Path, addr: &PciAddr, driver: &str) -> io::Result<()> {
    let dir = device_dir(root, addr);
    if !dir.exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no PCI device {addr}"),
        ));
    }
    write_attr(&dir.join("driver_override"), driver)?;
    if dir.join("driver").exists() {
        write_attr(&dir.join("driver/unbind"), &addr.to_string())?;
    }
    write_attr(&root.join("bus/pci/drivers_probe"), &addr.to_string())
}

/// Give `addr` back to the kernel: clear `driver_override`, unbind, and probe so the matching
/// kernel driver (nvme) claims it.
pub fn unbind_to_kernel(root: &Path, addr: &PciAddr) -> io::Result<()> {
    let dir = device_dir(root, addr);
    if !dir.exists() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no PCI device {addr}"),
        ));
    }
    write_attr(&dir.join("driver_override"), "\n")?;
    if dir.join("driver").exists() {
        write_attr(&dir.join("driver/unbind"), &addr.to_string())?;
    }
    write_attr(&root.join("bus/pci/drivers_probe"), &addr.to_string())
}

/// Kernel module `name` is loaded (or built in): `root/module/<name>` exists. Module names use
/// underscores (`vfio_pci`).
pub fn module_loaded(root: &Path, name: &str) -> bool {
    root.join("module").join(name.replace('-', "_")).exists()
}

/// Load module `name` with `modprobe` unless [`module_loaded`] says it is there.
pub fn ensure_module(root: &Path, name: &str) -> io::Result<()> {
    if module_loaded(root, name) {
        return Ok(());
    }
    let out = std::process::Command::new("modprobe").arg(name).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "modprobe {name} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Map BAR `bar` through `resource<bar>` (the uio path; vfio maps through the device fd).
pub fn map_resource(root: &Path, addr: &PciAddr, bar: u8) -> io::Result<MmioRegion> {
    if bar > 5 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("BAR {bar} does not exist"),
        ));
    }
    let p = device_dir(root, addr).join(format!("resource{bar}"));
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&p)
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", p.display())))?;
    let len = f.metadata()?.len() as usize;
    MmioRegion::map(f.as_fd(), len, 0)
        .map_err(|e| io::Error::new(e.kind(), format!("mmap {}: {e}", p.display())))
}

fn config_file(root: &Path, addr: &PciAddr, write: bool) -> io::Result<File> {
    let p = device_dir(root, addr).join("config");
    OpenOptions::new()
        .read(true)
        .write(write)
        .open(&p)
        .map_err(|e| io::Error::new(e.kind(), format!("open {}: {e}", p.display())))
}

/// Read configuration space through sysfs `config`.
pub fn read_config(root: &Path, addr: &PciAddr, offset: u64, buf: &mut [u8]) -> io::Result<()> {
    config_file(root, addr, false)?.read_exact_at(buf, offset)
}

/// Write configuration space through sysfs `config`.
pub fn write_config(root: &Path, addr: &PciAddr, offset: u64, buf: &[u8]) -> io::Result<()> {
    config_file(root, addr, true)?.write_all_at(buf, offset)
}

/// Through sysfs `config`: enable memory decoding and bus mastering and disable INTx in the
/// Command register (the uio path; [`crate::vfio::Device::enable_bus_master`] for vfio).
pub fn enable_bus_master(root: &Path, addr: &PciAddr) -> io::Result<()> {
    let mut b = [0u8; 2];
    read_config(root, addr, 0x04, &mut b)?;
    let cmd = u16::from_le_bytes(b) | 0x2 | 0x4 | 0x400;
    write_config(root, addr, 0x04, &cmd.to_le_bytes())
}

/// The default IOMMU domain type of `addr`'s group (`kernel/iommu_groups/<g>/type`: "DMA",
/// "DMA-FQ", "identity", ...), or `None` when the device has no IOMMU group or the kernel does
/// not say.
pub fn iommu_domain_type(root: &Path, addr: &PciAddr) -> Option<String> {
    let t = std::fs::read_to_string(device_dir(root, addr).join("iommu_group/type")).ok()?;
    Some(t.trim().to_string())
}

/// Whether the IOMMU translates the device's DMA addresses (so a physical address handed to
/// it through uio_pci_generic would fault): it has a group whose domain is not identity
/// (passthrough).
pub fn iommu_translates(root: &Path, addr: &PciAddr) -> bool {
    let has_group = device_dir(root, addr).join("iommu_group").exists();
    has_group && iommu_domain_type(root, addr).is_none_or(|t| t != "identity")
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;
    use crate::testutil::TempDir;

    fn a(s: &str) -> PciAddr {
        s.parse().unwrap()
    }

    /// A fake sysfs: an NVMe controller at 00:04.0 on nvme (nvme0, namespaces nvme0n1 and a
    /// multipath path nvme1c0n2), a NIC at 00:03.0, IOMMU group 3 for 00:04.0.
    fn tree() -> TempDir {
        let t = TempDir::new();
        let r = t.path();
        for d in ["nvme", "virtio-pci"] {
            let dd = r.join("bus/pci/drivers").join(d);
            std::fs::create_dir_all(&dd).unwrap();
            std::fs::write(dd.join("unbind"), "").unwrap();
        }
        std::fs::write(r.join("bus/pci/drivers_probe"), "").unwrap();
        for (addr, class, drv) in [
            ("0000:00:04.0", "0x010802", "nvme"),
            ("0000:00:03.0", "0x020000", "virtio-pci"),
        ] {
            let d = r.join("bus/pci/devices").join(addr);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("class"), format!("{class}\n")).unwrap();
            std::fs::write(d.join("vendor"), "0x1b36\n").unwrap();
            std::fs::write(d.join("device"), "0x0010\n").unwrap();
            std::fs::write(d.join("numa_node"), "-1\n").unwrap();
            std::fs::write(d.join("driver_override"), "(null)\n").unwrap();
            symlink(r.join("bus/pci/drivers").join(drv), d.join("driver")).unwrap();
        }
        let dev = r.join("bus/pci/devices/0000:00:04.0");
        let g = r.join("kernel/iommu_groups/3/devices");
        std::fs::create_dir_all(&g).unwrap();
        symlink(&dev, g.join("0000:00:04.0")).unwrap();
        symlink(r.join("kernel/iommu_groups/3"), dev.join("iommu_group")).unwrap();
        let ctrl = dev.join("nvme/nvme0");
        std::fs::create_dir_all(ctrl.join("nvme0n1")).unwrap();
        std::fs::create_dir_all(ctrl.join("nvme1c0n2")).unwrap();
        std::fs::create_dir_all(ctrl.join("power")).unwrap();
        std::fs::write(
            ctrl.join("model"),
            "QEMU NVMe Ctrl                          \n",
        )
        .unwrap();
        symlink(&dev, ctrl.join("device")).unwrap();
        std::fs::create_dir_all(r.join("class/nvme")).unwrap();
        symlink(&ctrl, r.join("class/nvme/nvme0")).unwrap();
        std::fs::create_dir_all(r.join("block")).unwrap();
        symlink(ctrl.join("nvme0n1"), r.join("block/nvme0n1")).unwrap();
        symlink(&ctrl, ctrl.join("nvme0n1/device")).unwrap();
        t
    }

    #[test]
    fn addr_parse_and_display() {
        assert_eq!(a("0000:00:04.0").to_string(), "0000:00:04.0");
        assert_eq!(a("00:04.0").to_string(), "0000:00:04.0");
        assert_eq!(a("10000:e1:1f.7").to_string(), "10000:e1:1f.7");
        assert_eq!(a("0000:AB:01.1").bus, 0xab);
        for junk in [
            "",
            "nvme0",
            "0000:00:04",
            "0000:00:20.0",
            "0000:00:04.8",
            "0:0:0:0.0",
            "00:04.x",
            "0000:100:04.0",
        ] {
            let e = junk.parse::<PciAddr>().unwrap_err();
            assert!(e.to_string().contains("not a PCI address"), "{junk}: {e}");
        }
    }

    #[test]
    fn lists_nvme_with_details() {
        let t = tree();
        let v = list_nvme(t.path()).unwrap();
        assert_eq!(v.len(), 1);
        let d = &v[0];
        assert_eq!(d.addr, a("0000:00:04.0"));
        assert_eq!((d.vendor, d.device, d.class), (0x1b36, 0x0010, CLASS_NVME));
        assert_eq!(d.driver.as_deref(), Some("nvme"));
        assert_eq!(d.iommu_group, Some(3));
        assert_eq!(d.numa_node, None);
        assert!(!device(t.path(), &a("0000:00:03.0")).unwrap().is_nvme());
        assert_eq!(
            device(t.path(), &a("0000:00:09.0")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(
            nvme_model(t.path(), &d.addr).as_deref(),
            Some("QEMU NVMe Ctrl")
        );
        assert!(list_nvme(Path::new("/nonexistent")).unwrap().is_empty());
    }

    #[test]
    fn namespaces_and_block_names() {
        let t = tree();
        let r = t.path();
        let addr = a("0000:00:04.0");
        assert_eq!(namespaces_of(r, &addr), vec!["nvme0n1", "nvme1n2"]);
        for n in [
            "nvme0",
            "/dev/nvme0",
            "nvme0n1",
            "/dev/nvme0n1",
            "nvme0n1p1",
            "nvme1c0n2",
        ] {
            assert_eq!(controller_of_block(r, n), Some(addr), "{n}");
        }
        for n in ["nvme7", "sda", "nvme", "/dev/loop0"] {
            assert_eq!(controller_of_block(r, n), None, "{n}");
        }
        assert_eq!(namespace_name("nvme0n1p1"), None);
        assert_eq!(namespace_name("nvme2c3n14").as_deref(), Some("nvme2n14"));
    }

    #[test]
    fn bind_and_unbind_write_sequence() {
        let t = tree();
        let r = t.path();
        let addr = a("0000:00:04.0");
        WRITES.take();
        bind(r, &addr, "vfio-pci").unwrap();
        let dev = device_dir(r, &addr);
        let w = WRITES.take();
        assert_eq!(
            w,
            vec![
                (dev.join("driver_override"), "vfio-pci".to_string()),
                (dev.join("driver/unbind"), "0000:00:04.0".to_string()),
                (r.join("bus/pci/drivers_probe"), "0000:00:04.0".to_string()),
            ]
        );
        assert_eq!(
            std::fs::read_to_string(r.join("bus/pci/drivers/nvme/unbind")).unwrap(),
            "0000:00:04.0"
        );
        unbind_to_kernel(r, &addr).unwrap();
        let w = WRITES.take();
        assert_eq!(w[0], (dev.join("driver_override"), "\n".to_string()));
        assert_eq!(w.last().unwrap().0, r.join("bus/pci/drivers_probe"));
        assert_eq!(
            bind(r, &a("0000:00:09.0"), "vfio-pci").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        assert!(WRITES.take().is_empty());
    }

    #[test]
    fn group_members_and_safety() {
        let t = tree();
        let m = group_members(t.path(), 3).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].driver.as_deref(), Some("nvme"));
        assert!(!m[0].dma_safe());
        assert!(
            GroupMember {
                name: "x".into(),
                driver: Some("e1000e".into()),
                class: Some(0x060400)
            }
            .dma_safe()
        );
        assert!(iommu_present(t.path()));
        assert!(!iommu_present(Path::new("/nonexistent")));
    }

    #[test]
    fn resource_and_config_files() {
        let t = tree();
        let addr = a("0000:00:04.0");
        let dev = device_dir(t.path(), &addr);
        std::fs::write(dev.join("resource0"), vec![0u8; 16384]).unwrap();
        std::fs::write(dev.join("config"), vec![0u8; 256]).unwrap();
        let bar = map_resource(t.path(), &addr, 0).unwrap();
        bar.write32(0x14, 0x0046_0001);
        assert_eq!(bar.read32(0x14), 0x0046_0001);
        assert!(map_resource(t.path(), &addr, 6).is_err());
        write_config(t.path(), &addr, 4, &[6, 4]).unwrap();
        let mut b = [0u8; 2];
        read_config(t.path(), &addr, 4, &mut b).unwrap();
        assert_eq!(b, [6, 4]);
        write_config(t.path(), &addr, 4, &[0, 0]).unwrap();
        enable_bus_master(t.path(), &addr).unwrap();
        read_config(t.path(), &addr, 4, &mut b).unwrap();
        assert_eq!(u16::from_le_bytes(b), 0x0406);
    }
}
