//! CUDA kernels for falconer: `.cu` sources compiled at run time by NVRTC for the
//! device's own architecture, with typed Rust launchers.
//!
//! This crate is the only place that launches a kernel. Until the CUDA backend lands
//! (feature `cuda`), it holds no kernels: the CPU reference backend in
//! `falconer-engine` needs none.
