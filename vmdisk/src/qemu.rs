//! qemu-img / qemu-nbd helpers (placeholder).
