//! Turning a batch of sequence chunks into one step's metadata: token rows, KV slots,
//! rotary tables and which rows need logits.

use crate::backend::{SeqMeta, StepMeta};
use crate::config::FalconConfig;
use crate::error::ForwardError;
use crate::posenc::rope::Rope;

/// New tokens of one sequence for a forward pass.
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    /// Tokens at positions `start_pos..start_pos + tokens.len()`.
    pub tokens: &'a [u32],
    pub start_pos: usize,
    /// KV blocks covering at least `start_pos + tokens.len()` positions.
    pub block_table: &'a [u32],
    /// The sequence's prompt length (dynamic NTK RoPE: see [`crate::posenc::rope`]).
    pub prompt_len: usize,
    /// Logits for every token (prefill checks, verify passes) or only the last.
    pub all_logits: bool,
}

pub(super) fn build(
    chunks: &[SeqChunk<'_>],
    cfg: &FalconConfig,
    rope: Option<&Rope>,
    block_size: usize,
) -> Result<StepMeta, ForwardError> {
    let mut m = StepMeta {
        block_size,
        ..StepMeta::default()
    };
    if chunks.iter().all(|c| c.tokens.is_empty()) {
        return Err(ForwardError::EmptyBatch);
    }
    for c in chunks {
        let end = c.start_pos + c.tokens.len();
        let covered = c.block_table.len() * block_size;
        if covered < end {
            return Err(ForwardError::BlockTableTooShort {
                covered,
                needed: end,
            });
        }
        if c.tokens.is_empty() {
            continue;
        }
        let first_row = m.token_ids.len();
        m.seqs.push(SeqMeta {
            first_row,
            num_rows: c.tokens.len(),
            start_pos: c.start_pos,
            block_table: c.block_table.to_vec(),
        });
        for (i, &id) in c.tokens.iter().enumerate() {
            if id as usize >= cfg.vocab_size {
                return Err(ForwardError::TokenOutOfVocab {
                    id,
                    vocab_size: cfg.vocab_size,
                });
            }
            let pos = c.start_pos + i;
            m.token_ids.push(id);
            m.slots.push(
                c.block_table[pos / block_size] * block_size as u32 + (pos % block_size) as u32,
            );
            if let Some(r) = rope {
                r.push_cos_sin(
                    pos,
                    (pos + 1).max(c.prompt_len),
                    &mut m.rope_cos,
                    &mut m.rope_sin,
                );
            }
        }
        let last = m.token_ids.len() - 1;
        if c.all_logits {
            m.logit_rows.extend((first_row..=last).map(|r| r as u32));
        } else {
            m.logit_rows.push(last as u32);
        }
    }
    Ok(m)
}
