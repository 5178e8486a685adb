//! [`RuntimeBuilder`]: which models, how many shards, which draft policy, how much KV.

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use falconer_engine::{
    Backend, CpuBackend, Falcon, LoadOptions, ModelDir, ProgressFn, Tokenizer, WeightFormat,
};
use ractor::Actor;

use super::runtime::{Inner, ModelInfo, Runtime};
use crate::error::RuntimeError;
use crate::kv_manager::{KvArgs, KvCacheManager};
use crate::sampler::SamplerActor;
use crate::scheduler::{DraftPolicy, Scheduler, SchedulerArgs, SchedulerConfig};
use crate::shard::{ShardArgs, TargetShard};
use crate::supervisor::{DraftFactory, Supervisor, SupervisorArgs, SupervisorMsg};

/// Where the models run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// The CPU reference backend (f32).
    #[default]
    Cpu,
    /// A CUDA GPU by ordinal (needs the `cuda` feature).
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = RuntimeError;

    /// `cpu`, `cuda` (GPU 0) or `cuda:N`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = RuntimeError::InvalidOption {
            option: "device",
            reason: "expected cpu, cuda or cuda:N",
        };
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or(bad),
        }
    }
}

/// Configures and starts a [`Runtime`].
#[derive(Debug, Clone)]
pub struct RuntimeBuilder {
    target: Option<PathBuf>,
    draft: Option<PathBuf>,
    shards: usize,
    policy: DraftPolicy,
    kv_blocks: usize,
    draft_kv_blocks: usize,
    block_size: usize,
    device: Device,
    max_speculative_batch: usize,
    lookup_ngram: (usize, usize),
    draft_panic_after: Option<usize>,
    progress: Option<ProgressFn>,
    weights: WeightFormat,
    draft_weights: WeightFormat,
    shard_devices: Vec<Device>,
}

impl Default for RuntimeBuilder {
    fn default() -> Self {
        RuntimeBuilder {
            target: None,
            draft: None,
            shards: 1,
            policy: DraftPolicy::default(),
            kv_blocks: 1024,
            draft_kv_blocks: 1024,
            block_size: 16,
            device: Device::Cpu,
            max_speculative_batch: 16,
            lookup_ngram: (3, 1),
            draft_panic_after: None,
            progress: Some(ProgressFn::stderr_bar("loading weights", 1 << 30)),
            weights: WeightFormat::Checkpoint,
            draft_weights: WeightFormat::Checkpoint,
            shard_devices: Vec::new(),
        }
    }
}

impl RuntimeBuilder {
    /// Weight-upload progress: by default a bar on stderr for loads of 1 GB or more;
    /// `None` for silence, or any callback.
    pub fn load_progress(mut self, progress: Option<ProgressFn>) -> Self {
        self.progress = progress;
        self
    }

    /// The target model directory (HF layout: config.json, safetensors, tokenizer.json).
    pub fn target(mut self, dir: impl Into<PathBuf>) -> Self {
        self.target = Some(dir.into());
        self
    }

    /// A draft model directory; it must share the target's vocabulary.
    pub fn draft(mut self, dir: impl Into<PathBuf>) -> Self {
        self.draft = Some(dir.into());
        self
    }

    /// How the target's decoder-layer weights are held: as in the checkpoint (the
    /// default), or quantized on load to 8 or 4 bits (`falconer_engine::quant`).
    /// Speculative output stays exactly the (quantized) target's.
    pub fn weights(mut self, format: WeightFormat) -> Self {
        self.weights = format;
        self
    }

    /// As [`RuntimeBuilder::weights`], for the draft model.
    pub fn draft_weights(mut self, format: WeightFormat) -> Self {
        self.draft_weights = format;
        self
    }

    /// Places the target's pipeline shards on these devices, one shard each in layer
    /// order (this sets the shard count), so that a model larger than one GPU runs over
    /// several; the draft runs on the first. All must be CUDA devices, or all the CPU.
    /// A hidden state crosses to the next GPU through the host after each shard.
    /// Without this, every shard runs on [`RuntimeBuilder::device`].
    pub fn shard_devices(mut self, devices: impl IntoIterator<Item = Device>) -> Self {
        self.shard_devices = devices.into_iter().collect();
        self
    }

    /// Splits the target's layers over `n` shard actors.
    pub fn shards(mut self, n: usize) -> Self {
        self.shards = n;
        self
    }

    pub fn draft_policy(mut self, p: DraftPolicy) -> Self {
        self.policy = p;
        self
    }

    /// KV budget: blocks of `block_size` positions for the target and for the draft.
    pub fn kv_blocks(mut self, target: usize, draft: usize) -> Self {
        self.kv_blocks = target;
        self.draft_kv_blocks = draft;
        self
    }

    pub fn block_size(mut self, n: usize) -> Self {
        self.block_size = n;
        self
    }

    pub fn device(mut self, d: Device) -> Self {
        self.device = d;
        self
    }

    /// Above this many concurrent sessions, rounds run without speculation.
    pub fn max_speculative_batch(mut self, n: usize) -> Self {
        self.max_speculative_batch = n;
        self
    }

    /// Test hook: the first draft actor panics after `n` proposals.
    #[doc(hidden)]
    pub fn inject_draft_panic_after(mut self, n: usize) -> Self {
        self.draft_panic_after = Some(n);
        self
    }

    /// Loads the models and starts the actors on the current tokio runtime.
    pub async fn build(self) -> Result<Runtime, RuntimeError> {
        if self.block_size == 0 || self.kv_blocks == 0 {
            return Err(RuntimeError::InvalidOption {
                option: "kv_blocks/block_size",
                reason: "must be positive",
            });
        }
        let devices = self.devices();
        if devices.iter().all(|d| *d == Device::Cpu) {
            let cpu = Arc::new(CpuBackend::new());
            return self.start(vec![cpu; devices.len()], devices).await;
        }
        if devices.contains(&Device::Cpu) {
            return Err(RuntimeError::InvalidOption {
                option: "shard_devices",
                reason: "all shards must be on the CPU or all on CUDA devices",
            });
        }
        self.start_cuda(devices).await
    }

    /// The device of each shard.
    fn devices(&self) -> Vec<Device> {
        if self.shard_devices.is_empty() {
            vec![self.device; self.shards.max(1)]
        } else {
            self.shard_devices.clone()
        }
    }

    #[cfg(feature = "cuda")]
    async fn start_cuda(self, devices: Vec<Device>) -> Result<Runtime, RuntimeError> {
        use falconer_engine::backend::cuda::CudaBackend;
        // One backend per GPU, shared by the shards placed on it.
        let mut opened: Vec<(usize, Arc<CudaBackend>)> = Vec::new();
        let mut backends = Vec::with_capacity(devices.len());
        for d in &devices {
            let Device::Cuda(ordinal) = *d else {
                continue;
            };
            let b = match opened.iter().find(|(o, _)| *o == ordinal) {
                Some((_, b)) => Arc::clone(b),
                None => {
                    let b = Arc::new(CudaBackend::new(ordinal)?);
                    // Any request may speculate (a draft, prompt lookup): products whose
                    // rows do not depend on each other keep greedy speculation exactly
                    // equal to plain greedy decoding.
                    b.gpu().set_row_invariant(true);
                    opened.push((ordinal, Arc::clone(&b)));
                    b
                }
            };
            backends.push(b);
        }
        self.start(backends, devices).await
    }

    #[cfg(not(feature = "cuda"))]
    async fn start_cuda(self, _devices: Vec<Device>) -> Result<Runtime, RuntimeError> {
        Err(RuntimeError::InvalidOption {
            option: "device",
            reason: "falconer was built without the `cuda` feature",
        })
    }

    /// Starts the runtime with shard `i` of the target on `backends[i]` (at least one)
    /// and the draft on the first.
    async fn start<B: Backend>(
        self,
        backends: Vec<Arc<B>>,
        devices: Vec<Device>,
    ) -> Result<Runtime, RuntimeError> {
        let backend = backends
            .first()
            .cloned()
            .ok_or(RuntimeError::InvalidOption {
                option: "shard_devices",
                reason: "at least one device is needed",
            })?;
        let target = ModelDir::new(self.target.clone().ok_or(RuntimeError::NoTarget)?);
        let cfg = target
            .config()
            .map_err(|e| RuntimeError::load("target config", e))?;
        let tokenizer = Arc::new(
            Tokenizer::from_file(&target.tokenizer_path())
                .map_err(|e| RuntimeError::load("target tokenizer", e))?,
        );
        let gen = target
            .generation_defaults()
            .map_err(|e| RuntimeError::load("generation config", e))?;
        let draft = self.draft.clone().map(ModelDir::new);
        if let Some(d) = &draft {
            check_vocab(&cfg, &tokenizer, d)?;
        }
        let n = backends.len();
        if n > cfg.num_layers {
            return Err(RuntimeError::TooManyShards {
                requested: n,
                layers: cfg.num_layers,
            });
        }
        let ranges = split_layers(cfg.num_layers, n);
        let mut models = Vec::with_capacity(n);
        for (r, b) in ranges.into_iter().zip(&backends) {
            let (dir, b) = (target.clone(), Arc::clone(b));
            let opts = LoadOptions {
                layers: Some(r),
                kv_blocks: self.kv_blocks,
                block_size: self.block_size,
                progress: self.progress.clone(),
                weights: self.weights,
            };
            let m = tokio::task::spawn_blocking(move || Falcon::load(&dir, b, &opts))
                .await
                .map_err(RuntimeError::model)?
                .map_err(|e| RuntimeError::load("target weights", e))?;
            models.push(m);
        }
        let weight_bytes = models.iter().map(Falcon::weight_bytes).sum();
        let target_weights = models.first().map_or(self.weights, Falcon::weight_format);
        let (mut draft_weight_bytes, mut draft_weights) = (0, self.draft_weights);
        let mut cells = Vec::new();
        let mut next = None;
        let mut shards = Vec::with_capacity(n);
        for model in models.into_iter().rev() {
            let (r, _) = Actor::spawn(
                None,
                TargetShard::<B>::default(),
                ShardArgs {
                    model,
                    next: next.clone(),
                },
            )
            .await
            .map_err(spawn("target shard"))?;
            cells.push(r.get_cell());
            next = Some(r.clone());
            shards.push(r);
        }
        shards.reverse();

        let (kv, _) = Actor::spawn(
            None,
            KvCacheManager,
            KvArgs {
                target: (self.kv_blocks, self.block_size),
                draft: draft
                    .as_ref()
                    .map(|_| (self.draft_kv_blocks, self.block_size)),
            },
        )
        .await
        .map_err(spawn("kv cache manager"))?;
        cells.push(kv.get_cell());
        let (sampler, _) = Actor::spawn(None, SamplerActor, ())
            .await
            .map_err(spawn("sampler"))?;
        cells.push(sampler.get_cell());

        let mut supervisor = None;
        let mut draft_ref = None;
        if let Some(d) = draft {
            let opts = LoadOptions {
                layers: None,
                kv_blocks: self.draft_kv_blocks,
                block_size: self.block_size,
                progress: self.progress.clone(),
                weights: self.draft_weights,
            };
            let b = Arc::clone(&backend);
            let factory: DraftFactory<B> =
                Arc::new(move || Falcon::load(&d, Arc::clone(&b), &opts));
            let f = Arc::clone(&factory);
            let first = tokio::task::spawn_blocking(move || f())
                .await
                .map_err(RuntimeError::model)?
                .map_err(|e| RuntimeError::load("draft weights", e))?;
            (draft_weight_bytes, draft_weights) = (first.weight_bytes(), first.weight_format());
            let args = SupervisorArgs {
                first,
                factory,
                panic_after: self.draft_panic_after,
                max_restarts: 8,
            };
            let (sup, _) = Actor::spawn(None, Supervisor::<B>::default(), args)
                .await
                .map_err(spawn("supervisor"))?;
            draft_ref = crate::util::ask(&sup, SupervisorMsg::Draft).await?;
            cells.push(sup.get_cell());
            supervisor = Some(sup);
        }
        let default_eos = if gen.eos_token_ids.is_empty() {
            cfg.eos_token_ids.clone()
        } else {
            gen.eos_token_ids.clone()
        };
        let config = SchedulerConfig {
            policy: self.policy.clone(),
            default_eos: default_eos.clone(),
            max_speculative_batch: self.max_speculative_batch,
            lookup_ngram: self.lookup_ngram,
        };
        let (scheduler, _) = Actor::spawn(
            None,
            Scheduler::<B>::default(),
            SchedulerArgs {
                shards,
                draft: draft_ref.clone(),
                kv,
                sampler,
                tokenizer: Arc::clone(&tokenizer),
                config,
            },
        )
        .await
        .map_err(spawn("scheduler"))?;
        if let Some(sup) = &supervisor {
            let _ = sup.cast(SupervisorMsg::SetScheduler(scheduler.clone()));
        }
        cells.push(scheduler.get_cell());
        let format = falconer_engine::chat::ChatFormat::detect(
            &target.name(),
            target.chat_template().as_deref(),
        );
        Ok(Runtime::from_inner(Inner::new(
            scheduler,
            tokenizer,
            format,
            default_eos,
            cells,
            ModelInfo {
                target: cfg,
                has_draft: draft_ref.is_some(),
                shards: n,
                backend: backend.name(),
                weights: target_weights,
                draft_weights,
                weight_bytes,
                draft_weight_bytes,
                devices,
            },
        )))
    }
}

fn spawn(actor: &'static str) -> impl Fn(ractor::SpawnErr) -> RuntimeError {
    move |e| RuntimeError::Spawn {
        actor,
        message: e.to_string(),
    }
}

/// Contiguous, as-even-as-possible layer ranges.
pub fn split_layers(layers: usize, n: usize) -> Vec<Range<usize>> {
    let n = n.clamp(1, layers.max(1));
    (0..n)
        .map(|i| (i * layers / n)..((i + 1) * layers / n))
        .collect()
}

/// A draft must share the target's vocabulary: same size in config, and when it
/// ships its own tokenizer, the same tokens.
fn check_vocab(
    cfg: &falconer_engine::FalconConfig,
    tok: &Tokenizer,
    draft: &ModelDir,
) -> Result<(), RuntimeError> {
    let dcfg = draft
        .config()
        .map_err(|e| RuntimeError::load("draft config", e))?;
    if dcfg.vocab_size != cfg.vocab_size {
        return Err(RuntimeError::VocabularyMismatch {
            target: cfg.vocab_size,
            draft: dcfg.vocab_size,
        });
    }
    let path = draft.tokenizer_path();
    if path.exists() {
        let dtok =
            Tokenizer::from_file(&path).map_err(|e| RuntimeError::load("draft tokenizer", e))?;
        let probe = "def f(x):\n    return {'a': x} # Falcon: héllo";
        if dtok.vocab_size() != tok.vocab_size()
            || dtok.encode(probe).ok() != tok.encode(probe).ok()
        {
            return Err(RuntimeError::VocabularyMismatch {
                target: tok.vocab_size(),
                draft: dtok.vocab_size(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::split_layers;

    #[test]
    fn layers_split_contiguously_and_completely() {
        assert_eq!(split_layers(10, 3), vec![0..3, 3..6, 6..10]);
        assert_eq!(split_layers(2, 2), vec![0..1, 1..2]);
        assert_eq!(split_layers(5, 1), vec![0..5]);
    }
}
