//! [`Runtime`]: the handle a host keeps; cheap to clone, shuts the actors down when
//! the last clone is dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use falconer_engine::chat::ChatFormat;
use falconer_engine::sampling::StopCriteria;
use falconer_engine::{FalconConfig, Tokenizer, WeightFormat};
use ractor::{ActorCell, ActorRef};
use tokio::sync::mpsc;

use super::builder::{Device, RuntimeBuilder};
use super::chat::ChatSession;
use super::request::{GenerateRequest, Prompt};
use super::stream::GenerationStream;
use crate::error::RuntimeError;
use crate::scheduler::{PreparedRequest, SchedulerMsg, SchedulerStats};
use crate::util::ask;

/// What the runtime is running.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub target: FalconConfig,
    pub has_draft: bool,
    pub shards: usize,
    pub backend: &'static str,
    /// How the target's and the draft's layer weights are held (as asked, or as a
    /// quantized checkpoint stores them).
    pub weights: WeightFormat,
    pub draft_weights: WeightFormat,
    /// Backend memory the target's weights (all shards) and the draft's hold.
    pub weight_bytes: usize,
    pub draft_weight_bytes: usize,
    /// The device of each target shard, in layer order (the draft runs on the first).
    pub devices: Vec<Device>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    scheduler: ActorRef<SchedulerMsg>,
    tokenizer: Arc<Tokenizer>,
    chat_format: ChatFormat,
    default_eos: Vec<u32>,
    next_id: AtomicU64,
    cells: Vec<ActorCell>,
    info: ModelInfo,
}

impl Inner {
    pub(crate) fn new(
        scheduler: ActorRef<SchedulerMsg>,
        tokenizer: Arc<Tokenizer>,
        chat_format: ChatFormat,
        default_eos: Vec<u32>,
        cells: Vec<ActorCell>,
        info: ModelInfo,
    ) -> Self {
        Inner {
            scheduler,
            tokenizer,
            chat_format,
            default_eos,
            next_id: AtomicU64::new(1),
            cells,
            info,
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for c in &self.cells {
            c.stop(None);
        }
    }
}

/// A running falconer: target shards, draft, KV manager, sampler and scheduler actors.
#[derive(Debug, Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl Runtime {
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder::default()
    }

    pub(crate) fn from_inner(inner: Inner) -> Self {
        Runtime {
            inner: Arc::new(inner),
        }
    }

    pub fn info(&self) -> &ModelInfo {
        &self.inner.info
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner.tokenizer
    }

    /// The chat format chosen for the target (from its tokenizer config or name).
    pub fn chat_format(&self) -> ChatFormat {
        self.inner.chat_format
    }

    /// Starts a request; tokens arrive on the returned stream.
    pub async fn generate(&self, req: GenerateRequest) -> Result<GenerationStream, RuntimeError> {
        req.sampling.validate()?;
        let prompt = match req.prompt {
            Prompt::Text(t) => self.inner.tokenizer.encode(&t)?,
            Prompt::Ids(ids) => ids,
        };
        if prompt.is_empty() {
            return Err(RuntimeError::EmptyPrompt);
        }
        let vocab = self.inner.info.target.vocab_size;
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(RuntimeError::Model {
                message: format!("prompt token {bad} is outside the vocabulary of {vocab}"),
            });
        }
        let stop = StopCriteria {
            eos_ids: req
                .eos_token_ids
                .unwrap_or_else(|| self.inner.default_eos.clone()),
            stop_strings: req.stop,
            max_new_tokens: req.max_new_tokens,
        };
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(req.max_new_tokens.saturating_add(4).min(1 << 16));
        let prepared = PreparedRequest {
            prompt,
            sampling: req.sampling,
            stop,
            speculation: req.speculation,
            draft_len: req.draft_len,
        };
        self.inner
            .scheduler
            .cast(SchedulerMsg::Submit {
                id,
                req: Box::new(prepared),
                tx,
            })
            .map_err(|_| RuntimeError::ShutDown)?;
        Ok(GenerationStream::new(id, rx, self.inner.scheduler.clone()))
    }

    /// Cancels a request by id (dropping its stream does the same).
    pub fn cancel(&self, id: u64) {
        let _ = self.inner.scheduler.cast(SchedulerMsg::Cancel(id));
    }

    /// Prefills `text` once; later prompts starting with it share its KV blocks
    /// (copy-on-write), e.g. one system prompt for many sessions.
    pub async fn cache_prefix(&self, text: &str) -> Result<(), RuntimeError> {
        let ids = self.inner.tokenizer.encode(text)?;
        ask(&self.inner.scheduler, |reply| SchedulerMsg::CachePrefix {
            ids,
            reply,
        })
        .await?
    }

    /// Live figures: sessions, queue, KV blocks, draft health.
    pub async fn stats(&self) -> Result<SchedulerStats, RuntimeError> {
        ask(&self.inner.scheduler, SchedulerMsg::Stats).await
    }

    /// A multi-turn chat in the model's chat format.
    pub fn chat(&self) -> ChatSession {
        ChatSession::new(self.clone(), self.inner.chat_format)
    }
}
