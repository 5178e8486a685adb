//! Rotary + KV-cache write + causal attention over paged KV, for MQA, grouped and full
//! multi-head layouts (all are "groups of q_per_kv query heads sharing one kv head").

use rayon::prelude::*;

use super::matmul::dot;
use super::{CpuKvCache, CpuTensor};
use crate::backend::{AttnConfig, StepMeta};
use crate::error::BackendError;
use crate::posenc::{alibi, rope::rotate_half_in_place};

fn invalid(message: String) -> BackendError {
    BackendError::Device {
        op: "attention",
        message,
    }
}

pub(super) fn attend(
    qkv: &CpuTensor,
    kv: &mut CpuKvCache,
    layer: usize,
    step: &StepMeta,
    attn: &AttnConfig,
) -> Result<CpuTensor, BackendError> {
    let (hd, kvh, nh) = (attn.head_dim, attn.num_kv_heads, attn.num_heads);
    let qpg = nh / kvh;
    let group = (qpg + 2) * hd;
    if qkv.cols != kvh * group || qkv.rows != step.token_ids.len() || layer >= kv.layout.num_layers
    {
        return Err(invalid(format!(
            "qkv is {}x{}, expected {}x{}",
            qkv.rows,
            qkv.cols,
            step.token_ids.len(),
            kvh * group
        )));
    }
    let half = hd / 2;
    let rotary = !step.rope_cos.is_empty();
    let layer_len = kv.layer_len();
    let num_slots = kv.layout.num_slots();
    let slot_off = |slot: usize, g: usize| layer * layer_len + (slot * kvh + g) * hd;

    // Queries, rotated: [rows, heads, head_dim].
    let mut q = vec![0.0f32; qkv.rows * nh * hd];
    for r in 0..qkv.rows {
        let src = qkv.row(r);
        let slot = step.slots[r] as usize;
        if slot >= num_slots {
            return Err(invalid(format!("slot {slot} outside {num_slots}")));
        }
        let (cos, sin) = if rotary {
            (
                &step.rope_cos[r * half..(r + 1) * half],
                &step.rope_sin[r * half..(r + 1) * half],
            )
        } else {
            (&[][..], &[][..])
        };
        for g in 0..kvh {
            let base = g * group;
            for i in 0..qpg {
                let h = g * qpg + i;
                let dst = &mut q[(r * nh + h) * hd..(r * nh + h + 1) * hd];
                dst.copy_from_slice(&src[base + i * hd..base + (i + 1) * hd]);
                if rotary {
                    rotate_half_in_place(dst, cos, sin);
                }
            }
            let off = slot_off(slot, g);
            let kdst = &mut kv.k[off..off + hd];
            kdst.copy_from_slice(&src[base + qpg * hd..base + (qpg + 1) * hd]);
            if rotary {
                rotate_half_in_place(kdst, cos, sin);
            }
            kv.v[off..off + hd].copy_from_slice(&src[base + (qpg + 1) * hd..base + (qpg + 2) * hd]);
        }
    }

    // Row -> (sequence, position) and each sequence's slot list.
    let bs = step.block_size;
    let mut row_seq = vec![(0usize, 0usize); qkv.rows];
    let mut seq_slots = Vec::with_capacity(step.seqs.len());
    for (si, s) in step.seqs.iter().enumerate() {
        let end = s.start_pos + s.num_rows;
        if s.block_table.len() * bs < end {
            return Err(invalid(format!(
                "block table covers {} of {end} positions",
                s.block_table.len() * bs
            )));
        }
        seq_slots.push(
            (0..end)
                .map(|p| s.block_table[p / bs] as usize * bs + p % bs)
                .collect::<Vec<_>>(),
        );
        for i in 0..s.num_rows {
            row_seq[s.first_row + i] = (si, s.start_pos + i);
        }
    }

    let scale = 1.0 / (hd as f32).sqrt();
    let (k_cache, v_cache) = (&kv.k, &kv.v);
    let mut out = vec![0.0f32; qkv.rows * nh * hd];
    out.par_chunks_mut(hd).enumerate().for_each(|(idx, o)| {
        let (r, h) = (idx / nh, idx % nh);
        let g = h / qpg;
        let (si, pos) = row_seq[r];
        let slots = &seq_slots[si][..=pos];
        let qh = &q[idx * hd..(idx + 1) * hd];
        let slope = attn.alibi_slopes.as_ref().map(|s| s[h]);
        let mut scores: Vec<f32> = slots
            .iter()
            .enumerate()
            .map(|(j, &slot)| {
                let off = slot_off(slot, g);
                let s = dot(qh, &k_cache[off..off + hd]) * scale;
                match slope {
                    Some(m) => s + alibi::bias(m, j, hd),
                    None => s,
                }
            })
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for s in &mut scores {
            *s = (*s - max).exp();
            sum += *s;
        }
        for (j, &slot) in slots.iter().enumerate() {
            let off = slot_off(slot, g);
            let p = scores[j] / sum;
            for (a, &v) in o.iter_mut().zip(&v_cache[off..off + hd]) {
                *a += p * v;
            }
        }
    });
    CpuTensor::new(out, qkv.rows, nh * hd)
}
