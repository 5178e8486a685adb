//! SamplerActor: each session's sampling parameters and seeded RNG, and the
//! acceptance rule. A thin shell around `falconer_engine::sampling` and
//! `falconer_engine::speculative`.

use std::collections::HashMap;

use falconer_engine::sampling::{
    apply_repetition_penalty, sample_from_probs, sample_token, warp_probs, Rng, SamplingError,
    SamplingParams,
};
use falconer_engine::speculative::{accept_greedy, accept_greedy_tokens, accept_sampling, Verdict};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::error::RuntimeError;

/// One session's decision this round.
#[derive(Debug, Clone)]
pub struct DecideItem {
    pub session: u64,
    /// Draft tokens (empty for a plain round).
    pub drafts: Vec<u32>,
    /// The draft's warped distributions (sampling sessions with a draft).
    pub q: Vec<Vec<f32>>,
    /// The target's `drafts.len() + 1` rows.
    pub target: TargetRows,
    /// Tokens before the first row's prediction (for the repetition penalty).
    pub context: Vec<u32>,
}

/// The target's rows for one decision.
#[derive(Debug, Clone)]
pub enum TargetRows {
    Logits(Vec<Vec<f32>>),
    /// Each row's greedy token, taken on the device after the session's repetition
    /// penalty (`None`: no usable logit); only for greedy sessions.
    Greedy(Vec<Option<u32>>),
    /// Each row's sampling distribution, penalised and warped where the logits are (row
    /// i saw the context plus the first i drafts); only for sampling sessions.
    Probs(Vec<Result<Vec<f32>, SamplingError>>),
}

/// Messages of the sampler.
#[derive(Debug)]
pub enum SamplerMsg {
    Register {
        session: u64,
        params: SamplingParams,
    },
    Unregister {
        session: u64,
    },
    Decide {
        items: Vec<DecideItem>,
        reply: RpcReplyPort<Vec<Result<Verdict, RuntimeError>>>,
    },
}

/// The actor.
#[derive(Debug, Default)]
pub struct SamplerActor;

#[derive(Debug, Default)]
pub struct SamplerState {
    sessions: HashMap<u64, (SamplingParams, Rng)>,
}

/// The target's rows with the repetition penalty applied as plain decoding would
/// (row i sees the context plus the first i drafts).
fn penalised(item: &DecideItem, rows: &[Vec<f32>], params: &SamplingParams) -> Vec<Vec<f32>> {
    let mut ctx = item.context.clone();
    rows.iter()
        .enumerate()
        .map(|(i, row)| {
            let mut r = row.clone();
            if i > 0 {
                ctx.push(item.drafts[i - 1]);
            }
            if params.repetition_penalty != 1.0 {
                apply_repetition_penalty(&mut r, &ctx, params.repetition_penalty);
            }
            r
        })
        .collect()
}

/// The acceptance rule for one item (pure; the actor only owns the RNG).
pub fn decide(
    item: &DecideItem,
    params: &SamplingParams,
    rng: &mut Rng,
) -> Result<Verdict, RuntimeError> {
    let rows = match &item.target {
        TargetRows::Logits(rows) => rows,
        TargetRows::Greedy(tokens) => {
            if !params.is_greedy() {
                return Err(RuntimeError::model("greedy tokens for a sampling session"));
            }
            return accept_greedy_tokens(&item.drafts, tokens).map_err(RuntimeError::model);
        }
        TargetRows::Probs(rows) => {
            if params.is_greedy() {
                return Err(RuntimeError::model("distributions for a greedy session"));
            }
            let p = rows
                .iter()
                .map(|r| r.as_ref().map(Vec::as_slice).map_err(|e| *e))
                .collect::<Result<Vec<&[f32]>, SamplingError>>()?;
            return sample_rows(item, &p, rng);
        }
    };
    if item.drafts.is_empty() {
        let row = rows.first().ok_or(RuntimeError::Model {
            message: "no target logits".into(),
        })?;
        let t = sample_token(row, &item.context, params, rng)?;
        return Ok(Verdict {
            accepted: 0,
            next_token: t,
        });
    }
    let rows = penalised(item, rows, params);
    if params.is_greedy() {
        let rows_ref: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
        return accept_greedy(&item.drafts, &rows_ref).map_err(RuntimeError::model);
    }
    let p: Vec<Vec<f32>> = rows
        .iter()
        .map(|r| warp_probs(r, params))
        .collect::<Result<_, _>>()?;
    let p_ref: Vec<&[f32]> = p.iter().map(Vec::as_slice).collect();
    sample_rows(item, &p_ref, rng)
}

/// A sampling session's verdict from the target's distributions `p` (one per row): a
/// plain draw without drafts, else the speculative acceptance rule against the draft's
/// distributions (proposals without one, from prompt lookup, are a point mass).
fn sample_rows(item: &DecideItem, p: &[&[f32]], rng: &mut Rng) -> Result<Verdict, RuntimeError> {
    if item.drafts.is_empty() {
        let row = p.first().ok_or(RuntimeError::Model {
            message: "no target distribution".into(),
        })?;
        return Ok(Verdict {
            accepted: 0,
            next_token: sample_from_probs(row, rng),
        });
    }
    let q_owned: Vec<Vec<f32>>;
    let q_ref: Vec<&[f32]> = if item.q.len() == item.drafts.len() {
        item.q.iter().map(Vec::as_slice).collect()
    } else {
        let vocab = p.first().map_or(0, |r| r.len());
        q_owned = item
            .drafts
            .iter()
            .map(|&d| {
                let mut q = vec![0.0; vocab];
                if let Some(x) = q.get_mut(d as usize) {
                    *x = 1.0;
                }
                q
            })
            .collect();
        q_owned.iter().map(Vec::as_slice).collect()
    };
    accept_sampling(&item.drafts, &q_ref, p, rng).map_err(RuntimeError::model)
}

impl Actor for SamplerActor {
    type Msg = SamplerMsg;
    type State = SamplerState;
    type Arguments = ();

    async fn pre_start(
        &self,
        _me: ActorRef<SamplerMsg>,
        _: (),
    ) -> Result<SamplerState, ActorProcessingErr> {
        Ok(SamplerState::default())
    }

    async fn handle(
        &self,
        _me: ActorRef<SamplerMsg>,
        msg: SamplerMsg,
        s: &mut SamplerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SamplerMsg::Register { session, params } => {
                let rng = Rng::new(params.seed);
                s.sessions.insert(session, (params, rng));
            }
            SamplerMsg::Unregister { session } => {
                s.sessions.remove(&session);
            }
            SamplerMsg::Decide { items, reply } => {
                let started = std::time::Instant::now();
                let out = items
                    .iter()
                    .map(|item| match s.sessions.get_mut(&item.session) {
                        Some((params, rng)) => decide(item, params, rng),
                        None => Err(RuntimeError::model("session unknown to the sampler")),
                    })
                    .collect();
                crate::metrics::step_latency("sampler", started.elapsed());
                let _ = reply.send(out);
            }
        }
        Ok(())
    }
}
