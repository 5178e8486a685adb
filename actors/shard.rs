//! TargetShard: owns a contiguous range of the target's layers and their KV memory.
//!
//! A forward job enters shard 0 (which embeds), each shard runs its layers on a
//! blocking thread (never on a tokio worker) and hands the hidden state to the next
//! shard with the caller's reply port; the last shard answers each chunk as it asked:
//! with its greedy tokens or its sampling distributions (computed where the logits are,
//! on the GPU, so that logits never cross to the host), or with raw logits.
//! Split or not, the arithmetic is the same, so 2+ shards give exactly the unsplit
//! logits.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Instant;

use falconer_engine::sampling::SamplingParams;
use falconer_engine::{Backend, Falcon, RowsOut, RowsWanted, SeqChunk};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::error::RuntimeError;
use crate::metrics as m;

/// New tokens of one sequence, with where they go in the KV cache.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkSpec {
    pub tokens: Vec<u32>,
    pub start_pos: usize,
    pub block_table: Vec<u32>,
    pub prompt_len: usize,
    pub all_logits: bool,
    /// What the last shard returns for the chunk's logit rows.
    pub want: ChunkWant,
}

/// What a chunk needs from its logit rows (the owned form of [`RowsWanted`]; the
/// runtime never needs raw logits).
#[derive(Debug, Clone, PartialEq)]
pub enum ChunkWant {
    /// Each row's argmax (greedy without a repetition penalty).
    Greedy,
    /// Each row's sampling distribution (greedy token for greedy `params`); the
    /// repetition penalty sees `history` (the tokens before the chunk) and the chunk's
    /// tokens up to the row.
    Warped {
        params: SamplingParams,
        history: Vec<u32>,
    },
}

impl ChunkWant {
    /// The want of a session's chunk: greedy tokens without a repetition penalty, else
    /// the rows warped where the logits are (distributions when sampling, penalised
    /// greedy tokens when not). `history` is only kept when the penalty needs it.
    pub fn for_params(params: &SamplingParams, history: &[u32]) -> Self {
        if params.argmax_only() {
            ChunkWant::Greedy
        } else {
            ChunkWant::Warped {
                params: *params,
                history: if params.repetition_penalty == 1.0 {
                    Vec::new()
                } else {
                    history.to_vec()
                },
            }
        }
    }

    fn as_wanted(&self) -> RowsWanted<'_> {
        match self {
            ChunkWant::Greedy => RowsWanted::Greedy,
            ChunkWant::Warped { params, history } => RowsWanted::Warped { params, history },
        }
    }
}

impl ChunkSpec {
    pub(crate) fn as_chunk(&self) -> SeqChunk<'_> {
        SeqChunk {
            tokens: &self.tokens,
            start_pos: self.start_pos,
            block_table: &self.block_table,
            prompt_len: self.prompt_len,
            all_logits: self.all_logits,
        }
    }
}

/// One batched forward pass travelling through the shards.
#[derive(Debug)]
pub struct ForwardJob<B: Backend> {
    pub chunks: Arc<Vec<ChunkSpec>>,
    /// Copy-on-write block copies every shard applies to its layers first.
    pub copies: Arc<Vec<(u32, u32)>>,
    /// `None` entering shard 0; the previous shard's output afterwards.
    pub hidden: Option<B::Tensor>,
    pub reply: RpcReplyPort<Result<TargetOutput, RuntimeError>>,
}

/// What the last shard answers: one entry per chunk of the pass, as it asked.
pub type TargetOutput = Vec<RowsOut>;

/// Messages of a target shard.
#[derive(Debug)]
pub enum ShardMsg<B: Backend> {
    Forward(ForwardJob<B>),
}

/// The actor (one per shard).
#[derive(Debug)]
pub struct TargetShard<B>(PhantomData<fn() -> B>);

impl<B> Default for TargetShard<B> {
    fn default() -> Self {
        TargetShard(PhantomData)
    }
}

/// A shard's model and the shard after it.
#[derive(Debug)]
pub struct ShardArgs<B: Backend> {
    pub model: Falcon<B>,
    pub next: Option<ActorRef<ShardMsg<B>>>,
}

#[derive(Debug)]
pub struct ShardState<B: Backend> {
    model: Option<Falcon<B>>,
    next: Option<ActorRef<ShardMsg<B>>>,
}

enum Output<B: Backend> {
    Hidden(B::Tensor),
    Last(TargetOutput),
}

fn run<B: Backend>(
    model: &mut Falcon<B>,
    chunks: &[ChunkSpec],
    copies: &[(u32, u32)],
    hidden: Option<B::Tensor>,
) -> falconer_engine::Result<Output<B>> {
    model.copy_kv_blocks(copies)?;
    // The shard before may run on another device.
    let hidden = hidden
        .map(|h| model.backend().receive_hidden(h))
        .transpose()?;
    let specs: Vec<SeqChunk<'_>> = chunks.iter().map(ChunkSpec::as_chunk).collect();
    let step = model.prepare(&specs)?;
    // The shard's part of the step runs as one unit, which the backend may replay from a
    // recording: its output is the logit rows on the last shard.
    let out = model.run_shard(&step, hidden)?;
    if model.layer_range().end == model.config().num_layers {
        let wants: Vec<RowsWanted<'_>> = chunks.iter().map(|c| c.want.as_wanted()).collect();
        Ok(Output::Last(model.outputs_from(&out, &step, &wants)?))
    } else {
        Ok(Output::Hidden(out))
    }
}

impl<B: Backend> Actor for TargetShard<B> {
    type Msg = ShardMsg<B>;
    type State = ShardState<B>;
    type Arguments = ShardArgs<B>;

    async fn pre_start(
        &self,
        _me: ActorRef<Self::Msg>,
        args: ShardArgs<B>,
    ) -> Result<ShardState<B>, ActorProcessingErr> {
        Ok(ShardState {
            model: Some(args.model),
            next: args.next,
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<Self::Msg>,
        msg: Self::Msg,
        s: &mut ShardState<B>,
    ) -> Result<(), ActorProcessingErr> {
        let ShardMsg::Forward(job) = msg;
        let Some(mut model) = s.model.take() else {
            let _ = job
                .reply
                .send(Err(RuntimeError::model("target shard lost its model")));
            return Err("target shard has no model".into());
        };
        let (chunks, copies, hidden) =
            (Arc::clone(&job.chunks), Arc::clone(&job.copies), job.hidden);
        let started = Instant::now();
        let joined = tokio::task::spawn_blocking(move || {
            let out = run(&mut model, &chunks, &copies, hidden);
            (model, out)
        })
        .await;
        m::step_latency("target_shard", started.elapsed());
        let (model, out) = match joined {
            Ok(x) => x,
            Err(e) => {
                let _ = job.reply.send(Err(RuntimeError::model(format!(
                    "target shard panicked: {e}"
                ))));
                return Err(format!("target shard thread failed: {e}").into());
            }
        };
        s.model = Some(model);
        match out {
            Ok(Output::Last(out)) => {
                let _ = job.reply.send(Ok(out));
            }
            Ok(Output::Hidden(h)) => match &s.next {
                Some(next) => {
                    let fwd = ForwardJob {
                        chunks: job.chunks,
                        copies: job.copies,
                        hidden: Some(h),
                        reply: job.reply,
                    };
                    if let Err(e) = next.cast(ShardMsg::Forward(fwd)) {
                        return Err(format!("next shard unreachable: {e}").into());
                    }
                }
                None => {
                    let _ = job.reply.send(Err(RuntimeError::model(
                        "shard chain ends before the last layer",
                    )));
                }
            },
            Err(e) => {
                let _ = job.reply.send(Err(RuntimeError::model(e)));
            }
        }
        Ok(())
    }
}
