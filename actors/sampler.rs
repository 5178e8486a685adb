//! SamplerActor: each session's sampling parameters and seeded RNG, and the
//! acceptance rule. A thin shell around `falconer_engine::sampling` and
//! `falconer_engine::speculative`.

use std::collections::HashMap;

use falconer_engine::sampling::{sample_from_probs, Rng, SamplingError, SamplingParams};
use falconer_engine::speculative::{accept_greedy_tokens, accept_sampling, Verdict};
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
    /// The target's `drafts.len() + 1` rows (the repetition penalty already applied).
    pub target: TargetRows,
}

/// The target's rows for one decision, computed where the logits are.
#[derive(Debug, Clone)]
pub enum TargetRows {
    /// Each row's greedy token, taken on the device after the session's repetition
    /// penalty (`None`: no usable logit); only for greedy sessions.
    Greedy(Vec<Option<u32>>),
    /// Each row's sampling distribution, penalised and warped where the logits are (row
    /// i saw the session's tokens plus the first i drafts); only for sampling sessions.
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

/// The acceptance rule for one item (pure; the actor only owns the RNG).
pub fn decide(
    item: &DecideItem,
    params: &SamplingParams,
    rng: &mut Rng,
) -> Result<Verdict, RuntimeError> {
    match &item.target {
        TargetRows::Greedy(tokens) => {
            if !params.is_greedy() {
                return Err(RuntimeError::model("greedy tokens for a sampling session"));
            }
            accept_greedy_tokens(&item.drafts, tokens).map_err(RuntimeError::model)
        }
        TargetRows::Probs(rows) => {
            if params.is_greedy() {
                return Err(RuntimeError::model("distributions for a greedy session"));
            }
            let p = rows
                .iter()
                .map(|r| r.as_ref().map(Vec::as_slice).map_err(|e| *e))
                .collect::<Result<Vec<&[f32]>, SamplingError>>()?;
            sample_rows(item, &p, rng)
        }
    }
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
