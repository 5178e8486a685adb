//! A model together with its KV block tables: the unit that runs sequences.
//!
//! [`ModelRunner`] is what the actors wrap (one per target shard set or draft model)
//! and what plain single-process users call: add a sequence, run any batch of
//! prefill / decode / verify chunks, roll a sequence back, share a prefix, free it.

use std::collections::HashMap;

use crate::backend::Backend;
use crate::error::Result;
use crate::kv::{KvPool, SeqId};
use crate::model::{Falcon, Logits, RowsOut, RowsWanted, SeqChunk};

/// New tokens for one sequence in a batched forward pass.
#[derive(Debug, Clone, Copy)]
pub struct SeqWork<'a> {
    pub seq: SeqId,
    pub tokens: &'a [u32],
    /// Logits for every new token (verify) or just the last (decode).
    pub all_logits: bool,
}

/// A Falcon model plus the block tables of the sequences it holds KV for.
#[derive(Debug)]
pub struct ModelRunner<B: Backend> {
    model: Falcon<B>,
    pool: KvPool,
    prompt_len: HashMap<SeqId, usize>,
}

impl<B: Backend> ModelRunner<B> {
    pub fn new(model: Falcon<B>) -> Self {
        let l = model.kv_layout();
        ModelRunner {
            pool: KvPool::new(l.num_blocks, l.block_size),
            model,
            prompt_len: HashMap::new(),
        }
    }

    pub fn model(&self) -> &Falcon<B> {
        &self.model
    }

    pub fn pool(&self) -> &KvPool {
        &self.pool
    }

    pub fn add_sequence(&mut self, seq: SeqId) -> Result<()> {
        Ok(self.pool.add(seq)?)
    }

    /// Frees the sequence's blocks. Unknown ids are an error.
    pub fn remove_sequence(&mut self, seq: SeqId) -> Result<()> {
        self.prompt_len.remove(&seq);
        Ok(self.pool.remove(seq)?)
    }

    /// Positions of `seq` already in the KV cache.
    pub fn cached_len(&self, seq: SeqId) -> Result<usize> {
        Ok(self.pool.len(seq)?)
    }

    /// Rolls `seq` back to `len` cached positions (rejected draft tokens).
    pub fn truncate(&mut self, seq: SeqId, len: usize) -> Result<()> {
        Ok(self.pool.truncate(seq, len)?)
    }

    /// A new sequence `child` sharing the first `len` positions of `parent`.
    pub fn fork(&mut self, parent: SeqId, child: SeqId, len: usize) -> Result<()> {
        self.pool.fork(parent, child, len)?;
        if let Some(&p) = self.prompt_len.get(&parent) {
            self.prompt_len.insert(child, p.min(len));
        }
        Ok(())
    }

    /// Runs one forward pass over a batch; each sequence's new tokens continue where
    /// its cache ends. On any error no sequence's cache length changes.
    pub fn forward(&mut self, work: &[SeqWork<'_>]) -> Result<Vec<Logits>> {
        self.run(work, |m, c| m.forward(c))
    }

    /// [`ModelRunner::forward`] returning each chunk's greedy tokens (the argmax of its
    /// logit rows, computed by the backend) instead of logits.
    pub fn forward_greedy(&mut self, work: &[SeqWork<'_>]) -> Result<Vec<Vec<Option<u32>>>> {
        self.run(work, |m, c| m.forward_greedy(c))
    }

    /// [`ModelRunner::forward`] returning each chunk's rows as `wants` asks (one per
    /// chunk): logits, greedy tokens or sampling distributions ([`Falcon::outputs`]).
    pub fn forward_outputs(
        &mut self,
        work: &[SeqWork<'_>],
        wants: &[RowsWanted<'_>],
    ) -> Result<Vec<RowsOut>> {
        self.run(work, |m, c| m.forward_outputs(c, wants))
    }

    fn run<T>(
        &mut self,
        work: &[SeqWork<'_>],
        pass: impl FnOnce(&mut Falcon<B>, &[SeqChunk<'_>]) -> Result<Vec<T>>,
    ) -> Result<Vec<T>> {
        let mut starts = Vec::with_capacity(work.len());
        for (i, w) in work.iter().enumerate() {
            let start = self.pool.len(w.seq)?;
            match self.pool.reserve(w.seq, start + w.tokens.len()) {
                Ok(copies) => {
                    starts.push(start);
                    if let Err(e) = self.model.copy_kv_blocks(&copies) {
                        self.rollback(&work[..=i], &starts);
                        return Err(e);
                    }
                }
                Err(e) => {
                    self.rollback(&work[..i], &starts);
                    return Err(e.into());
                }
            }
        }
        let result = {
            let chunks: Vec<SeqChunk<'_>> = work
                .iter()
                .zip(&starts)
                .map(|(w, &start)| {
                    let prompt_len = *self
                        .prompt_len
                        .get(&w.seq)
                        .unwrap_or(&(start + w.tokens.len()));
                    SeqChunk {
                        tokens: w.tokens,
                        start_pos: start,
                        block_table: self.pool.table(w.seq).unwrap_or(&[]),
                        prompt_len,
                        all_logits: w.all_logits,
                    }
                })
                .collect();
            pass(&mut self.model, &chunks)
        };
        match result {
            Ok(logits) => {
                for (w, &start) in work.iter().zip(&starts) {
                    self.pool.set_len(w.seq, start + w.tokens.len())?;
                    self.prompt_len
                        .entry(w.seq)
                        .or_insert(start + w.tokens.len());
                }
                Ok(logits)
            }
            Err(e) => {
                self.rollback(work, &starts);
                Err(e)
            }
        }
    }

    fn rollback(&mut self, work: &[SeqWork<'_>], starts: &[usize]) {
        for (w, &start) in work.iter().zip(starts) {
            // Frees blocks reserved past `start`; the length itself never moved.
            let _ = self.pool.truncate(w.seq, start);
        }
    }

    /// Plain greedy decoding of one fresh sequence: `max_new` tokens after `prompt`
    /// (the reference that speculative decoding must reproduce).
    pub fn greedy(&mut self, seq: SeqId, prompt: &[u32], max_new: usize) -> Result<Vec<u32>> {
        self.add_sequence(seq)?;
        let out = self.greedy_inner(seq, prompt, max_new);
        self.remove_sequence(seq)?;
        out
    }

    fn greedy_inner(&mut self, seq: SeqId, prompt: &[u32], max_new: usize) -> Result<Vec<u32>> {
        let mut out = Vec::with_capacity(max_new);
        let mut next = prompt.to_vec();
        while out.len() < max_new {
            let logits = self.forward(&[SeqWork {
                seq,
                tokens: &next,
                all_logits: false,
            }])?;
            let t = crate::sampling::argmax(logits[0].last());
            out.push(t);
            next = vec![t];
        }
        Ok(out)
    }
}
