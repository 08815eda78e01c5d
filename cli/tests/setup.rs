//! `rio setup` logic against fake sysfs/proc/dev trees in temporary directories. No test here
//! touches the real /sys except `status_of_this_host_reads_only`, which only reads.
//!
//! Binding is observed through a "fake kernel" thread that does what the PCI core does when
//! `drivers_probe` is written: it moves the `driver` link to the driver named in
//! `driver_override` (or back to nvme) and, for vfio-pci, creates `/dev/vfio/<group>`.

use std::collections::BTreeMap;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rio::Error;
use rio_cli::setup::{SetupArgs, SetupCmd, run_to};

const ADDR: &str = "0000:00:04.0";
const NIC: &str = "0000:00:03.0";

struct Fake {
    _dir: tempfile::TempDir,
    root: PathBuf,
}

impl Fake {
    fn sys(&self) -> PathBuf {
        self.root.join("sys")
    }
    fn dev_dir(&self, addr: &str) -> PathBuf {
        self.sys().join("bus/pci/devices").join(addr)
    }
    fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.root.join(rel)).unwrap()
    }
    fn driver(&self, addr: &str) -> Option<String> {
        std::fs::read_link(self.dev_dir(addr).join("driver"))
            .ok()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
    }
    fn set_driver(&self, addr: &str, driver: &str) {
        let l = self.dev_dir(addr).join("driver");
        let _ = std::fs::remove_file(&l);
        symlink(self.sys().join("bus/pci/drivers").join(driver), l).unwrap();
    }

    /// Every path under the root with its file contents or link target.
    fn snapshot(&self) -> BTreeMap<PathBuf, String> {
        fn walk(p: &Path, base: &Path, out: &mut BTreeMap<PathBuf, String>) {
            let m = std::fs::symlink_metadata(p).unwrap();
            let rel = p.strip_prefix(base).unwrap().to_path_buf();
            if m.file_type().is_symlink() {
                out.insert(
                    rel,
                    format!("-> {}", std::fs::read_link(p).unwrap().display()),
                );
            } else if m.is_dir() {
                out.insert(rel, "dir".into());
                for e in std::fs::read_dir(p).unwrap() {
                    walk(&e.unwrap().path(), base, out);
                }
            } else {
                out.insert(rel, std::fs::read_to_string(p).unwrap());
            }
        }
        let mut m = BTreeMap::new();
        walk(&self.root, &self.root, &mut m);
        m
    }
}

fn write(p: &Path, s: &str) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, s).unwrap();
}

/// An NVMe controller at 00:04.0 (nvme0, namespace nvme0n1 = 259:0) bound to nvme in IOMMU
/// group 3, a NIC at 00:03.0 in group 2, 2 MiB hugepages on two nodes, vfio and uio modules
/// loaded.
fn fake() -> Fake {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let sys = root.join("sys");
    for d in [
        "nvme",
        "vfio-pci",
        "uio_pci_generic",
        "virtio-pci",
        "e1000e",
    ] {
        write(&sys.join("bus/pci/drivers").join(d).join("unbind"), "");
    }
    write(&sys.join("bus/pci/drivers_probe"), "");
    for (addr, class, drv, group) in [
        (ADDR, "0x010802", "nvme", 3),
        (NIC, "0x020000", "virtio-pci", 2),
    ] {
        let d = sys.join("bus/pci/devices").join(addr);
        write(&d.join("class"), &format!("{class}\n"));
        write(&d.join("vendor"), "0x1b36\n");
        write(&d.join("device"), "0x0010\n");
        write(&d.join("numa_node"), "0\n");
        write(&d.join("driver_override"), "(null)\n");
        symlink(sys.join("bus/pci/drivers").join(drv), d.join("driver")).unwrap();
        let g = sys.join(format!("kernel/iommu_groups/{group}/devices"));
        std::fs::create_dir_all(&g).unwrap();
        symlink(&d, g.join(addr)).unwrap();
        symlink(
            sys.join(format!("kernel/iommu_groups/{group}")),
            d.join("iommu_group"),
        )
        .unwrap();
    }
    let dev = sys.join("bus/pci/devices").join(ADDR);
    let ctrl = dev.join("nvme/nvme0");
    write(&ctrl.join("model"), "QEMU NVMe Ctrl      \n");
    symlink(&dev, ctrl.join("device")).unwrap();
    let ns = ctrl.join("nvme0n1");
    write(&ns.join("dev"), "259:0\n");
    std::fs::create_dir_all(ns.join("holders")).unwrap();
    symlink(&ctrl, ns.join("device")).unwrap();
    std::fs::create_dir_all(sys.join("class/nvme")).unwrap();
    symlink(&ctrl, sys.join("class/nvme/nvme0")).unwrap();
    std::fs::create_dir_all(sys.join("class/block")).unwrap();
    symlink(&ns, sys.join("class/block/nvme0n1")).unwrap();
    std::fs::create_dir_all(sys.join("block")).unwrap();
    symlink(&ns, sys.join("block/nvme0n1")).unwrap();
    for m in [
        "vfio",
        "vfio_pci",
        "vfio_iommu_type1",
        "uio_pci_generic",
        "nvme",
    ] {
        std::fs::create_dir_all(sys.join("module").join(m)).unwrap();
    }
    let hp = |dir: PathBuf, total: u64, free: u64| {
        write(&dir.join("nr_hugepages"), &format!("{total}\n"));
        write(&dir.join("free_hugepages"), &format!("{free}\n"));
        write(&dir.join("resv_hugepages"), "0\n");
        write(&dir.join("surplus_hugepages"), "0\n");
    };
    hp(sys.join("kernel/mm/hugepages/hugepages-2048kB"), 8, 8);
    for n in 0..2 {
        hp(
            sys.join(format!(
                "devices/system/node/node{n}/hugepages/hugepages-2048kB"
            )),
            4,
            4,
        );
    }
    write(
        &root.join("proc/self/mountinfo"),
        "22 1 8:1 / / rw - ext4 /dev/sda1 rw\n",
    );
    write(
        &root.join("proc/swaps"),
        "Filename\tType\tSize\tUsed\tPriority\n",
    );
    write(
        &root.join("proc/mounts"),
        "hugetlbfs /dev/hugepages hugetlbfs rw,pagesize=2M 0 0\n",
    );
    std::fs::create_dir_all(root.join("dev")).unwrap();
    Fake { _dir: dir, root }
}

/// What the fake kernel saw when it acted on `drivers_probe`.
#[derive(Debug)]
struct Probe {
    override_: String,
    old_driver_unbind: Option<String>,
    probed: String,
}

/// Act like the PCI core once: when `drivers_probe` names `addr`, rebind per
/// `driver_override`.
fn fake_kernel(f: &Fake, addr: &str, group: u32) -> JoinHandle<Option<Probe>> {
    let sys = f.sys();
    let root = f.root.clone();
    let addr = addr.to_string();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(8);
        let probe = sys.join("bus/pci/drivers_probe");
        let dev = sys.join("bus/pci/devices").join(&addr);
        while Instant::now() < deadline {
            let probed = std::fs::read_to_string(&probe).unwrap_or_default();
            if probed.trim() == addr {
                let ov = std::fs::read_to_string(dev.join("driver_override")).unwrap();
                let old = std::fs::read_to_string(dev.join("driver/unbind")).ok();
                let target = match ov.trim() {
                    "" | "(null)" => "nvme".to_string(),
                    d => d.to_string(),
                };
                let _ = std::fs::remove_file(dev.join("driver"));
                symlink(
                    sys.join("bus/pci/drivers").join(&target),
                    dev.join("driver"),
                )
                .unwrap();
                if target == "vfio-pci" {
                    write(&root.join(format!("dev/vfio/{group}")), "");
                }
                std::fs::write(&probe, "").unwrap();
                return Some(Probe {
                    override_: ov,
                    old_driver_unbind: old,
                    probed,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    })
}

fn run(f: &Fake, cmd: SetupCmd) -> (rio::Result<()>, String, String) {
    let mut out = Vec::new();
    let mut warn = Vec::new();
    let r = run_to(&SetupArgs { cmd }, &f.sys(), &mut out, &mut warn);
    (
        r,
        String::from_utf8(out).unwrap(),
        String::from_utf8(warn).unwrap(),
    )
}

fn bind(device: &str, driver: &str, allow_unsafe_dma: bool) -> SetupCmd {
    SetupCmd::Bind {
        device: device.into(),
        driver: driver.into(),
        allow_unsafe_dma,
    }
}

/// Run `cmd`, expect a usage error containing every one of `needles`, and that nothing under
/// the fake root changed.
fn refused(f: &Fake, cmd: SetupCmd, needles: &[&str]) -> Error {
    let before = f.snapshot();
    let (r, out, _) = run(f, cmd);
    let e = r.expect_err("must be refused");
    let msg = e.to_string();
    assert!(e.is_usage(), "{msg} should be a usage error (exit 2)");
    assert!(!msg.contains('\n'), "one line: {msg}");
    for n in needles {
        assert!(msg.contains(n), "'{msg}' should mention '{n}'");
    }
    assert!(out.is_empty(), "nothing printed on refusal: {out}");
    assert_eq!(before, f.snapshot(), "a refused command wrote to the tree");
    e
}

#[test]
fn status_lists_controllers_iommu_modules_hugepages() {
    let f = fake();
    let (r, out, _) = run(&f, SetupCmd::Status { json: false });
    r.unwrap();
    assert!(
        out.contains(
            "0000:00:04.0  QEMU NVMe Ctrl [1b36:0010]  driver nvme  iommu group 3  numa node 0"
        ),
        "{out}"
    );
    assert!(out.contains("/dev/nvme0n1: not in use"), "{out}");
    assert!(!out.contains(NIC), "only NVMe controllers: {out}");
    assert!(out.contains("IOMMU: enabled"), "{out}");
    assert!(out.contains("vfio_pci loaded"), "{out}");
    assert!(
        out.contains(
            "2M: 8 total, 8 free, 0 reserved, 0 surplus (free/total: node0 4/4, node1 4/4)"
        ),
        "{out}"
    );
    assert!(out.contains("hugetlbfs mounted at /dev/hugepages"), "{out}");

    write(
        &f.root.join("proc/self/mountinfo"),
        "30 1 259:0 / /mnt/data rw - xfs /dev/nvme0n1 rw\n",
    );
    let (r, out, _) = run(&f, SetupCmd::Status { json: true });
    r.unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let c = &v["controllers"][0];
    assert_eq!(c["addr"], ADDR);
    assert_eq!(c["model"], "QEMU NVMe Ctrl");
    assert_eq!(c["driver"], "nvme");
    assert_eq!(c["iommu_group"], 3);
    assert_eq!(c["numa_node"], 0);
    assert_eq!(c["namespaces"][0]["name"], "nvme0n1");
    assert_eq!(
        c["namespaces"][0]["in_use"],
        "/dev/nvme0n1 is mounted on /mnt/data"
    );
    assert_eq!(v["iommu"], true);
    assert_eq!(v["hugepages"][0]["size"], "2M");
    assert_eq!(v["hugepages"][0]["nodes"][1]["total"], 4);
}

#[test]
fn status_of_this_host_reads_only() {
    // Reads /sys and /proc; writes nothing.
    rio_cli::setup::status(Path::new("/sys")).unwrap();
}

#[test]
fn bind_refuses_non_nvme_before_writing() {
    let f = fake();
    refused(
        &f,
        bind(NIC, "vfio-pci", false),
        &[NIC, "not an NVMe controller", "0x020000"],
    );
    refused(
        &f,
        bind(NIC, "uio_pci_generic", true),
        &["not an NVMe controller"],
    );
    refused(
        &f,
        SetupCmd::Unbind { device: NIC.into() },
        &["not an NVMe controller"],
    );
    assert_eq!(f.driver(NIC).as_deref(), Some("virtio-pci"));
}

#[test]
fn bind_refuses_junk_and_unknown_devices() {
    let f = fake();
    refused(
        &f,
        bind("00:zz.0", "vfio-pci", false),
        &["00:zz.0", "not a PCI address"],
    );
    refused(
        &f,
        bind("/dev/sda", "vfio-pci", false),
        &["/dev/sda", "not a PCI address"],
    );
    refused(
        &f,
        bind("0000:00:09.0", "vfio-pci", false),
        &["0000:00:09.0", "no such PCI device"],
    );
    refused(
        &f,
        bind("nvme7", "vfio-pci", false),
        &["nvme7", "no NVMe controller"],
    );
    refused(&f, bind(ADDR, "igb_uio", false), &["--driver", "igb_uio"]);
}

#[test]
fn bind_vfio_writes_override_unbind_probe_then_waits() {
    let f = fake();
    let k = fake_kernel(&f, ADDR, 3);
    // By namespace name: resolved to the controller through sysfs.
    let (r, out, warn) = run(&f, bind("/dev/nvme0n1", "vfio-pci", false));
    r.unwrap();
    let p = k.join().unwrap().expect("drivers_probe was written");
    assert_eq!(
        p.override_, "vfio-pci",
        "driver_override set before the probe"
    );
    assert_eq!(
        p.old_driver_unbind.as_deref(),
        Some(ADDR),
        "unbound from nvme before the probe"
    );
    assert_eq!(p.probed, ADDR);
    assert_eq!(f.read("sys/bus/pci/drivers/nvme/unbind"), ADDR);
    assert_eq!(f.driver(ADDR).as_deref(), Some("vfio-pci"));
    assert!(
        out.contains("0000:00:04.0: bound to vfio-pci (was nvme); IOMMU group 3"),
        "{out}"
    );
    assert!(out.contains("pcie://0000:00:04.0"), "{out}");
    assert!(warn.is_empty(), "{warn}");

    // Again: already there, nothing written.
    let before = f.snapshot();
    let (r, out, _) = run(&f, bind(ADDR, "vfio-pci", false));
    r.unwrap();
    assert_eq!(out.trim(), "0000:00:04.0: already bound to vfio-pci");
    assert_eq!(before, f.snapshot());
}

#[test]
fn unbind_gives_the_controller_back_to_nvme() {
    let f = fake();
    f.set_driver(ADDR, "vfio-pci");
    write(&f.dev_dir(ADDR).join("driver_override"), "vfio-pci\n");
    let k = fake_kernel(&f, ADDR, 3);
    let (r, out, _) = run(
        &f,
        SetupCmd::Unbind {
            device: ADDR.into(),
        },
    );
    r.unwrap();
    let p = k.join().unwrap().expect("drivers_probe was written");
    assert_eq!(p.override_, "\n", "driver_override cleared");
    assert_eq!(p.old_driver_unbind.as_deref(), Some(ADDR));
    assert_eq!(f.read("sys/bus/pci/drivers/vfio-pci/unbind"), ADDR);
    assert_eq!(f.driver(ADDR).as_deref(), Some("nvme"));
    assert_eq!(
        out.trim(),
        "0000:00:04.0: given back to nvme (was vfio-pci)"
    );

    let before = f.snapshot();
    let (r, out, _) = run(
        &f,
        SetupCmd::Unbind {
            device: "nvme0".into(),
        },
    );
    r.unwrap();
    assert_eq!(out.trim(), "0000:00:04.0: already bound to nvme");
    assert_eq!(before, f.snapshot());
}

#[test]
fn unbind_refused_while_a_process_holds_the_vfio_group() {
    let f = fake();
    f.set_driver(ADDR, "vfio-pci");
    write(&f.root.join("dev/vfio/3"), "");
    write(&f.root.join("proc/4242/comm"), "rio\n");
    std::fs::create_dir_all(f.root.join("proc/4242/fd")).unwrap();
    symlink(f.root.join("dev/vfio/3"), f.root.join("proc/4242/fd/9")).unwrap();
    let e = refused(
        &f,
        SetupCmd::Unbind {
            device: ADDR.into(),
        },
        &[ADDR, "4242 (rio)"],
    );
    assert!(matches!(e, Error::InUse { .. }), "{e:?}");
}

#[test]
fn bind_refuses_a_group_shared_with_a_kernel_bound_device() {
    let f = fake();
    let other = "0000:00:04.1";
    let d = f.dev_dir(other);
    write(&d.join("class"), "0x020000\n");
    symlink(f.sys().join("bus/pci/drivers/e1000e"), d.join("driver")).unwrap();
    symlink(
        &d,
        f.sys().join("kernel/iommu_groups/3/devices").join(other),
    )
    .unwrap();
    refused(
        &f,
        bind(ADDR, "vfio-pci", false),
        &[
            ADDR,
            "IOMMU group 3 also holds 0000:00:04.1 (bound to e1000e)",
        ],
    );
    // A PCI bridge (pcieport) in the group is acceptable to VFIO: then the bind goes ahead.
    std::fs::remove_file(d.join("driver")).unwrap();
    write(&d.join("class"), "0x060400\n");
    let k = fake_kernel(&f, ADDR, 3);
    run(&f, bind(ADDR, "vfio-pci", false)).0.unwrap();
    k.join().unwrap().unwrap();
}

#[test]
fn bind_vfio_refused_without_iommu() {
    let f = fake();
    std::fs::remove_dir_all(f.sys().join("kernel/iommu_groups")).unwrap();
    std::fs::remove_file(f.dev_dir(ADDR).join("iommu_group")).unwrap();
    std::fs::create_dir_all(f.sys().join("kernel/iommu_groups")).unwrap();
    refused(
        &f,
        bind(ADDR, "vfio-pci", false),
        &[
            ADDR,
            "no IOMMU groups",
            "intel_iommu=on",
            "amd_iommu=on",
            "no-IOMMU mode is not supported",
        ],
    );
}

#[test]
fn uio_needs_allow_unsafe_dma_and_warns() {
    let f = fake();
    refused(
        &f,
        bind(ADDR, "uio_pci_generic", false),
        &[ADDR, "unrestricted DMA", "--allow-unsafe-dma"],
    );
    // No IOMMU needed for uio.
    std::fs::remove_dir_all(f.sys().join("kernel/iommu_groups")).unwrap();
    let k = fake_kernel(&f, ADDR, 0);
    let (r, out, warn) = run(&f, bind(ADDR, "uio_pci_generic", true));
    r.unwrap();
    assert_eq!(k.join().unwrap().unwrap().override_, "uio_pci_generic");
    assert_eq!(f.driver(ADDR).as_deref(), Some("uio_pci_generic"));
    assert!(
        warn.contains("warning") && warn.contains("DMA to any host memory"),
        "{warn}"
    );
    assert!(out.contains("bound to uio_pci_generic (was nvme)"), "{out}");
    assert!(!f.root.join("dev/vfio").exists());
}

#[test]
fn bind_refused_when_a_namespace_is_in_use() {
    let f = fake();
    write(
        &f.root.join("proc/self/mountinfo"),
        "30 1 259:0 / /mnt/data rw - xfs /dev/nvme0n1 rw\n",
    );
    let e = refused(
        &f,
        bind(ADDR, "vfio-pci", false),
        &[ADDR, "/dev/nvme0n1 is mounted on /mnt/data"],
    );
    assert!(matches!(e, Error::InUse { .. }));
    // uio needs an identity (passthrough) IOMMU domain to get this far.
    write(&f.sys().join("kernel/iommu_groups/3/type"), "identity\n");
    refused(
        &f,
        bind(ADDR, "uio_pci_generic", true),
        &["mounted on /mnt/data"],
    );

    let f = fake();
    write(
        &f.root.join("proc/swaps"),
        "Filename\tType\tSize\tUsed\tPriority\n/dev/nvme0n1 partition 1024 0 -2\n",
    );
    refused(
        &f,
        bind("nvme0", "vfio-pci", false),
        &["/dev/nvme0n1 is in use as swap"],
    );

    let f = fake();
    std::fs::create_dir_all(f.sys().join("class/block/nvme0n1/holders/dm-0")).unwrap();
    refused(
        &f,
        bind(ADDR, "vfio-pci", false),
        &["/dev/nvme0n1 is held by dm-0"],
    );

    // A mounted partition counts too.
    let f = fake();
    let part = f.sys().join("class/block/nvme0n1/nvme0n1p1");
    write(&part.join("partition"), "1\n");
    write(&part.join("dev"), "259:1\n");
    symlink(&part, f.sys().join("class/block/nvme0n1p1")).unwrap();
    write(
        &f.root.join("proc/self/mountinfo"),
        "30 1 259:1 / /boot rw - vfat /dev/nvme0n1p1 rw\n",
    );
    refused(
        &f,
        bind(ADDR, "vfio-pci", false),
        &["/dev/nvme0n1p1 is mounted on /boot"],
    );
}

#[test]
fn missing_module_in_a_fake_tree_is_an_error_not_a_modprobe() {
    let f = fake();
    std::fs::remove_dir_all(f.sys().join("module/vfio_pci")).unwrap();
    let before = f.snapshot();
    let (r, _, _) = run(&f, bind(ADDR, "vfio-pci", false));
    let e = r.unwrap_err();
    assert!(
        e.to_string().contains("module vfio_pci is not loaded"),
        "{e}"
    );
    assert_eq!(before, f.snapshot());
}

#[test]
fn hugepages_reserve_reads_back() {
    let f = fake();
    let (r, out, warn) = run(
        &f,
        SetupCmd::Hugepages {
            count: 64,
            size: "2M".into(),
            node: None,
        },
    );
    r.unwrap();
    assert_eq!(out.trim(), "2M hugepages: requested 64, obtained 64");
    assert!(warn.is_empty());
    assert_eq!(
        f.read("sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"),
        "64\n"
    );

    let (r, out, _) = run(
        &f,
        SetupCmd::Hugepages {
            count: 16,
            size: "2MB".into(),
            node: Some(1),
        },
    );
    r.unwrap();
    assert_eq!(
        out.trim(),
        "2M hugepages on node 1: requested 16, obtained 16"
    );
    assert_eq!(
        f.read("sys/devices/system/node/node1/hugepages/hugepages-2048kB/nr_hugepages"),
        "16\n"
    );

    for (size, node, needle) in [
        ("3X", None, "'3X' is not a page size"),
        ("3M", None, "'3M' is not a page size"),
        (
            "1G",
            None,
            "1G hugepages are not supported here (available: 2M)",
        ),
        ("2M", Some(7), "NUMA node 7 does not exist"),
    ] {
        refused(
            &f,
            SetupCmd::Hugepages {
                count: 1,
                size: size.into(),
                node,
            },
            &[needle],
        );
    }
}

#[test]
fn uio_refused_when_the_iommu_translates_dma() {
    // Physical addresses from pagemap fault behind a translating IOMMU (measured in the VM:
    // a DMAR fault and CSTS.CFS during Identify), so uio is refused before anything changes.
    let f = fake();
    write(&f.sys().join("kernel/iommu_groups/3/type"), "DMA-FQ\n");
    refused(
        &f,
        bind(ADDR, "uio_pci_generic", true),
        &[ADDR, "IOMMU translates", "DMA-FQ", "iommu=pt"],
    );
}
