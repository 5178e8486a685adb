//! falconer's engine: everything that computes, and nothing that schedules.
//!
//! - [`config`]: `config.json` of every Falcon layout, normalised.
//! - [`checkpoint`]: memory-mapped safetensors (single or sharded), generation defaults.
//! - [`tokenizer`]: `tokenizer.json` and streaming detokenisation.
//! - [`posenc`]: rotary embeddings (default, linear, dynamic NTK, YaRN) and ALiBi.
//! - [`backend`]: the narrow op trait and the CPU reference backend.
//! - [`model`]: the Falcon decoder over a paged KV cache, whole or as a layer shard.
//! - [`quant`]: 8-bit and 4-bit weight formats, quantized on load or saved quantized.
//! - [`kv`]: block allocator and per-sequence block tables (pure logic).
//! - [`runner`]: a model plus its block tables: prefill, decode, verify, truncate.
//! - [`sampling`], [`chat`], [`speculative`]: pure functions for choosing tokens,
//!   formatting prompts and accepting draft tokens.
//!
//! The engine knows nothing of actors or async runtimes; the `falconer` crate builds
//! the actor runtime on top of it.

pub mod backend;
pub mod chat;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod kv;
pub mod model;
pub mod posenc;
pub mod quant;
pub mod runner;
pub mod sampling;
pub mod speculative;
pub mod tokenizer;

pub use backend::cpu::CpuBackend;
pub use backend::Backend;
pub use checkpoint::ModelDir;
pub use config::FalconConfig;
pub use error::{Error, Result};
pub use model::{
    Falcon, LoadOptions, LoadProgress, Logits, ProgressFn, RowsOut, RowsWanted, SeqChunk,
};
pub use quant::WeightFormat;
pub use runner::{ModelRunner, SeqWork};
pub use tokenizer::{DecodeStream, Tokenizer};
