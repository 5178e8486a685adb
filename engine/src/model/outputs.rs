//! What the last shard makes of a step's logit rows, chunk by chunk: the logits, each
//! row's greedy token, or each row's sampling distribution. Only the first copies raw
//! logits to the host; the others are computed where the logits are
//! ([`Backend::argmax_rows`], [`Backend::penalized_argmax_rows`], [`Backend::warp_rows`])
//! and a backend that keeps the logits on a GPU never sorts a vocabulary on the host.

use crate::backend::{Backend, WarpRow, WarpedRows};
use crate::error::{ForwardError, Result};
use crate::model::{Falcon, Logits, SeqChunk, Step};
use crate::sampling::{PenaltyContext, SamplingError, SamplingParams};

/// What one chunk of a step wants from its logit rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RowsWanted<'a> {
    /// The raw logits.
    Logits,
    /// Each row's argmax (greedy decoding without a repetition penalty).
    Greedy,
    /// Each row's sampling distribution under `params` ([`RowsOut::Warped`]), or for
    /// greedy `params` each row's greedy token ([`RowsOut::Greedy`]): the repetition
    /// penalty looks at `history` (the tokens before the chunk's first) plus the chunk's
    /// tokens up to the row's own.
    Warped {
        params: &'a SamplingParams,
        history: &'a [u32],
    },
}

/// One chunk's logit rows, as its [`RowsWanted`] asked.
#[derive(Debug, Clone, PartialEq)]
pub enum RowsOut {
    Logits(Logits),
    /// `None`: a row without a usable logit.
    Greedy(Vec<Option<u32>>),
    /// Per row, the distribution [`crate::sampling::sample_token`] would draw from.
    Warped(Vec<std::result::Result<Vec<f32>, SamplingError>>),
}

impl<B: Backend> Falcon<B> {
    /// Final norm and LM head over the step's logit rows (last shard only), delivered
    /// per non-empty chunk as `wants` (one per non-empty chunk) asks.
    pub fn outputs(
        &self,
        hidden: &B::Tensor,
        step: &Step<B>,
        wants: &[RowsWanted<'_>],
    ) -> Result<Vec<RowsOut>> {
        let logits = self.head_logits(hidden, &step.device)?;
        self.outputs_from(&logits, step, wants)
    }

    /// [`Falcon::outputs`] of the step's logit rows, already computed.
    pub fn outputs_from(
        &self,
        logits: &B::Tensor,
        step: &Step<B>,
        wants: &[RowsWanted<'_>],
    ) -> Result<Vec<RowsOut>> {
        let chunks = step.rows_per_chunk.len();
        if wants.len() != chunks {
            return Err(ForwardError::WantsPerChunk {
                wants: wants.len(),
                chunks,
            }
            .into());
        }
        let v = self.cfg.vocab_size;
        let want = |f: fn(&RowsWanted<'_>) -> bool| wants.iter().any(f);
        let host = if want(|w| matches!(w, RowsWanted::Logits)) {
            self.backend.to_host(logits)?
        } else {
            Vec::new()
        };
        let greedy = if want(|w| matches!(w, RowsWanted::Greedy)) {
            self.backend.argmax_rows(logits, v)?
        } else {
            Vec::new()
        };
        let (warped, penalized) = self.warp(logits, step, wants)?;
        let (mut warped, mut penalized) = (warped.into_iter(), penalized.into_iter());

        let mut out = Vec::with_capacity(chunks);
        let mut at = 0;
        for (w, &n) in wants.iter().zip(&step.rows_per_chunk) {
            out.push(match w {
                RowsWanted::Logits => RowsOut::Logits(Logits {
                    vocab_size: v,
                    data: host[at * v..(at + n) * v].to_vec(),
                }),
                RowsWanted::Greedy => RowsOut::Greedy(greedy[at..at + n].to_vec()),
                RowsWanted::Warped { params, .. } if params.is_greedy() => {
                    RowsOut::Greedy(penalized.by_ref().take(n).collect())
                }
                RowsWanted::Warped { .. } => RowsOut::Warped(warped.by_ref().take(n).collect()),
            });
            at += n;
        }
        Ok(out)
    }

    /// Final norm and LM head over the step's logit rows (last shard only); one
    /// [`Logits`] per non-empty chunk.
    pub fn logits(&self, hidden: &B::Tensor, step: &Step<B>) -> Result<Vec<Logits>> {
        let logits = self.head_logits(hidden, &step.device)?;
        self.logits_from(&logits, step)
    }

    /// [`Falcon::logits`] of the step's logit rows, already computed.
    pub fn logits_from(&self, logits: &B::Tensor, step: &Step<B>) -> Result<Vec<Logits>> {
        let wants = vec![RowsWanted::Logits; step.rows_per_chunk.len()];
        let out = self.outputs_from(logits, step, &wants)?;
        // Each chunk is answered in the form it asked for.
        Ok(out
            .into_iter()
            .filter_map(|o| match o {
                RowsOut::Logits(l) => Some(l),
                _ => None,
            })
            .collect())
    }

    /// Greedy tokens (the argmax of each logit row; `None` for a row without a usable
    /// logit) per non-empty chunk of the step's logit rows, computed where the logits
    /// are: only token ids cross to the host.
    pub fn greedy_from(&self, logits: &B::Tensor, step: &Step<B>) -> Result<Vec<Vec<Option<u32>>>> {
        let wants = vec![RowsWanted::Greedy; step.rows_per_chunk.len()];
        let out = self.outputs_from(logits, step, &wants)?;
        Ok(out
            .into_iter()
            .filter_map(|o| match o {
                RowsOut::Greedy(t) => Some(t),
                _ => None,
            })
            .collect())
    }

    /// [`Falcon::outputs`] of a whole forward pass (this instance holds every layer).
    pub fn forward_outputs(
        &mut self,
        chunks: &[SeqChunk<'_>],
        wants: &[RowsWanted<'_>],
    ) -> Result<Vec<RowsOut>> {
        let step = self.prepare(chunks)?;
        let logits = self.step_logits(&step)?;
        self.outputs_from(&logits, &step, wants)
    }

    /// The rows of the `Warped` chunks, in chunk order: one backend call for the
    /// sampled ones (distributions), one for the greedy ones (tokens).
    fn warp(
        &self,
        logits: &B::Tensor,
        step: &Step<B>,
        wants: &[RowsWanted<'_>],
    ) -> Result<(WarpedRows, Vec<Option<u32>>)> {
        let meta = &step.meta;
        let mut rows: Vec<(usize, &SamplingParams)> = Vec::new();
        let mut contexts: Vec<Vec<u32>> = Vec::new();
        let mut at = 0;
        for ((w, &n), seq) in wants.iter().zip(&step.rows_per_chunk).zip(&meta.seqs) {
            if let RowsWanted::Warped { params, history } = w {
                // The penalty's context of a row: the history, then the chunk's tokens
                // through the row's own; one set grows along the chunk's (increasing) rows.
                let penalised = params.repetition_penalty != 1.0;
                let mut set = PenaltyContext::new(if penalised { self.cfg.vocab_size } else { 0 });
                if penalised {
                    set.extend(history);
                }
                let mut next = seq.first_row;
                for r in at..at + n {
                    rows.push((r, params));
                    let mut ctx = Vec::new();
                    if penalised {
                        let token_row = meta.logit_rows[r] as usize;
                        set.extend(meta.token_ids.get(next..=token_row).unwrap_or(&[]));
                        next = next.max(token_row + 1);
                        ctx = set.ids();
                    }
                    contexts.push(ctx);
                }
            }
            at += n;
        }
        let (greedy, sampled): (Vec<WarpRow<'_>>, Vec<WarpRow<'_>>) = rows
            .iter()
            .zip(&contexts)
            .map(|(&(row, params), ctx)| WarpRow {
                row,
                params,
                context: ctx,
            })
            .partition(|r| r.params.is_greedy());
        let v = self.cfg.vocab_size;
        Ok((
            self.backend.warp_rows(logits, v, &sampled)?,
            self.backend.penalized_argmax_rows(logits, v, &greedy)?,
        ))
    }
}
