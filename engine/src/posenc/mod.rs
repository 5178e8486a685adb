//! Position encodings: rotary embeddings with every scaling kind, and ALiBi biases.
//!
//! Both are computed on the host per forward pass (a few floats per token) and handed
//! to the backend, so every backend applies exactly the same numbers.

pub mod alibi;
pub mod rope;
