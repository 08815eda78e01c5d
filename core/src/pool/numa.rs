//! NUMA topology for the pools: which node a CPU belongs to, and binding a fresh mapping to a
//! node before its pages are faulted in. Uses hwloc (through `hwlocality`); on a single-node
//! machine, or when hwloc cannot read the topology, binding is a no-op.

use hwlocality::Topology;
use hwlocality::memory::binding::{MemoryBindingFlags, MemoryBindingPolicy};
use hwlocality::object::types::ObjectType;

/// Where a core's pool memory was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// The machine has one NUMA node (or hwloc reports none): nothing to bind, every page is
    /// local.
    SingleNode,
    /// Bound to this NUMA node (hwloc `set_area_membind`, policy bind).
    Bound(u32),
    /// Several nodes, but the core's node is unknown or binding failed (logged): pages are
    /// placed by the kernel's default policy (first touch, from the thread that created them).
    Unbound,
}

/// The machine's CPU-to-node map and, when there are several nodes, an hwloc topology to bind
/// memory with.
pub(crate) struct Numa {
    topo: Option<Topology>,
    /// `cpu_node[cpu]` = the NUMA node of OS CPU `cpu`.
    cpu_node: Vec<Option<u32>>,
    nodes: usize,
}

impl std::fmt::Debug for Numa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Numa")
            .field("nodes", &self.nodes)
            .field("hwloc", &self.topo.is_some())
            .finish()
    }
}

impl Numa {
    /// Read the topology with hwloc. Failure is not fatal: the pools then run unbound, with a
    /// warning.
    pub(crate) fn detect() -> Numa {
        let topo = match Topology::new() {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "hwloc cannot read the topology; buffer pools are not NUMA-bound");
                return Numa::from_map(Vec::new());
            }
        };
        let mut cpu_node: Vec<Option<u32>> = Vec::new();
        let mut nodes = 0;
        for node in topo.objects_with_type(ObjectType::NUMANode) {
            nodes += 1;
            let (Some(os), Some(cpus)) = (node.os_index(), node.cpuset()) else {
                continue;
            };
            for cpu in cpus.iter_set() {
                let cpu = usize::from(cpu);
                if cpu_node.len() <= cpu {
                    cpu_node.resize(cpu + 1, None);
                }
                cpu_node[cpu] = Some(os as u32);
            }
        }
        Numa {
            topo: (nodes > 1).then_some(topo),
            cpu_node,
            nodes,
        }
    }

    /// A map without hwloc (tests, and the fallback when hwloc fails). Binding is never done.
    pub(crate) fn from_map(cpu_node: Vec<Option<u32>>) -> Numa {
        let mut seen: Vec<u32> = cpu_node.iter().flatten().copied().collect();
        seen.sort_unstable();
        seen.dedup();
        Numa {
            topo: None,
            nodes: seen.len(),
            cpu_node,
        }
    }

    pub(crate) fn nodes(&self) -> usize {
        self.nodes
    }

    pub(crate) fn node_of(&self, cpu: usize) -> Option<u32> {
        self.cpu_node.get(cpu).copied().flatten()
    }

    /// What binding memory for `cpu` will do, without doing it.
    pub(crate) fn placement_for(&self, cpu: usize) -> Placement {
        if self.nodes <= 1 {
            return Placement::SingleNode;
        }
        match (self.node_of(cpu), &self.topo) {
            (Some(n), Some(_)) => Placement::Bound(n),
            _ => Placement::Unbound,
        }
    }

    /// Bind the (not yet populated) area to `cpu`'s node. Returns the placement achieved;
    /// a failed bind is logged and reported as `Unbound`, never an error (the memory is still
    /// usable, only remote).
    pub(crate) fn bind(&self, area: &[u8], cpu: usize) -> Placement {
        let want = self.placement_for(cpu);
        let (Placement::Bound(node), Some(topo)) = (want, &self.topo) else {
            return want;
        };
        let Some(obj) = topo
            .objects_with_type(ObjectType::NUMANode)
            .find(|o| o.os_index() == Some(node as usize))
        else {
            return Placement::Unbound;
        };
        let Some(set) = obj.nodeset() else {
            return Placement::Unbound;
        };
        match topo.bind_memory_area::<[u8], _>(
            area,
            set,
            MemoryBindingPolicy::Bind,
            MemoryBindingFlags::empty(),
        ) {
            Ok(()) => Placement::Bound(node),
            Err(e) => {
                tracing::warn!(cpu, node, error = %e, "cannot bind buffer pool memory to its NUMA node; it stays where the kernel puts it");
                Placement::Unbound
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_node_map_never_binds() {
        let n = Numa::from_map(vec![Some(0), Some(0)]);
        assert_eq!(n.nodes(), 1);
        assert_eq!(n.placement_for(1), Placement::SingleNode);
        assert_eq!(n.bind(&[0u8; 16], 0), Placement::SingleNode);
    }

    #[test]
    fn multi_node_map_without_hwloc_is_unbound() {
        let n = Numa::from_map(vec![Some(0), Some(1)]);
        assert_eq!(n.nodes(), 2);
        assert_eq!(n.node_of(1), Some(1));
        assert_eq!(n.node_of(7), None);
        assert_eq!(n.placement_for(1), Placement::Unbound);
    }

    #[test]
    fn detect_agrees_with_sysfs() {
        let n = Numa::detect();
        let sysfs = std::fs::read_dir("/sys/devices/system/node")
            .map(|d| {
                d.flatten()
                    .filter(|e| {
                        e.file_name()
                            .to_str()
                            .and_then(|s| s.strip_prefix("node"))
                            .is_some_and(|s| s.parse::<u32>().is_ok())
                    })
                    .count()
            })
            .unwrap_or(1);
        assert_eq!(n.nodes(), sysfs.max(1));
        assert!(n.node_of(0).is_some());
    }
}
