//! CUDA kernels for falconer: `.cu` sources compiled at run time by NVRTC for the
//! device's own architecture, with typed Rust launchers.
//!
//! This crate is the only place that launches a kernel. Everything lives behind the
//! `cuda` feature; without it the crate is empty, and the CPU reference backend in
//! `falconer-engine` needs nothing from it.
//!
//! With the feature, cudarc loads the CUDA libraries at run time, so the crate builds
//! and its users start on machines without CUDA: [`Gpu::new`] checks that the driver,
//! NVRTC and cuBLAS are present before touching them and returns
//! [`KernelError::Unavailable`] otherwise.
//!
//! The launchers never trust an index they cannot check: per-step metadata (token ids,
//! KV slots, block tables) is uploaded through [`Gpu::upload_step`], which validates it
//! on the host and records the bounds each launcher checks against its operands. A step
//! replayed from a CUDA graph (`graph`: [`Gpu::record`]) re-checks the bounds its
//! launchers checked while it was recorded.

#[cfg(feature = "cuda")]
mod buffer;
#[cfg(feature = "cuda")]
mod error;
#[cfg(feature = "cuda")]
mod gpu;
#[cfg(feature = "cuda")]
mod graph;
#[cfg(feature = "cuda")]
mod module;
#[cfg(feature = "cuda")]
mod ops;
#[cfg(feature = "cuda")]
mod step;

#[cfg(feature = "cuda")]
pub use error::KernelError;
#[cfg(feature = "cuda")]
pub use gpu::{
    DeviceBuffer, Elem, Forked, GemvKernel, GemvSplit, Gpu, PairLaunch, ATTN_SPLIT_KEYS,
    ATTN_TC_MIN_CTX, FORK_MLP, FORK_WIDE, GEMV_SPLIT, PAIR_LAUNCH, ROW_INVARIANT_MAX_ROWS,
    TC_BLOCKS_PER_SM,
};
#[cfg(feature = "cuda")]
pub use graph::{CapturedGraph, InputSlot, ScratchPool, StepLimits, StepShape};
#[cfg(feature = "cuda")]
pub use half::bf16;
#[cfg(feature = "cuda")]
pub use ops::{
    AttentionParams, ForkedProduct, KvBuffers, PairHalf, PenaltySpec, ProbsSpec, QuantLayout,
    QuantWeight, SumTerm, WarpedRow, GEMV_MAX_ROWS,
};
#[cfg(feature = "cuda")]
pub use step::{DeviceStep, SeqDesc, StepInput};
