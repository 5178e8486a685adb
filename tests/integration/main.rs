//! falconer's integration tests: one binary, one module per area.
#![allow(clippy::unwrap_used)]

mod common;
mod cuda_attention;
mod cuda_fork;
mod cuda_fused_rope;
mod cuda_golden;
mod cuda_graphs;
mod cuda_quantized;
mod cuda_runtime;
mod cuda_sampling;
mod cuda_split;
mod cuda_sum;
mod golden;
mod interleavings;
mod loader_errors;
mod outputs;
mod quantized;
mod runtime;
mod saved_quantized;
mod telemetry;
