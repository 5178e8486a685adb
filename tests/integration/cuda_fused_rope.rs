//! The CUDA backend's fused attention input (`attention_and_gelu` for few rows: the qkv
//! projection applies the rotary and writes the KV cache in its epilogue, beside the
//! MLP up projection) against the same steps through `rope_qkv`: attention outputs, up
//! projections and every later step's results must be the same bits, for one-row steps
//! on CUDA cores and for steps of 1 to 5 rows on the row-invariant tensor cores, at
//! Falcon-7B's MQA geometry, GQA, MHA, head sizes 16 to 128 and without rotary (ALiBi),
//! and on every fixture layout whose layers take it.
//!
//! Without a GPU every test prints `skipped: no CUDA device (<reason>)` and passes.
#![cfg(feature = "cuda")]

use falconer_engine::backend::cuda::CudaBackend;
use falconer_engine::backend::{AttnConfig, Backend, KvLayout};
use falconer_engine::config::{RopeConfig, RopeScaling};
use falconer_engine::posenc::{alibi, rope::Rope};

use crate::common::LAYOUTS;
use crate::cuda_attention::one_sequence_step;
use crate::cuda_golden::{backend, greedy_logits, random, same_bits};
use crate::cuda_sum::upload;

/// Rows of the steps after the prefill: decode steps and verify passes.
const STEPS: [usize; 12] = [1, 1, 3, 1, 5, 1, 1, 2, 1, 4, 1, 1];

/// A 37-token prefill then the `STEPS` through `attention_and_gelu`, on a fresh cache,
/// in row-invariant mode or not: each step's attention output and up projection, and
/// how many fused launches were queued.
fn decode(
    b: &CudaBackend,
    attn: &AttnConfig,
    k: usize,
    fused: bool,
    exact: bool,
) -> (Vec<Vec<f32>>, u64) {
    let (nh, kvh, hd) = (attn.num_heads, attn.num_kv_heads, attn.head_dim);
    let n_qkv = kvh * (nh / kvh + 2) * hd;
    let n_up = 1000;
    let bs = 16;
    let table: Vec<u32> = (0..8).map(|i| (i * 5 + 2) % 8).collect();
    let layout = KvLayout {
        num_layers: 2,
        num_blocks: 8,
        block_size: bs,
        num_kv_heads: kvh,
        head_dim: hd,
    };
    let rope = attn.alibi_slopes.is_none().then(|| {
        let cfg = RopeConfig {
            theta: 10_000.0,
            scaling: RopeScaling::None,
        };
        Rope::new(&cfg, hd)
    });
    let w_qkv = upload(b, n_qkv, k, 21);
    let b_qkv = upload(b, n_qkv, 0, 22);
    let w_up = upload(b, n_up, k, 23);
    let mut kv = b.alloc_kv(&layout).unwrap();
    let was = b.gpu().fuse_rope();
    b.gpu().set_fuse_rope(fused);
    b.gpu().set_row_invariant(exact);
    let before = b.gpu().fused_rope_launches();
    let mut outs = Vec::new();
    let mut start = 0;
    for (i, rows) in std::iter::once(37).chain(STEPS).enumerate() {
        let step = b
            .prepare_step(&one_sequence_step(&table, bs, start, rows, rope.as_ref()))
            .unwrap();
        let x = b
            .upload_hidden(&random(rows * k, 100 + i as u64), rows, k)
            .unwrap();
        // Layer 1 of 2: the cache offset of a layer past the first.
        let (ctx, up) = b
            .attention_and_gelu(
                &x,
                &w_qkv,
                Some(&b_qkv),
                &w_up,
                None,
                &mut kv,
                1,
                &step,
                attn,
            )
            .unwrap();
        outs.push(b.to_host(&ctx).unwrap());
        outs.push(b.to_host(&up).unwrap());
        start += rows;
    }
    let launches = b.gpu().fused_rope_launches() - before;
    b.gpu().set_fuse_rope(was);
    b.gpu().set_row_invariant(false);
    (outs, launches)
}

#[test]
fn cuda_fused_rope_projection_equals_rope_qkv_bit_for_bit() {
    let Some(b) = backend() else { return };
    // (heads, kv heads, head dim, alibi, input width)
    let geometries = [
        (71usize, 1usize, 64usize, false, 4544usize),
        (8, 2, 64, false, 256),
        (4, 4, 128, false, 264),
        (6, 3, 16, false, 64),
        (32, 1, 128, true, 256),
    ];
    for (nh, kvh, hd, use_alibi, k) in geometries {
        let attn = AttnConfig {
            num_heads: nh,
            num_kv_heads: kvh,
            head_dim: hd,
            alibi_slopes: use_alibi.then(|| alibi::slopes(nh)),
        };
        for exact in [false, true] {
            let what = format!("{nh}/{kvh}x{hd}, alibi {use_alibi}, k {k}, row-invariant {exact}");
            let (fused, launches) = decode(&b, &attn, k, true, exact);
            let (plain, none) = decode(&b, &attn, k, false, exact);
            // One-row steps on CUDA cores; in row-invariant mode every step here, on
            // tensor cores (which need K in whole 32-wide chunks).
            let want = match exact {
                false => STEPS.iter().filter(|&&r| r == 1).count(),
                true if k % 32 == 0 => STEPS.len(),
                true => 0,
            };
            assert_eq!(launches, want as u64, "{what}: fused launches");
            assert_eq!(none, 0, "{what}: switched off, no step may take it");
            for (i, (f, p)) in fused.iter().zip(&plain).enumerate() {
                let part = if i % 2 == 0 {
                    "attention"
                } else {
                    "up projection"
                };
                assert!(
                    same_bits(f, p),
                    "{what}: step {} {part} differs from rope_qkv's",
                    i / 2
                );
            }
        }
    }
}

/// Greedy decoding on a fixture (the MLP not forked) with the fused projection on or
/// off: every step's logits, and the number of fused launches.
fn greedy(
    b: &std::sync::Arc<CudaBackend>,
    name: &str,
    fused: bool,
    exact: bool,
) -> (Vec<Vec<f32>>, u64) {
    let was = (b.gpu().fuse_rope(), b.gpu().fork_mlp());
    b.gpu().set_fuse_rope(fused);
    // A forked layer always fuses: compare the unforked layer's two ways.
    b.gpu().set_fork_mlp(false);
    b.gpu().set_row_invariant(exact);
    b.set_step_graphs(false);
    let before = b.gpu().fused_rope_launches();
    let all = greedy_logits(b, name, 30);
    let launches = b.gpu().fused_rope_launches() - before;
    b.gpu().set_fuse_rope(was.0);
    b.gpu().set_fork_mlp(was.1);
    b.gpu().set_row_invariant(false);
    b.set_step_graphs(true);
    (all, launches)
}

#[test]
fn cuda_fused_rope_decoding_equals_unfused_on_every_fixture() {
    let Some(b) = backend() else { return };
    // (The fixtures' head size, 8, is below the tensor-core kernel's 16-feature tiles of
    // rotary pairs: only the one-row CUDA-core route fuses here.)
    let mut fused_layouts = 0;
    for name in LAYOUTS {
        let (fused, launches) = greedy(&b, name, true, false);
        let (plain, none) = greedy(&b, name, false, false);
        assert_eq!(
            none, 0,
            "{name}: switched off, no step may take the fused kernel"
        );
        for (i, (f, p)) in fused.iter().zip(&plain).enumerate() {
            assert!(same_bits(f, p), "{name}: step {i}'s logits differ");
        }
        println!("{name}: {launches} fused launches over 29 decode steps");
        if launches > 0 {
            fused_layouts += 1;
        }
    }
    // The layouts with one shared norm before parallel attention take it.
    assert!(
        fused_layouts >= 5,
        "only {fused_layouts} layouts took the fused projection"
    );
}
