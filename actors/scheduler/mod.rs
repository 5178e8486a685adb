//! The scheduler (coordinator): owns the sessions, runs continuous batching and the
//! speculative rounds, streams tokens, handles cancellation and draft restarts.
//!
//! Each `Tick` runs one round for every live session at once: draft proposals in one
//! message, one batched target pass through the shards, one acceptance message, one
//! KV commit. New requests join at the next tick; a cancelled one leaves at once.

mod round;
mod session;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use falconer_engine::kv::SeqId;
use falconer_engine::sampling::{FinishReason, SamplingParams, StopChecker, StopCriteria};
use falconer_engine::speculative::{AdaptiveConfig, DraftLengthPolicy};
use falconer_engine::{Backend, Tokenizer};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc;

use crate::api::events::{TokenEvent, Usage};
use crate::api::request::Speculation;
use crate::draft::DraftMsg;
use crate::error::RuntimeError;
use crate::kv_manager::{KvMsg, KvStats, Pool};
use crate::sampler::SamplerMsg;
use crate::shard::ShardMsg;
use crate::util::ask;
pub(crate) use session::{Progress, Proposer, Session};

/// How sessions choose their draft length.
#[derive(Debug, Clone, PartialEq)]
pub enum DraftPolicy {
    /// Always k drafts per round (0: no speculation).
    Fixed(usize),
    /// HF's heuristic, then expected-speed-up maximisation; turns speculation off
    /// where it loses.
    Adaptive(AdaptiveConfig),
}

impl Default for DraftPolicy {
    fn default() -> Self {
        DraftPolicy::Adaptive(AdaptiveConfig::default())
    }
}

/// A request after tokenisation, as the scheduler takes it.
#[derive(Debug, Clone)]
pub struct PreparedRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopCriteria,
    pub speculation: Speculation,
    pub draft_len: Option<usize>,
}

/// Figures of the scheduler and the KV cache.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchedulerStats {
    pub active: usize,
    pub waiting: usize,
    pub kv: KvStats,
    pub draft_available: bool,
    pub draft_restarts: usize,
}

/// Messages of the scheduler.
#[derive(Debug)]
pub enum SchedulerMsg {
    Submit {
        id: u64,
        req: Box<PreparedRequest>,
        tx: mpsc::Sender<TokenEvent>,
    },
    Cancel(u64),
    Tick,
    /// The supervisor replaced the draft actor (`None`: the draft is gone for good).
    DraftRestarted(Option<ActorRef<DraftMsg>>),
    /// Prefill `ids` once and let later prompts that start with them share its KV.
    CachePrefix {
        ids: Vec<u32>,
        reply: RpcReplyPort<Result<(), RuntimeError>>,
    },
    Stats(RpcReplyPort<SchedulerStats>),
}

/// Fixed settings of one runtime's scheduler.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub policy: DraftPolicy,
    pub default_eos: Vec<u32>,
    /// Above this many sessions in a round, speculation pauses (a busy batch already
    /// keeps the target's weights busy).
    pub max_speculative_batch: usize,
    pub lookup_ngram: (usize, usize),
}

/// Start-up arguments.
#[derive(Debug)]
pub struct SchedulerArgs<B: Backend> {
    pub shards: Vec<ActorRef<ShardMsg<B>>>,
    pub draft: Option<ActorRef<DraftMsg>>,
    pub kv: ActorRef<KvMsg>,
    pub sampler: ActorRef<SamplerMsg>,
    pub tokenizer: Arc<Tokenizer>,
    pub config: SchedulerConfig,
}

/// A cached shared prefix.
#[derive(Debug)]
pub(crate) struct Prefix {
    pub seq: SeqId,
    pub tokens: Vec<u32>,
}

/// The scheduler's state.
#[derive(Debug)]
pub struct SchedulerState<B: Backend> {
    pub(crate) shards: Vec<ActorRef<ShardMsg<B>>>,
    pub(crate) draft: Option<ActorRef<DraftMsg>>,
    pub(crate) kv: ActorRef<KvMsg>,
    pub(crate) sampler: ActorRef<SamplerMsg>,
    pub(crate) tokenizer: Arc<Tokenizer>,
    pub(crate) config: SchedulerConfig,
    pub(crate) sessions: BTreeMap<u64, Session>,
    /// Sessions that could not get KV blocks last round.
    pub(crate) waiting: VecDeque<u64>,
    pub(crate) prefixes: Vec<Prefix>,
    pub(crate) prefix_waiters: BTreeMap<u64, RpcReplyPort<Result<(), RuntimeError>>>,
    pub(crate) next_prefix_id: u64,
    pub(crate) ticking: bool,
    pub(crate) draft_restarts: usize,
}

/// The actor.
#[derive(Debug)]
pub struct Scheduler<B>(std::marker::PhantomData<fn() -> B>);

impl<B> Default for Scheduler<B> {
    fn default() -> Self {
        Scheduler(std::marker::PhantomData)
    }
}

impl<B: Backend> SchedulerState<B> {
    fn new_session(&self, id: u64, req: PreparedRequest, tx: mpsc::Sender<TokenEvent>) -> Session {
        let proposer = match req.speculation {
            Speculation::Off => Proposer::None,
            Speculation::PromptLookup => Proposer::Lookup,
            Speculation::Auto | Speculation::DraftModel if self.draft.is_some() => Proposer::Draft,
            Speculation::Auto | Speculation::DraftModel => Proposer::None,
        };
        let policy = match (req.draft_len, &self.config.policy) {
            (Some(k), _) | (None, &DraftPolicy::Fixed(k)) => DraftLengthPolicy::Fixed(k),
            (None, DraftPolicy::Adaptive(c)) => DraftLengthPolicy::adaptive_with(*c),
        };
        let max_new = req.stop.max_new_tokens;
        Session {
            id,
            prompt_len: req.prompt.len(),
            tokens: req.prompt,
            target_len: 0,
            draft_len: 0,
            proposer,
            policy,
            params: req.sampling,
            stop: StopChecker::new(req.stop),
            max_new_tokens: max_new,
            tx,
            usage: Usage::default(),
            started: Instant::now(),
            emitted_text: 0,
            round: 0,
            prefix_only: false,
            finish_text: String::new(),
        }
    }

    /// Registers a session with the KV manager and sampler, sharing a cached prefix
    /// when its prompt starts with one.
    async fn admit(&mut self, mut s: Session) -> Result<Session, (Session, RuntimeError)> {
        let mut pools = vec![Pool::Target];
        if self.draft.is_some() {
            pools.push(Pool::Draft);
        }
        let shared = self
            .prefixes
            .iter()
            .filter(|p| p.tokens.len() < s.tokens.len() && s.tokens.starts_with(&p.tokens))
            .max_by_key(|p| p.tokens.len())
            .map(|p| (p.seq, p.tokens.len()));
        let added = match shared {
            Some((parent, len)) => {
                let forked = ask(&self.kv, |reply| KvMsg::Fork {
                    pool: Pool::Target,
                    parent,
                    child: s.id,
                    len,
                    reply,
                })
                .await;
                match forked {
                    Ok(Ok(())) => {
                        s.target_len = len;
                        pools.retain(|p| *p != Pool::Target);
                        if pools.is_empty() {
                            Ok(Ok(()))
                        } else {
                            ask(&self.kv, |reply| KvMsg::Add {
                                seq: s.id,
                                pools,
                                reply,
                            })
                            .await
                        }
                    }
                    other => other,
                }
            }
            None => {
                ask(&self.kv, |reply| KvMsg::Add {
                    seq: s.id,
                    pools,
                    reply,
                })
                .await
            }
        };
        match added {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err((s, e.into())),
            Err(e) => return Err((s, e)),
        }
        let _ = self.sampler.cast(SamplerMsg::Register {
            session: s.id,
            params: s.params,
        });
        Ok(s)
    }

    /// Ends a session: frees its KV, forgets its RNG, sends its last event.
    pub(crate) fn finish(&mut self, id: u64, outcome: Result<FinishReason, RuntimeError>) {
        self.waiting.retain(|w| *w != id);
        let Some(mut s) = self.sessions.remove(&id) else {
            return;
        };
        let _ = self.kv.cast(KvMsg::Remove { seq: id });
        let _ = self.sampler.cast(SamplerMsg::Unregister { session: id });
        if let Some(reply) = self.prefix_waiters.remove(&id) {
            // A prefix holder that failed (or was cancelled) answers its caller.
            let _ = reply.send(match &outcome {
                Ok(_) => Err(RuntimeError::PrefixDropped),
                Err(e) => Err(e.clone()),
            });
        }
        let ev = match outcome {
            Ok(reason) => s.finished(reason, &self.tokenizer),
            Err(e) => TokenEvent::Error(e),
        };
        let _ = s.tx.try_send(ev);
        crate::metrics::active_sessions(self.sessions.len());
    }
}

impl<B: Backend> Actor for Scheduler<B> {
    type Msg = SchedulerMsg;
    type State = SchedulerState<B>;
    type Arguments = SchedulerArgs<B>;

    async fn pre_start(
        &self,
        _me: ActorRef<SchedulerMsg>,
        a: SchedulerArgs<B>,
    ) -> Result<SchedulerState<B>, ActorProcessingErr> {
        Ok(SchedulerState {
            shards: a.shards,
            draft: a.draft,
            kv: a.kv,
            sampler: a.sampler,
            tokenizer: a.tokenizer,
            config: a.config,
            sessions: BTreeMap::new(),
            waiting: VecDeque::new(),
            prefixes: Vec::new(),
            prefix_waiters: BTreeMap::new(),
            next_prefix_id: 1 << 62,
            ticking: false,
            draft_restarts: 0,
        })
    }

    async fn handle(
        &self,
        me: ActorRef<SchedulerMsg>,
        msg: SchedulerMsg,
        st: &mut SchedulerState<B>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SchedulerMsg::Submit { id, req, tx } => {
                let s = st.new_session(id, *req, tx);
                match st.admit(s).await {
                    Ok(s) => {
                        st.sessions.insert(id, s);
                        crate::metrics::active_sessions(st.sessions.len());
                    }
                    Err((s, e)) => {
                        let _ = s.tx.try_send(TokenEvent::Error(e));
                    }
                }
            }
            SchedulerMsg::CachePrefix { ids, reply } => {
                if ids.is_empty() {
                    let _ = reply.send(Err(RuntimeError::EmptyPrompt));
                    return Ok(());
                }
                let id = st.next_prefix_id;
                st.next_prefix_id += 1;
                let (tx, _rx) = mpsc::channel(1);
                let req = PreparedRequest {
                    prompt: ids,
                    sampling: SamplingParams::greedy(),
                    stop: StopCriteria {
                        eos_ids: vec![],
                        stop_strings: vec![],
                        max_new_tokens: 1,
                    },
                    speculation: Speculation::Off,
                    draft_len: Some(0),
                };
                let mut s = st.new_session(id, req, tx);
                s.prefix_only = true;
                match ask(&st.kv, |reply| KvMsg::Add {
                    seq: id,
                    pools: vec![Pool::Target],
                    reply,
                })
                .await
                {
                    Ok(Ok(())) => {
                        // The target pass of a prefix goes through the sampler like any
                        // other; it forgets the holder once the prefix is ready.
                        let _ = st.sampler.cast(SamplerMsg::Register {
                            session: id,
                            params: s.params,
                        });
                        st.sessions.insert(id, s);
                        st.prefix_waiters.insert(id, reply);
                    }
                    Ok(Err(e)) => {
                        let _ = reply.send(Err(e.into()));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            SchedulerMsg::Cancel(id) => st.finish(id, Ok(FinishReason::Cancelled)),
            SchedulerMsg::Tick => {
                st.ticking = false;
                let started = std::time::Instant::now();
                round::run(st).await;
                crate::metrics::step_latency("scheduler_round", started.elapsed());
            }
            SchedulerMsg::DraftRestarted(draft) => {
                st.draft_restarts += 1;
                crate::metrics::draft_restart();
                // The new draft's KV memory is empty: every session catches up.
                let _ = ask(&st.kv, |reply| KvMsg::ResetDraft { reply }).await;
                if draft.is_some() {
                    let ids: Vec<u64> = st.sessions.keys().copied().collect();
                    for id in ids {
                        if let Some(s) = st.sessions.get_mut(&id) {
                            s.draft_len = 0;
                        }
                        let _ = ask(&st.kv, |reply| KvMsg::Add {
                            seq: id,
                            pools: vec![Pool::Draft],
                            reply,
                        })
                        .await;
                    }
                } else {
                    for s in st.sessions.values_mut() {
                        if s.proposer == Proposer::Draft {
                            s.proposer = Proposer::None;
                        }
                    }
                }
                st.draft = draft;
            }
            SchedulerMsg::Stats(reply) => {
                let kv = ask(&st.kv, |reply| KvMsg::Stats { reply })
                    .await
                    .unwrap_or_default();
                let _ = reply.send(SchedulerStats {
                    active: st.sessions.values().filter(|s| !s.prefix_only).count(),
                    waiting: st.waiting.len(),
                    kv,
                    draft_available: st.draft.is_some(),
                    draft_restarts: st.draft_restarts,
                });
            }
        }
        if !st.sessions.is_empty() && !st.ticking {
            st.ticking = true;
            me.cast(SchedulerMsg::Tick)?;
        }
        Ok(())
    }
}
