//! The engine's error types: one enum per concern, gathered in [`enum@Error`].
//!
//! Every variant is structured (file, tensor, field, value), so a caller can tell the
//! user exactly which input is wrong without parsing a message.

use std::path::PathBuf;

use thiserror::Error;

use crate::quant::WeightFormat;

pub use crate::chat::ChatError;
pub use crate::quant::QuantError;
pub use crate::sampling::SamplingError;
pub use crate::speculative::SpeculativeError;

/// Anything the engine can refuse.
#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error(transparent)]
    Speculative(#[from] SpeculativeError),
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
}

/// A model directory (config, weights, tokenizer) that cannot be loaded.
#[derive(Debug, Error)]
pub enum LoadError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: missing required field `{field}`")]
    MissingField { path: PathBuf, field: &'static str },
    #[error("{path}: field `{field}` has an invalid value {value}")]
    InvalidField {
        path: PathBuf,
        field: &'static str,
        value: String,
    },
    #[error("{path}: hidden size {hidden_size} is not divisible by {num_heads} attention heads")]
    HeadsDoNotDivideHidden {
        path: PathBuf,
        hidden_size: usize,
        num_heads: usize,
    },
    #[error("{path}: {num_heads} attention heads are not divisible into {num_kv_heads} key/value groups")]
    KvHeadsDoNotDivideHeads {
        path: PathBuf,
        num_heads: usize,
        num_kv_heads: usize,
    },
    #[error(
        "{path}: unknown rope scaling type `{rope_type}` (known: default, linear, dynamic, yarn)"
    )]
    UnknownRopeType { path: PathBuf, rope_type: String },
    #[error("{path}: this configuration is not supported: {feature}")]
    Unsupported {
        path: PathBuf,
        feature: &'static str,
    },
    #[error("{dir}: no weights (neither model.safetensors nor model.safetensors.index.json)")]
    NoWeights { dir: PathBuf },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("{index}: points tensor `{tensor}` at `{file}`, which does not exist")]
    IndexMissingFile {
        index: PathBuf,
        tensor: String,
        file: String,
    },
    #[error("{path}: tensor `{tensor}` is missing")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: unexpected tensor `{tensor}` (not part of this Falcon layout)")]
    UnexpectedTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor `{tensor}` has shape {found:?}, expected {expected:?}")]
    TensorShape {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor `{tensor}` has dtype {dtype}; supported: F32, BF16, F16")]
    TensorDtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{path}: cannot load tokenizer: {source}")]
    Tokenizer {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{path}: tensor `{tensor}` cannot be quantized: {source}")]
    Quantize {
        path: PathBuf,
        tensor: String,
        #[source]
        source: QuantError,
    },
    #[error("{path}: the checkpoint stores {stored} weights; they cannot be loaded as {asked}")]
    StoredWeights {
        path: PathBuf,
        stored: WeightFormat,
        asked: WeightFormat,
    },
    #[error("cannot hold weights as {format}: {source}")]
    WeightFormat {
        format: WeightFormat,
        #[source]
        source: QuantError,
    },
    #[error("layer range {start}..{end} is not within the model's {num_layers} layers")]
    LayerRange {
        start: usize,
        end: usize,
        num_layers: usize,
    },
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// The paged KV cache refused an operation.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum KvError {
    #[error("KV cache full: {needed} blocks needed, {free} free of {total}")]
    OutOfBlocks {
        needed: usize,
        free: usize,
        total: usize,
    },
    #[error("sequence {seq} is unknown to the KV cache")]
    UnknownSequence { seq: u64 },
    #[error("sequence {seq} already exists in the KV cache")]
    DuplicateSequence { seq: u64 },
    #[error("cannot truncate sequence {seq} to {len}: it holds only {cached} tokens")]
    TruncateBeyondEnd { seq: u64, len: usize, cached: usize },
    #[error("position {position} is beyond the model's cache capacity of {capacity} tokens")]
    ContextTooLong { position: usize, capacity: usize },
}

/// A forward pass that was asked for something impossible.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ForwardError {
    #[error("empty batch: no tokens to run")]
    EmptyBatch,
    #[error("token id {id} is outside the vocabulary of {vocab_size}")]
    TokenOutOfVocab { id: u32, vocab_size: usize },
    #[error("block table covers {covered} positions, the chunk needs {needed}")]
    BlockTableTooShort { covered: usize, needed: usize },
    #[error("this shard has no {part}: it does not hold the first/last layers")]
    NotInShard { part: &'static str },
    #[error("hidden state has {found} rows, expected {expected}")]
    HiddenRows { expected: usize, found: usize },
    #[error("{wants} output requests for a step of {chunks} chunks")]
    WantsPerChunk { wants: usize, chunks: usize },
    /// A model answered a chunk with another kind of output than the one asked for, or
    /// with no rows: a backend bug, reported rather than trusted.
    #[error("asked for {wanted} rows, the model answered with {got}")]
    UnexpectedOutput {
        wanted: &'static str,
        got: &'static str,
    },
}

/// A compute backend failed (device errors, missing libraries).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BackendError {
    #[error("backend `{backend}` is not available: {reason}")]
    Unavailable {
        backend: &'static str,
        reason: String,
    },
    #[error("device error in {op}: {message}")]
    Device { op: &'static str, message: String },
    #[error("out of device memory: {requested} bytes requested")]
    OutOfMemory { requested: usize },
    #[error("backend `{backend}` cannot hold weights as {format}")]
    WeightFormat {
        backend: &'static str,
        format: WeightFormat,
    },
}

/// Tokenizer encode/decode failures.
#[derive(Debug, Error)]
pub enum TokenizerError {
    #[error("cannot encode text: {source}")]
    Encode {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot decode ids: {source}")]
    Decode {
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The engine's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
