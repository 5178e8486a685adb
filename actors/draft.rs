//! DraftActor: the draft model and its KV memory; proposes k tokens per session by k
//! cheap autoregressive steps, batched over every session that speculates this round.
//!
//! Greedy sessions take the draft's argmax; sampling sessions draw from the draft's
//! warped distribution q (returned with the tokens, for the acceptance rule).

use std::marker::PhantomData;
use std::time::{Duration, Instant};

use falconer_engine::error::ForwardError;
use falconer_engine::sampling::{sample_from_probs, Rng, SamplingParams};
use falconer_engine::{Backend, Falcon, RowsOut, RowsWanted, SeqChunk};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::error::RuntimeError;
use crate::metrics as m;

/// One session's proposal request.
#[derive(Debug, Clone)]
pub struct ProposeItem {
    /// Tokens the draft has not seen yet (catch-up), then it continues.
    pub feed: Vec<u32>,
    pub start_pos: usize,
    pub prompt_len: usize,
    /// Blocks for `start_pos + feed.len() + k - 1` positions.
    pub block_table: Vec<u32>,
    pub k: usize,
    /// `None`: greedy. Otherwise the warping parameters and this round's seed.
    pub sampling: Option<(SamplingParams, u64)>,
}

/// The draft's tokens, and for sampling sessions the distributions they came from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Proposal {
    pub tokens: Vec<u32>,
    pub q: Vec<Vec<f32>>,
}

/// Messages of the draft actor.
#[derive(Debug)]
pub enum DraftMsg {
    Propose {
        items: Vec<ProposeItem>,
        copies: Vec<(u32, u32)>,
        reply: RpcReplyPort<Result<(Vec<Proposal>, Duration), RuntimeError>>,
    },
}

/// The actor.
#[derive(Debug)]
pub struct DraftActor<B>(PhantomData<fn() -> B>);

impl<B> Default for DraftActor<B> {
    fn default() -> Self {
        DraftActor(PhantomData)
    }
}

/// Start-up arguments: the model and, for fault-injection tests, a proposal count
/// after which the actor panics.
#[derive(Debug)]
pub struct DraftArgs<B: Backend> {
    pub model: Falcon<B>,
    pub panic_after: Option<usize>,
}

#[derive(Debug)]
pub struct DraftState<B: Backend> {
    model: Option<Falcon<B>>,
    panic_after: Option<usize>,
    served: usize,
}

/// Runs the k draft steps; returns proposals and the time of one draft step
/// (averaged), which the scheduler uses as the cost ratio's numerator.
fn propose<B: Backend>(
    model: &mut Falcon<B>,
    items: &[ProposeItem],
    copies: &[(u32, u32)],
) -> falconer_engine::Result<(Vec<Proposal>, Duration)> {
    model.copy_kv_blocks(copies)?;
    let mut out: Vec<Proposal> = items.iter().map(|_| Proposal::default()).collect();
    let mut rngs: Vec<Option<Rng>> = items
        .iter()
        .map(|i| i.sampling.map(|(_, seed)| Rng::new(seed)))
        .collect();
    // The draft's q ignores the repetition penalty (it sees no history).
    let warp: Vec<Option<SamplingParams>> = items
        .iter()
        .map(|i| {
            i.sampling.map(|(params, _)| SamplingParams {
                repetition_penalty: 1.0,
                ..params
            })
        })
        .collect();
    let max_k = items.iter().map(|i| i.k).max().unwrap_or(0);
    let started = Instant::now();
    for j in 0..max_k {
        let active: Vec<usize> = (0..items.len()).filter(|&i| items[i].k > j).collect();
        let feeds: Vec<Vec<u32>> = active
            .iter()
            .map(|&i| {
                if j == 0 {
                    items[i].feed.clone()
                } else {
                    vec![out[i].tokens[j - 1]]
                }
            })
            .collect();
        let chunks: Vec<SeqChunk<'_>> = active
            .iter()
            .zip(&feeds)
            .map(|(&i, f)| SeqChunk {
                tokens: f,
                start_pos: if j == 0 {
                    items[i].start_pos
                } else {
                    items[i].start_pos + items[i].feed.len() + j - 1
                },
                block_table: &items[i].block_table,
                prompt_len: items[i].prompt_len,
                all_logits: false,
            })
            .collect();
        // Greedy sessions take the argmax where the logits are (a draft that saw only NaN
        // and -inf proposes 0, as the host's argmax does; the target rejects it anyway),
        // sampling ones a distribution warped there.
        let wants: Vec<RowsWanted<'_>> = active
            .iter()
            .map(|&i| match &warp[i] {
                Some(params) => RowsWanted::Warped {
                    params,
                    history: &[],
                },
                None => RowsWanted::Greedy,
            })
            .collect();
        let outs = model.forward_outputs(&chunks, &wants)?;
        for (&i, o) in active.iter().zip(outs) {
            // Each output answers its want in kind, and only sampling sessions have an rng.
            let unexpected = |got| ForwardError::UnexpectedOutput {
                wanted: if warp[i].is_some() {
                    "warped"
                } else {
                    "greedy"
                },
                got,
            };
            let token = match (o, &mut rngs[i]) {
                (RowsOut::Warped(rows), Some(rng)) => {
                    let q = rows.into_iter().last().ok_or(unexpected("no rows"))??;
                    let t = sample_from_probs(&q, rng);
                    out[i].q.push(q);
                    t
                }
                (RowsOut::Greedy(t), _) => t.last().copied().flatten().unwrap_or(0),
                (RowsOut::Warped(_), None) => return Err(unexpected("warped").into()),
                (RowsOut::Logits(_), _) => return Err(unexpected("logits").into()),
            };
            out[i].tokens.push(token);
        }
    }
    let per_step = if max_k > 0 {
        started.elapsed() / max_k as u32
    } else {
        Duration::ZERO
    };
    Ok((out, per_step))
}

impl<B: Backend> Actor for DraftActor<B> {
    type Msg = DraftMsg;
    type State = DraftState<B>;
    type Arguments = DraftArgs<B>;

    async fn pre_start(
        &self,
        _me: ActorRef<DraftMsg>,
        args: DraftArgs<B>,
    ) -> Result<DraftState<B>, ActorProcessingErr> {
        Ok(DraftState {
            model: Some(args.model),
            panic_after: args.panic_after,
            served: 0,
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<DraftMsg>,
        msg: DraftMsg,
        s: &mut DraftState<B>,
    ) -> Result<(), ActorProcessingErr> {
        let DraftMsg::Propose {
            items,
            copies,
            reply,
        } = msg;
        s.served += 1;
        let inject = s.panic_after.is_some_and(|n| s.served > n);
        let Some(mut model) = s.model.take() else {
            return Err("draft actor has no model".into());
        };
        let started = Instant::now();
        let joined = tokio::task::spawn_blocking(move || {
            if inject {
                panic!("injected draft failure (test hook)");
            }
            let out = propose(&mut model, &items, &copies);
            (model, out)
        })
        .await;
        m::step_latency("draft", started.elapsed());
        match joined {
            Ok((model, out)) => {
                s.model = Some(model);
                let _ = reply.send(out.map_err(RuntimeError::model));
                Ok(())
            }
            // The model is gone with the panicking thread: fail, so the supervisor
            // restarts this actor with a fresh copy.
            Err(e) => {
                let _ = reply.send(Err(RuntimeError::model(format!("draft failed: {e}"))));
                Err(format!("draft thread failed: {e}").into())
            }
        }
    }
}
