//! Temporary library entry point so `libvirt/` can be built and tested standalone.

pub mod libvirt;
