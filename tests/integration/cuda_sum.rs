//! The CUDA backend's fused residual sum (`linear_add_sum`: attention output and MLP down
//! projections added to the residual stream in one launch for one row) against the same
//! two products run as two accumulating launches, and against the CPU backend; and its
//! overlapped form (the MLP down projection multiplied before the wait for the
//! attention) against the fused sum of the swapped terms, alone and on every fixture.
//!
//! Without a GPU every test prints `skipped: no CUDA device (<reason>)` and passes.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use falconer_engine::backend::cuda::kernels::{bf16, Gpu, SumTerm};
use falconer_engine::backend::cuda::CudaBackend;
use falconer_engine::backend::Backend;
use falconer_engine::checkpoint::{Dtype, HostTensor};
use falconer_engine::CpuBackend;

use crate::common::{rel_err, LAYOUTS};
use crate::cuda_golden::{backend, bf16_bytes, greedy_logits, random, same_bits};

/// A bf16 `[rows, cols]` (or `[rows]` when `cols` is 0) tensor of random values.
pub(crate) fn upload<B: Backend>(b: &B, rows: usize, cols: usize, seed: u64) -> B::Tensor {
    let n = rows * cols.max(1);
    let bytes = bf16_bytes(&random(n, seed));
    let shape2 = [rows, cols];
    let shape1 = [rows];
    let shape: &[usize] = if cols == 0 { &shape1 } else { &shape2 };
    b.upload(&HostTensor {
        dtype: Dtype::Bf16,
        shape,
        bytes: &bytes,
    })
    .unwrap()
}

/// `acc + a_x @ a^T (+ a_bias) + b_x @ b^T (+ b_bias)` on `backend`, fused or not.
fn sum_on<B: Backend>(
    b: &B,
    rows: usize,
    n: usize,
    (ka, kb): (usize, usize),
    biases: bool,
    fused: bool,
) -> Vec<f32> {
    let wa = upload(b, n, ka, 11);
    let wb = upload(b, n, kb, 12);
    let ba = biases.then(|| upload(b, n, 0, 13));
    let bb = biases.then(|| upload(b, n, 0, 14));
    let xa = b.upload_hidden(&random(rows * ka, 15), rows, ka).unwrap();
    let xb = b.upload_hidden(&random(rows * kb, 16), rows, kb).unwrap();
    let mut acc = b.upload_hidden(&random(rows * n, 17), rows, n).unwrap();
    if fused {
        b.linear_add_sum(&xa, &wa, ba.as_ref(), &xb, &wb, bb.as_ref(), &mut acc)
            .unwrap();
    } else {
        b.linear_add(&xa, &wa, ba.as_ref(), &mut acc).unwrap();
        b.linear_add(&xb, &wb, bb.as_ref(), &mut acc).unwrap();
    }
    b.to_host(&acc).unwrap()
}

#[test]
fn cuda_fused_residual_sum_matches_two_accumulating_products() {
    let Some(b) = backend() else { return };
    let cpu = CpuBackend::new();
    let gpu: &CudaBackend = &b;
    // Falcon-7B's shapes, and small ones whose boundary between the two inputs falls
    // inside a lane's round of chunks; one and several rows (the latter never fused).
    for (n, ka, kb) in [
        (4544usize, 4544usize, 18176usize),
        (37, 72, 264),
        (130, 8, 1032),
    ] {
        for rows in [1usize, 3] {
            for biases in [false, true] {
                let want = sum_on(&cpu, rows, n, (ka, kb), biases, false);
                let two = sum_on(gpu, rows, n, (ka, kb), biases, false);
                let one = sum_on(gpu, rows, n, (ka, kb), biases, true);
                let again = sum_on(gpu, rows, n, (ka, kb), biases, true);
                let what = format!("{rows} rows, n {n}, k {ka}+{kb}, biases {biases}");
                assert!(rel_err(&two, &want) < 1e-4, "{what}: two launches vs CPU");
                assert!(rel_err(&one, &want) < 1e-4, "{what}: fused vs CPU");
                assert!(
                    one.iter()
                        .zip(&again)
                        .all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{what}: fused sum is not deterministic"
                );
                if rows > 1 {
                    // Only one-row steps fuse: several rows keep the two launches' bits.
                    assert!(
                        one.iter()
                            .zip(&two)
                            .all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{what}: several rows must take the two launches"
                    );
                }
            }
        }
    }
    // Switched off, a one-row sum is the two launches bit for bit.
    gpu.gpu().set_fuse_sum(false);
    let off = sum_on(gpu, 1, 37, (72, 264), true, true);
    let two = sum_on(gpu, 1, 37, (72, 264), true, false);
    gpu.gpu().set_fuse_sum(true);
    assert!(
        off.iter()
            .zip(&two)
            .all(|(x, y)| x.to_bits() == y.to_bits()),
        "with fusion off, linear_add_sum must equal two linear_add calls"
    );
}

/// One-row fused sums `(n, ka, kb)`: Falcon-7B's, boundaries between the two inputs
/// inside a lane's round of chunks, and each input the shorter one.
pub(crate) const SUM_SHAPES: [(usize, usize, usize); 4] = [
    (4544, 4544, 18176),
    (37, 72, 264),
    (130, 8, 1032),
    (64, 1032, 8),
];

/// `acc + first + second` through [`Gpu::linear_accumulate_sum`] for one row, the second
/// input declared ready before the last kernel (`ready`) or not.
pub(crate) fn gpu_sum(
    gpu: &Gpu,
    n: usize,
    terms: [(&[f32], usize, u64); 2],
    ready: bool,
) -> Vec<f32> {
    let bufs: Vec<_> = terms
        .iter()
        .map(|&(x, k, seed)| {
            let w: Vec<bf16> = random(n * k, seed)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let bias = random(n, seed + 1);
            (
                gpu.upload(x).unwrap(),
                gpu.upload(&w).unwrap(),
                gpu.upload(&bias).unwrap(),
            )
        })
        .collect();
    let term = |i: usize| SumTerm {
        x: &bufs[i].0,
        k: terms[i].1,
        w: &bufs[i].1,
        bias: Some(&bufs[i].2),
    };
    let mut acc = gpu.upload(&random(n, 5)).unwrap();
    gpu.linear_accumulate_sum(1, n, term(0), term(1), &mut acc, &[1], ready)
        .unwrap();
    gpu.download_f32(&acc).unwrap()
}

#[test]
fn cuda_overlapped_sum_equals_the_fused_sum_with_its_terms_swapped() {
    let Some(b) = backend() else { return };
    let gpu = b.gpu();
    let was = gpu.sum_overlap();
    for (n, ka, kb) in SUM_SHAPES {
        let (xa, xb) = (random(ka, 21), random(kb, 22));
        let (a, bt) = ((&xa[..], ka, 31), (&xb[..], kb, 41));
        gpu.set_sum_overlap(true);
        let before = gpu.late_sum_launches();
        let late = gpu_sum(gpu, n, [a, bt], true);
        assert_eq!(gpu.late_sum_launches() - before, 1, "n {n}: not overlapped");
        let swapped = gpu_sum(gpu, n, [bt, a], false);
        let plain = gpu_sum(gpu, n, [a, bt], false);
        gpu.set_sum_overlap(false);
        let off = gpu_sum(gpu, n, [a, bt], true);
        let what = format!("n {n}, k {ka}+{kb}");
        assert!(
            same_bits(&late, &swapped),
            "{what}: the overlapped sum must be the fused sum of (b, a)"
        );
        assert!(rel_err(&late, &plain) < 1e-5, "{what}: vs the plain order");
        assert!(
            same_bits(&off, &plain),
            "{what}: switched off, a ready input changes nothing"
        );
    }
    gpu.set_sum_overlap(was);
}

/// Greedy decoding on a fixture (default kernels but the MLP not forked, steps queued
/// kernel by kernel) with the overlapped sum on or off: every step's logits, and how
/// many overlapped launches ran.
fn greedy_overlap(b: &Arc<CudaBackend>, name: &str, overlap: bool) -> (Vec<Vec<f32>>, u64) {
    let was = (b.gpu().sum_overlap(), b.gpu().fork_mlp());
    b.gpu().set_sum_overlap(overlap);
    // A forked MLP takes no fused sum.
    b.gpu().set_fork_mlp(false);
    b.set_step_graphs(false);
    let before = b.gpu().late_sum_launches();
    let all = greedy_logits(b, name, 30);
    let launches = b.gpu().late_sum_launches() - before;
    b.gpu().set_sum_overlap(was.0);
    b.gpu().set_fork_mlp(was.1);
    b.set_step_graphs(true);
    (all, launches)
}

#[test]
fn cuda_overlapped_sum_decodes_every_fixture_like_the_plain_sum() {
    let Some(b) = backend() else { return };
    let mut overlapped = 0;
    for name in LAYOUTS {
        let (on, launches) = greedy_overlap(&b, name, true);
        let (again, _) = greedy_overlap(&b, name, true);
        let (off, none) = greedy_overlap(&b, name, false);
        let (off_again, _) = greedy_overlap(&b, name, false);
        assert_eq!(none, 0, "{name}: switched off, no step may overlap");
        // Both ways checked before either fails, so that a failure says which repeats.
        let differs =
            |a: &[Vec<f32>], b: &[Vec<f32>]| a.iter().zip(b).position(|(x, y)| !same_bits(x, y));
        let (d_on, d_off) = (differs(&on, &again), differs(&off, &off_again));
        assert!(
            d_on.is_none() && d_off.is_none(),
            "{name}: first step that differs between two runs: overlapped {d_on:?}, plain {d_off:?}"
        );
        for (i, (x, z)) in on.iter().zip(&off).enumerate() {
            let e = rel_err(x, z);
            assert!(e < 1e-3, "{name}: step {i}'s logits off by {e:.2e}");
        }
        println!("{name}: {launches} overlapped sums over 29 decode steps");
        if launches > 0 {
            overlapped += 1;
        }
    }
    // The layouts with one shared norm before parallel attention take it.
    assert!(
        overlapped >= 5,
        "only {overlapped} layouts took the overlapped sum"
    );
}
