//! One forward step's metadata on the device: validated on the host, packed into a
//! single buffer of 32-bit words and uploaded with one copy (a step of a 7B decode is
//! about 3 ms; several small copies would each cost a driver round trip).
//!
//! Validation here is what lets the launchers be safe: every index a kernel follows
//! (token id, KV slot, block id, row) is bounded by a number recorded in [`DeviceStep`]
//! and checked against the operand it indexes.

use std::sync::Arc;

use crate::error::KernelError;
use crate::gpu::{DeviceBuffer, Gpu};

/// Chunks of at least this many rows of one sequence take the tensor-core prefill
/// attention (when the head size allows); shorter ones the decode kernel.
pub(crate) const TC_MIN_ROWS: usize = 16;
/// Query rows per tensor-core attention block.
pub(crate) const TC_ROWS: usize = 64;

/// One sequence's rows in a step (see the engine's `SeqMeta`).
#[derive(Debug, Clone, Copy)]
pub struct SeqDesc<'a> {
    pub first_row: usize,
    pub num_rows: usize,
    pub start_pos: usize,
    /// Block ids covering positions `0..start_pos + num_rows`.
    pub block_table: &'a [u32],
}

/// Host-side step metadata (see the engine's `StepMeta`).
#[derive(Debug, Clone, Copy)]
pub struct StepInput<'a> {
    pub token_ids: &'a [u32],
    pub slots: &'a [u32],
    /// `rows * half_dim` values each, or empty (no rotary embedding).
    pub rope_cos: &'a [f32],
    pub rope_sin: &'a [f32],
    pub seqs: &'a [SeqDesc<'a>],
    pub logit_rows: &'a [u32],
    pub block_size: usize,
}

/// Word offsets of each array inside [`DeviceStep`]'s buffer. The block tables come
/// last, so that the offsets depend only on the step's shape (rows, sequences, lists),
/// not on its context: a recorded step ([`crate::StepShape`]) is replayed on the words
/// of a later step of the same shape copied over its own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Offsets {
    pub tokens: usize,
    pub slots: usize,
    pub cos: usize,
    pub sin: usize,
    pub row_info: usize,
    pub seq_info: usize,
    pub block_tables: usize,
    pub logit_rows: usize,
    pub all_rows: usize,
    pub small_rows: usize,
    pub short_rows: usize,
    pub long_rows: usize,
    pub tiles: usize,
}

/// A step's metadata resident on the device, with the bounds of its indices.
#[derive(Debug, Clone)]
pub struct DeviceStep {
    /// Shared only between a recorded step and the clones it is rebuilt from.
    pub(crate) buf: Arc<DeviceBuffer<u32>>,
    /// Words of `buf` in use (the buffer of a recorded step may be longer).
    pub(crate) words: usize,
    pub(crate) off: Offsets,
    pub(crate) rows: usize,
    pub(crate) n_seqs: usize,
    /// Rotary pairs per row; 0 without rotary embeddings.
    pub(crate) half_dim: usize,
    pub(crate) block_size: usize,
    pub(crate) n_logit_rows: usize,
    pub(crate) n_small_rows: usize,
    /// `small_rows` split by each row's own context against the tensor-core decode
    /// attention's threshold, so that a row takes the same kernel in every step.
    pub(crate) n_short_rows: usize,
    pub(crate) n_long_rows: usize,
    pub(crate) max_ctx_short: usize,
    pub(crate) max_ctx_long: usize,
    pub(crate) n_tiles: usize,
    pub(crate) max_token: u32,
    pub(crate) max_slot: u32,
    pub(crate) max_block: u32,
    /// Longest context (position + 1) of any row, and of the rows in `small_rows`.
    pub(crate) max_ctx: usize,
    pub(crate) max_ctx_small: usize,
}

impl DeviceStep {
    /// Token rows in the step.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Rows whose logits are gathered.
    pub fn num_logit_rows(&self) -> usize {
        self.n_logit_rows
    }

    pub(crate) fn at(&self, word: usize) -> u64 {
        self.buf.ptr_at(word)
    }
}

/// Appends `data` to the packed words, returning its offset.
fn push(words: &mut Vec<u32>, data: &[u32]) -> usize {
    let at = words.len();
    words.extend_from_slice(data);
    at
}

fn bad(message: String) -> KernelError {
    KernelError::invalid("prepare step", message)
}

impl Gpu {
    /// Validates `input` and uploads it as one buffer.
    pub fn upload_step(&self, input: &StepInput<'_>) -> Result<DeviceStep, KernelError> {
        let rows = input.token_ids.len();
        let bs = input.block_size;
        if rows == 0 {
            return Err(bad("empty step".into()));
        }
        if bs == 0 {
            return Err(bad("block size 0".into()));
        }
        if input.slots.len() != rows {
            return Err(bad(format!("{} slots for {rows} rows", input.slots.len())));
        }
        if input.rope_cos.len() != input.rope_sin.len()
            || !input.rope_cos.len().is_multiple_of(rows)
        {
            return Err(bad(format!(
                "rotary tables of {} and {} values for {rows} rows",
                input.rope_cos.len(),
                input.rope_sin.len()
            )));
        }
        let half_dim = input.rope_cos.len() / rows;
        if rows > i32::MAX as usize / 2 {
            return Err(bad(format!("{rows} rows")));
        }

        // Row -> (sequence, position); every row must belong to exactly one sequence.
        let mut row_info = vec![u32::MAX; 2 * rows];
        let mut seq_info = Vec::with_capacity(4 * input.seqs.len());
        let mut tables = Vec::new();
        let mut small_rows = Vec::new();
        let (mut short_rows, mut long_rows) = (Vec::new(), Vec::new());
        let (mut max_ctx_short, mut max_ctx_long) = (0usize, 0usize);
        let tc_from = self.attn_tc_min_ctx();
        let mut tiles = Vec::new();
        let (mut max_ctx, mut max_ctx_small, mut max_block) = (0usize, 0usize, 0u32);
        for (si, s) in input.seqs.iter().enumerate() {
            let end = s.start_pos + s.num_rows;
            if s.num_rows == 0 || s.first_row + s.num_rows > rows {
                return Err(bad(format!(
                    "sequence {si}: rows {}..{} outside 0..{rows}",
                    s.first_row,
                    s.first_row + s.num_rows
                )));
            }
            if end > i32::MAX as usize / 2 {
                return Err(bad(format!("sequence {si}: position {end} too large")));
            }
            if s.block_table.len() * bs < end {
                return Err(bad(format!(
                    "sequence {si}: block table covers {} of {end} positions",
                    s.block_table.len() * bs
                )));
            }
            let needed = &s.block_table[..end.div_ceil(bs)];
            max_block = needed.iter().copied().fold(max_block, u32::max);
            seq_info.extend([
                s.first_row as u32,
                s.num_rows as u32,
                s.start_pos as u32,
                tables.len() as u32,
            ]);
            tables.extend_from_slice(needed);
            max_ctx = max_ctx.max(end);
            for i in 0..s.num_rows {
                let r = s.first_row + i;
                if row_info[2 * r] != u32::MAX {
                    return Err(bad(format!("row {r} belongs to two sequences")));
                }
                row_info[2 * r] = si as u32;
                row_info[2 * r + 1] = (s.start_pos + i) as u32;
            }
            if s.num_rows >= TC_MIN_ROWS {
                for q0 in (0..s.num_rows).step_by(TC_ROWS) {
                    tiles.extend([si as u32, q0 as u32]);
                }
            } else {
                small_rows.extend((s.first_row..s.first_row + s.num_rows).map(|r| r as u32));
                max_ctx_small = max_ctx_small.max(end);
                for i in 0..s.num_rows {
                    let ctx = s.start_pos + i + 1;
                    if ctx >= tc_from {
                        long_rows.push((s.first_row + i) as u32);
                        max_ctx_long = max_ctx_long.max(ctx);
                    } else {
                        short_rows.push((s.first_row + i) as u32);
                        max_ctx_short = max_ctx_short.max(ctx);
                    }
                }
            }
        }
        if let Some(r) = row_info.chunks(2).position(|p| p[0] == u32::MAX) {
            return Err(bad(format!("row {r} belongs to no sequence")));
        }
        if let Some(&r) = input.logit_rows.iter().find(|&&r| r as usize >= rows) {
            return Err(bad(format!("logit row {r} outside {rows} rows")));
        }
        if tables.len() > u32::MAX as usize / 2 {
            return Err(bad("block tables too large".into()));
        }

        let mut words: Vec<u32> = Vec::new();
        let cos: Vec<u32> = input.rope_cos.iter().map(|v| v.to_bits()).collect();
        let sin: Vec<u32> = input.rope_sin.iter().map(|v| v.to_bits()).collect();
        let all_rows: Vec<u32> = (0..rows as u32).collect();
        let off = Offsets {
            tokens: push(&mut words, input.token_ids),
            slots: push(&mut words, input.slots),
            cos: push(&mut words, &cos),
            sin: push(&mut words, &sin),
            row_info: push(&mut words, &row_info),
            seq_info: push(&mut words, &seq_info),
            logit_rows: push(&mut words, input.logit_rows),
            all_rows: push(&mut words, &all_rows),
            small_rows: push(&mut words, &small_rows),
            short_rows: push(&mut words, &short_rows),
            long_rows: push(&mut words, &long_rows),
            tiles: push(&mut words, &tiles),
            block_tables: push(&mut words, &tables),
        };
        Ok(DeviceStep {
            buf: Arc::new(self.upload(&words)?),
            words: words.len(),
            off,
            rows,
            n_seqs: input.seqs.len(),
            half_dim,
            block_size: bs,
            n_logit_rows: input.logit_rows.len(),
            n_small_rows: small_rows.len(),
            n_short_rows: short_rows.len(),
            n_long_rows: long_rows.len(),
            max_ctx_short,
            max_ctx_long,
            n_tiles: tiles.len() / 2,
            max_token: input.token_ids.iter().copied().max().unwrap_or(0),
            max_slot: input.slots.iter().copied().max().unwrap_or(0),
            max_block,
            max_ctx,
            max_ctx_small,
        })
    }
}
