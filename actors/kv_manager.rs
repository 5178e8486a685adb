//! KvCacheManager: the block tables of every session, for the target and the draft.
//!
//! The KV memory itself lives with the target shards and the draft actor; this actor
//! decides which blocks a session's positions occupy. A thin shell around
//! [`falconer_engine::kv::KvPool`]: reserve before a pass, commit (roll back rejected
//! drafts) after it, share prefixes, free on finish.

use falconer_engine::error::KvError;
use falconer_engine::kv::{KvPool, SeqId};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::metrics as m;

/// Which model's cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    Target,
    Draft,
}

/// Blocks granted for one pass of one sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    pub block_table: Vec<u32>,
    /// Copy-on-write block copies to perform before writing.
    pub copies: Vec<(u32, u32)>,
}

/// Messages of the KV cache manager.
#[derive(Debug)]
pub enum KvMsg {
    Add {
        seq: SeqId,
        pools: Vec<Pool>,
        reply: RpcReplyPort<Result<(), KvError>>,
    },
    /// Grow each `(pool, seq, new_len)`; each item succeeds or fails on its own.
    Reserve {
        items: Vec<(Pool, SeqId, usize)>,
        reply: RpcReplyPort<Vec<Result<Reserved, KvError>>>,
    },
    /// Set each `(pool, seq, valid_len)` after a pass and free blocks past it.
    Commit {
        items: Vec<(Pool, SeqId, usize)>,
    },
    /// Roll each `(pool, seq)` back to `len` (a failed pass).
    Truncate {
        items: Vec<(Pool, SeqId, usize)>,
    },
    Fork {
        pool: Pool,
        parent: SeqId,
        child: SeqId,
        len: usize,
        reply: RpcReplyPort<Result<(), KvError>>,
    },
    /// Frees a sequence in every pool that holds it.
    Remove {
        seq: SeqId,
    },
    /// Forgets every draft sequence (the draft's KV memory was lost in a restart).
    ResetDraft {
        reply: RpcReplyPort<()>,
    },
    Stats {
        reply: RpcReplyPort<KvStats>,
    },
}

/// Occupancy of both pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvStats {
    pub target_used: usize,
    pub target_total: usize,
    pub draft_used: usize,
    pub draft_total: usize,
    pub sequences: usize,
}

/// The actor.
#[derive(Debug)]
pub struct KvCacheManager;

/// Pool sizes: `(blocks, block_size)` for target and draft.
#[derive(Debug)]
pub struct KvArgs {
    pub target: (usize, usize),
    pub draft: Option<(usize, usize)>,
}

#[derive(Debug)]
pub struct KvState {
    target: KvPool,
    draft: KvPool,
    draft_shape: (usize, usize),
}

impl KvState {
    fn pool(&mut self, p: Pool) -> &mut KvPool {
        match p {
            Pool::Target => &mut self.target,
            Pool::Draft => &mut self.draft,
        }
    }

    fn gauges(&self) {
        m::kv_blocks_used("target", self.target.used_blocks());
        m::kv_blocks_used("draft", self.draft.used_blocks());
    }
}

impl Actor for KvCacheManager {
    type Msg = KvMsg;
    type State = KvState;
    type Arguments = KvArgs;

    async fn pre_start(
        &self,
        _me: ActorRef<KvMsg>,
        args: KvArgs,
    ) -> Result<KvState, ActorProcessingErr> {
        let draft_shape = args.draft.unwrap_or((0, 1));
        Ok(KvState {
            target: KvPool::new(args.target.0, args.target.1),
            draft: KvPool::new(draft_shape.0, draft_shape.1),
            draft_shape,
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<KvMsg>,
        msg: KvMsg,
        s: &mut KvState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            KvMsg::Add { seq, pools, reply } => {
                let mut r = Ok(());
                for p in pools {
                    if let Err(e) = s.pool(p).add(seq) {
                        r = Err(e);
                    }
                }
                let _ = reply.send(r);
            }
            KvMsg::Reserve { items, reply } => {
                let started = std::time::Instant::now();
                let out = items
                    .into_iter()
                    .map(|(p, seq, len)| {
                        let pool = s.pool(p);
                        let copies = pool.reserve(seq, len)?;
                        Ok(Reserved {
                            block_table: pool.table(seq)?.to_vec(),
                            copies,
                        })
                    })
                    .collect();
                m::step_latency("kv_cache_manager", started.elapsed());
                let _ = reply.send(out);
                s.gauges();
            }
            KvMsg::Commit { items } => {
                for (p, seq, len) in items {
                    // An unknown sequence here was cancelled meanwhile: nothing to keep.
                    let _ = s.pool(p).commit_len(seq, len);
                }
                s.gauges();
            }
            KvMsg::Truncate { items } => {
                for (p, seq, len) in items {
                    let _ = s.pool(p).truncate(seq, len);
                }
                s.gauges();
            }
            KvMsg::Fork {
                pool,
                parent,
                child,
                len,
                reply,
            } => {
                let _ = reply.send(s.pool(pool).fork(parent, child, len));
                s.gauges();
            }
            KvMsg::Remove { seq } => {
                for p in [Pool::Target, Pool::Draft] {
                    if s.pool(p).contains(seq) {
                        let _ = s.pool(p).remove(seq);
                    }
                }
                s.gauges();
            }
            KvMsg::ResetDraft { reply } => {
                s.draft = KvPool::new(s.draft_shape.0, s.draft_shape.1);
                let _ = reply.send(());
                s.gauges();
            }
            KvMsg::Stats { reply } => {
                let _ = reply.send(KvStats {
                    target_used: s.target.used_blocks(),
                    target_total: s.target.total_blocks(),
                    draft_used: s.draft.used_blocks(),
                    draft_total: s.draft.total_blocks(),
                    sequences: s.target.num_seqs(),
                });
            }
        }
        Ok(())
    }
}
