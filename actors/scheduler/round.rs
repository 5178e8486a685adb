//! One scheduler round over every live session (continuous batching):
//!
//! 1. choose each session's draft length k (its policy; 0 while prefilling, when the
//!    draft is down, or when the batch is busy) and prompt-lookup proposals;
//! 2. reserve KV blocks (a session that cannot get them waits, or fails if it is
//!    alone and still does not fit);
//! 3. one `Propose` to the draft actor for all drafting sessions;
//! 4. one batched target pass through the shards: each session's uncached tokens plus
//!    its drafts; for the last k+1 positions, greedy tokens or sampling distributions
//!    computed where the logits are;
//! 5. one `Decide` to the sampler (greedy match or rejection sampling);
//! 6. commit KV lengths (rolling back rejected drafts), stream tokens, finish sessions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use falconer_engine::speculative::{prompt_lookup, Verdict};
use falconer_engine::{Backend, RowsOut};

use super::{Progress, Proposer, SchedulerState};
use crate::draft::{DraftMsg, Proposal, ProposeItem};
use crate::error::RuntimeError;
use crate::kv_manager::{KvMsg, Pool, Reserved};
use crate::metrics as m;
use crate::sampler::{DecideItem, SamplerMsg, TargetRows};
use crate::shard::{ChunkSpec, ChunkWant, ForwardJob, ShardMsg};
use crate::util::ask;

/// A session's plan for this round.
#[derive(Debug)]
struct Plan {
    id: u64,
    k: usize,
    drafts: Vec<u32>,
    q: Vec<Vec<f32>>,
    use_draft: bool,
    /// The session is still prefilling its prompt.
    prefill: bool,
    target: Option<Reserved>,
    draft: Option<Reserved>,
}

pub(super) async fn run<B: Backend>(st: &mut SchedulerState<B>) {
    let busy = st.sessions.len() > st.config.max_speculative_batch;
    let mut plans: Vec<Plan> = st
        .sessions
        .values()
        .map(|s| {
            let prefilling = s.target_len + 1 < s.tokens.len() || s.prefix_only;
            let want = if prefilling || busy {
                0
            } else {
                s.clamp_k(s.policy.next_k())
            };
            let (k, drafts, use_draft) = match s.proposer {
                Proposer::Draft if want > 0 && st.draft.is_some() => (want, Vec::new(), true),
                Proposer::Lookup if want > 0 => {
                    let (hi, lo) = st.config.lookup_ngram;
                    let d = prompt_lookup(&s.tokens, hi, lo, want);
                    (d.len(), d, false)
                }
                _ => (0, Vec::new(), false),
            };
            Plan {
                id: s.id,
                k,
                drafts,
                q: Vec::new(),
                use_draft,
                prefill: prefilling,
                target: None,
                draft: None,
            }
        })
        .collect();
    if plans.is_empty() {
        return;
    }

    reserve(st, &mut plans).await;
    plans.retain(|p| p.target.is_some());
    m::queue_depth(st.waiting.len());
    if plans.is_empty() {
        return;
    }

    let draft_step = propose(st, &mut plans).await;

    // The batched target pass.
    let mut copies = Vec::new();
    let chunks: Vec<ChunkSpec> = plans
        .iter()
        .filter_map(|p| {
            let s = st.sessions.get(&p.id)?;
            let r = p.target.as_ref()?;
            copies.extend_from_slice(&r.copies);
            let mut tokens = s.target_feed().to_vec();
            tokens.extend_from_slice(&p.drafts);
            Some(ChunkSpec {
                tokens,
                start_pos: s.target_len,
                block_table: r.block_table.clone(),
                prompt_len: s.prompt_len,
                all_logits: p.k > 0,
                want: ChunkWant::for_params(&s.params, &s.tokens[..s.target_len]),
            })
        })
        .collect();
    let started = Instant::now();
    let result = match st.shards.first() {
        Some(first) => {
            let job = |reply| {
                ShardMsg::Forward(ForwardJob {
                    chunks: Arc::new(chunks),
                    copies: Arc::new(copies),
                    hidden: None,
                    reply,
                })
            };
            ask(first, job).await.and_then(|r| r)
        }
        None => Err(RuntimeError::NoTarget),
    };
    let target_time = started.elapsed();
    m::target_pass();
    // Each plan's target rows: the last k+1 of its chunk, in the form it asked for.
    let rows: Option<Vec<TargetRows>> = match result {
        Ok(out) if out.len() == plans.len() => out
            .into_iter()
            .zip(&plans)
            .map(|(o, p)| last_rows(o, p.k + 1))
            .collect(),
        Ok(_) => None,
        Err(e) => return fail_all(st, &plans, e),
    };
    let Some(rows) = rows else {
        return fail_all(
            st,
            &plans,
            RuntimeError::model("target returned the wrong number or kind of results"),
        );
    };

    // Acceptance.
    let items: Vec<DecideItem> = plans
        .iter()
        .zip(rows)
        .filter(|(p, _)| st.sessions.contains_key(&p.id))
        .map(|(p, target)| DecideItem {
            session: p.id,
            drafts: p.drafts.clone(),
            q: p.q.clone(),
            target,
        })
        .collect();
    let verdicts = match ask(&st.sampler, |reply| SamplerMsg::Decide { items, reply }).await {
        Ok(v) if v.len() == plans.len() => v,
        Ok(_) => {
            return fail_all(
                st,
                &plans,
                RuntimeError::model("sampler returned the wrong number of verdicts"),
            )
        }
        Err(e) => return fail_all(st, &plans, e),
    };

    let timing = (
        draft_step.map(|d| d.as_secs_f64()),
        target_time.as_secs_f64(),
    );
    let mut commits = Vec::new();
    let mut ended = Vec::new();
    for (p, verdict) in plans.iter().zip(verdicts) {
        let Some(s) = st.sessions.get_mut(&p.id) else {
            continue;
        };
        let verdict = match verdict {
            Ok(v) => v,
            Err(e) => {
                commits.push((Pool::Target, p.id, s.target_len));
                ended.push((p.id, Err(e)));
                continue;
            }
        };
        if s.prefix_only {
            commits.push((Pool::Target, p.id, s.tokens.len()));
            s.target_len = s.tokens.len();
            ended.push((p.id, Ok(None)));
            continue;
        }
        let (target_len, draft_len) = s.lengths_after(p.k, p.use_draft, &verdict);
        commits.push((Pool::Target, p.id, target_len));
        s.target_len = target_len;
        if let Some(d) = draft_len {
            commits.push((Pool::Draft, p.id, d));
            s.draft_len = d;
        }
        record(s, p, &verdict, timing);
        let emitted = verdict.emitted(&p.drafts);
        match s.emit(&emitted, &st.tokenizer) {
            Progress::Continue => {}
            Progress::Finished(reason) => ended.push((p.id, Ok(Some(reason)))),
            Progress::Disconnected => ended.push((
                p.id,
                Ok(Some(falconer_engine::sampling::FinishReason::Cancelled)),
            )),
        }
    }
    let _ = st.kv.cast(KvMsg::Commit { items: commits });
    for (id, outcome) in ended {
        match outcome {
            Ok(Some(reason)) => st.finish(id, Ok(reason)),
            Ok(None) => prefix_ready(st, id),
            Err(e) => st.finish(id, Err(e)),
        }
    }
}

/// The last `n` rows of a chunk's target output; `None` for raw logits, which the
/// runtime never asks for.
fn last_rows(out: RowsOut, n: usize) -> Option<TargetRows> {
    fn tail<T>(mut v: Vec<T>, n: usize) -> Vec<T> {
        v.drain(..v.len().saturating_sub(n));
        v
    }
    match out {
        RowsOut::Logits(_) => None,
        RowsOut::Greedy(g) => Some(TargetRows::Greedy(tail(g, n))),
        RowsOut::Warped(w) => Some(TargetRows::Probs(tail(w, n))),
    }
}

/// Updates usage, policy and metrics after a session's round.
fn record(
    s: &mut super::Session,
    p: &Plan,
    v: &Verdict,
    (draft_step, target_pass): (Option<f64>, f64),
) {
    s.round += 1;
    s.usage.target_passes += 1;
    if p.k > 0 {
        s.usage.speculative_rounds += 1;
        s.usage.draft_tokens_proposed += p.k;
        s.usage.draft_tokens_accepted += v.accepted;
    }
    s.policy.observe(p.k, v.accepted);
    // Decode rounds only (a prefill's pass says nothing about verify costs).
    match (p.use_draft, draft_step) {
        (true, Some(d)) => s.policy.observe_timing(p.k, d, target_pass),
        (false, _) if p.k == 0 && !p.prefill => s.policy.observe_timing(0, 0.0, target_pass),
        _ => {}
    }
    m::speculative_round(p.k, v.accepted, v.num_emitted());
}

/// Asks the KV manager for every plan's blocks; sessions that get none wait.
async fn reserve<B: Backend>(st: &mut SchedulerState<B>, plans: &mut [Plan]) {
    let mut items = Vec::new();
    for p in plans.iter() {
        let Some(s) = st.sessions.get(&p.id) else {
            continue;
        };
        items.push((Pool::Target, p.id, s.tokens.len() + p.k));
        if p.use_draft {
            items.push((Pool::Draft, p.id, s.tokens.len() + p.k - 1));
        }
    }
    let results = match ask(&st.kv, |reply| KvMsg::Reserve { items, reply }).await {
        Ok(r) => r,
        Err(e) => {
            let ids: Vec<u64> = plans.iter().map(|p| p.id).collect();
            for id in ids {
                st.finish(id, Err(e.clone()));
            }
            return;
        }
    };
    let mut results = results.into_iter();
    let mut refused = Vec::new();
    let mut granted = false;
    for p in plans.iter_mut() {
        if !st.sessions.contains_key(&p.id) {
            continue;
        }
        let target = results.next();
        let draft = if p.use_draft { results.next() } else { None };
        match target {
            Some(Ok(r)) => {
                p.target = Some(r);
                granted = true;
                st.waiting.retain(|w| *w != p.id);
            }
            Some(Err(e)) => {
                if !st.waiting.contains(&p.id) {
                    st.waiting.push_back(p.id);
                }
                refused.push((p.id, e));
                continue;
            }
            None => continue,
        }
        match draft {
            Some(Ok(r)) => p.draft = Some(r),
            Some(Err(_)) => {
                // No draft blocks: decode plainly this round.
                p.use_draft = false;
                p.k = 0;
            }
            None => {}
        }
    }
    if !granted && !refused.is_empty() {
        unblock(st, refused);
    }
}

/// Nobody could grow this round. With two or more sessions holding blocks they may be
/// waiting on each other: the newest is preempted (its KV freed, recomputed later from
/// its tokens, so its output is unchanged). A session that does not fit even when it
/// is the only holder never will: it fails with the KV error.
fn unblock<B: Backend>(
    st: &mut SchedulerState<B>,
    refused: Vec<(u64, falconer_engine::error::KvError)>,
) {
    let holders: Vec<u64> = st
        .sessions
        .values()
        .filter(|s| s.target_len > 0)
        .map(|s| s.id)
        .collect();
    if let [.., newest] = holders[..] {
        if holders.len() >= 2 {
            if let Some(s) = st.sessions.get_mut(&newest) {
                s.target_len = 0;
                s.draft_len = 0;
            }
            let items = vec![(Pool::Target, newest, 0), (Pool::Draft, newest, 0)];
            let _ = st.kv.cast(KvMsg::Truncate { items });
            m::preemption();
            return;
        }
    }
    let victim = holders
        .first()
        .copied()
        .or_else(|| refused.first().map(|(id, _)| *id));
    if let Some((id, e)) = refused.into_iter().find(|(id, _)| Some(*id) == victim) {
        st.finish(id, Err(e.into()));
    }
}

/// Draft proposals for every drafting plan; on a draft failure those sessions decode
/// plainly this round (the supervisor restarts the draft). Returns one draft step's time.
async fn propose<B: Backend>(st: &mut SchedulerState<B>, plans: &mut [Plan]) -> Option<Duration> {
    let draft = st.draft.clone()?;
    let mut copies = Vec::new();
    let mut idx = Vec::new();
    let mut items = Vec::new();
    for (i, p) in plans.iter().enumerate() {
        let (Some(s), Some(r), true) = (st.sessions.get(&p.id), p.draft.as_ref(), p.use_draft)
        else {
            continue;
        };
        copies.extend_from_slice(&r.copies);
        items.push(ProposeItem {
            feed: s.draft_feed().to_vec(),
            start_pos: s.draft_len,
            prompt_len: s.prompt_len,
            block_table: r.block_table.clone(),
            k: p.k,
            sampling: (!s.params.is_greedy()).then(|| (s.params, s.draft_seed())),
        });
        idx.push(i);
    }
    if items.is_empty() {
        return None;
    }
    match ask(&draft, |reply| DraftMsg::Propose {
        items,
        copies,
        reply,
    })
    .await
    {
        Ok(Ok((proposals, step))) => {
            for (i, Proposal { tokens, q }) in idx.into_iter().zip(proposals) {
                plans[i].drafts = tokens;
                plans[i].q = q;
            }
            Some(step)
        }
        failed => {
            // Degrade: these sessions run a plain round. Their draft cache is now
            // unknown, so they catch up from scratch next time.
            for i in idx {
                let p = &mut plans[i];
                p.k = 0;
                p.use_draft = false;
                p.drafts.clear();
                if let Some(s) = st.sessions.get_mut(&p.id) {
                    s.draft_len = 0;
                }
            }
            // A dead actor: plain decoding until the supervisor's restart arrives.
            if failed.is_err() {
                st.draft = None;
            }
            None
        }
    }
}

fn fail_all<B: Backend>(st: &mut SchedulerState<B>, plans: &[Plan], e: RuntimeError) {
    let items = plans
        .iter()
        .filter_map(|p| {
            st.sessions
                .get(&p.id)
                .map(|s| (Pool::Target, p.id, s.target_len))
        })
        .collect();
    let _ = st.kv.cast(KvMsg::Truncate { items });
    for p in plans {
        st.finish(p.id, Err(e.clone()));
    }
}

/// A prefix holder finished its prefill: keep its KV for forking.
fn prefix_ready<B: Backend>(st: &mut SchedulerState<B>, id: u64) {
    let _ = st.sampler.cast(SamplerMsg::Unregister { session: id });
    if let Some(s) = st.sessions.remove(&id) {
        st.prefixes.push(super::Prefix {
            seq: id,
            tokens: s.tokens,
        });
    }
    if let Some(reply) = st.prefix_waiters.remove(&id) {
        let _ = reply.send(Ok(()));
    }
}
