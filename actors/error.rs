//! The runtime's error type: what a request or the builder can fail with.

use thiserror::Error;

use falconer_engine::error::{
    BackendError, ChatError, KvError, LoadError, SamplingError, TokenizerError,
};

/// Why the runtime refused to start, or why one request failed.
#[derive(Debug, Error, Clone)]
pub enum RuntimeError {
    /// A model directory could not be loaded (message from the engine's `LoadError`).
    #[error("cannot load {what}: {message}")]
    Load { what: &'static str, message: String },
    #[error("draft vocabulary ({draft}) differs from the target's ({target}): speculative decoding needs one tokenizer")]
    VocabularyMismatch { target: usize, draft: usize },
    #[error("the runtime was built without a target model")]
    NoTarget,
    #[error("invalid option {option}: {reason}")]
    InvalidOption {
        option: &'static str,
        reason: &'static str,
    },
    #[error("shards: {requested} requested, the model has {layers} layers")]
    TooManyShards { requested: usize, layers: usize },
    /// The compute backend could not start (no GPU, missing CUDA libraries, ...).
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Kv(#[from] KvError),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error(transparent)]
    Chat(#[from] ChatError),
    #[error("tokenizer: {message}")]
    Tokenizer { message: String },
    #[error("empty prompt")]
    EmptyPrompt,
    #[error("the model failed on this request: {message}")]
    Model { message: String },
    #[error("the prefix was dropped before it was cached")]
    PrefixDropped,
    #[error("the runtime is shut down")]
    ShutDown,
    #[error("cannot start actor {actor}: {message}")]
    Spawn {
        actor: &'static str,
        message: String,
    },
}

impl RuntimeError {
    pub(crate) fn load(what: &'static str, e: LoadError) -> Self {
        RuntimeError::Load {
            what,
            message: e.to_string(),
        }
    }

    pub(crate) fn model(e: impl std::fmt::Display) -> Self {
        RuntimeError::Model {
            message: e.to_string(),
        }
    }
}

impl From<TokenizerError> for RuntimeError {
    fn from(e: TokenizerError) -> Self {
        RuntimeError::Tokenizer {
            message: e.to_string(),
        }
    }
}
