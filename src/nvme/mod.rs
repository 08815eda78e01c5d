//! NVMe: the base-specification layer (structures, registers, status codes). The userspace
//! driver (issue "Polled userspace NVMe driver over VFIO") builds on it.

pub mod spec;
