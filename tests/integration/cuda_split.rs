//! The one-row CUDA-core GEMVs with several warps sharing each output's row
//! (`GemvSplit`): the standalone product and the fused residual sum (plain and
//! overlapped) against one warp per row, on shapes whose rows are longer than their
//! output count (where the split applies by default), including slices left empty and
//! groups past the last output; the split applied to every GEMV (`set_gemv_split_all`:
//! short rows and the paired products); and greedy decoding of every fixture with each.
//!
//! Without a GPU every test prints `skipped: no CUDA device (<reason>)` and passes.
#![cfg(feature = "cuda")]

use falconer_engine::backend::cuda::kernels::{bf16, GemvSplit, Gpu, PairHalf};

use crate::common::{rel_err, LAYOUTS};
use crate::cuda_golden::{backend, greedy_logits, random, same_bits};
use crate::cuda_sum::{gpu_sum, SUM_SHAPES};

const SPLITS: [GemvSplit; 3] = [GemvSplit::One, GemvSplit::Two, GemvSplit::Four];

/// Runs `f` with the split `split`, applied to every GEMV or not (`all`).
fn with_split<T>(gpu: &Gpu, split: GemvSplit, all: bool, f: impl FnOnce() -> T) -> T {
    let was = (gpu.gemv_split(), gpu.gemv_split_all());
    gpu.set_gemv_split(split);
    gpu.set_gemv_split_all(all);
    let out = f();
    gpu.set_gemv_split(was.0);
    gpu.set_gemv_split_all(was.1);
    out
}

/// One row's `x @ w^T + bias` of `n` outputs over `k` inputs with the split `split`.
fn product_on(gpu: &Gpu, n: usize, k: usize, split: GemvSplit, all: bool) -> Vec<f32> {
    let w: Vec<bf16> = random(n * k, 3).into_iter().map(bf16::from_f32).collect();
    let w = gpu.upload(&w).unwrap();
    let x = gpu.upload(&random(k, 4)).unwrap();
    let bias = gpu.upload(&random(n, 6)).unwrap();
    let y = with_split(gpu, split, all, || {
        gpu.linear(&x, 1, k, &w, n, Some(&bias), &[]).unwrap()
    });
    gpu.download_f32(&y).unwrap()
}

fn product(gpu: &Gpu, n: usize, k: usize, split: GemvSplit) -> Vec<f32> {
    product_on(gpu, n, k, split, false)
}

/// One row's paired products (the second through GELU) with the split `split` applied
/// to every GEMV: both outputs, concatenated.
fn pair(gpu: &Gpu, (na, nb, k): (usize, usize, usize), split: GemvSplit) -> Vec<f32> {
    let upload = |n: usize, seed| {
        let w: Vec<bf16> = random(n * k, seed)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        (
            gpu.upload(&w).unwrap(),
            gpu.upload(&random(n, seed + 1)).unwrap(),
        )
    };
    let (wa, ba) = upload(na, 51);
    let (wb, bb) = upload(nb, 61);
    let x = gpu.upload(&random(k, 71)).unwrap();
    let (ya, yb) = with_split(gpu, split, true, || {
        let a = PairHalf {
            w: &wa,
            n: na,
            bias: Some(&ba),
            gelu: false,
        };
        let b = PairHalf {
            w: &wb,
            n: nb,
            bias: Some(&bb),
            gelu: true,
        };
        gpu.linear_pair(&x, 1, k, a, b, &[1]).unwrap()
    });
    let mut out = gpu.download_f32(&ya).unwrap();
    out.extend(gpu.download_f32(&yb).unwrap());
    out
}

/// The same product on the host, in f64 from the bf16 weights.
fn host_product(n: usize, k: usize) -> Vec<f32> {
    let w: Vec<f32> = random(n * k, 3)
        .into_iter()
        .map(|v| bf16::from_f32(v).to_f32())
        .collect();
    let (x, bias) = (random(k, 4), random(n, 6));
    (0..n)
        .map(|i| {
            let dot: f64 = (0..k)
                .map(|j| f64::from(w[i * k + j]) * f64::from(x[j]))
                .sum();
            (dot + f64::from(bias[i])) as f32
        })
        .collect()
}

#[test]
fn cuda_split_gemv_matches_one_warp_per_row() {
    let Some(b) = backend() else { return };
    let gpu = b.gpu();
    // Falcon-7B's MLP down projection; outputs that leave part of the last block empty;
    // rows too short for every warp to get a slice (264 inputs: 33 chunks of 8).
    for (n, k) in [(4544usize, 18176usize), (37, 264), (130, 1032), (5, 8000)] {
        let want = host_product(n, k);
        let one = product(gpu, n, k, GemvSplit::One);
        assert!(
            rel_err(&one, &want) < 1e-5,
            "n {n}, k {k}: one warp vs host"
        );
        for split in [GemvSplit::Two, GemvSplit::Four] {
            let got = product(gpu, n, k, split);
            let again = product(gpu, n, k, split);
            let what = format!("n {n}, k {k}, {split:?}");
            assert!(rel_err(&got, &want) < 1e-5, "{what}: vs host");
            assert!(same_bits(&got, &again), "{what}: not deterministic");
        }
    }
    // Rows no longer than the output count keep one warp per row, whatever the setting.
    let one = product(gpu, 256, 256, GemvSplit::One);
    let four = product(gpu, 256, 256, GemvSplit::Four);
    assert!(same_bits(&one, &four), "a square product must not split");
}

#[test]
fn cuda_split_applied_to_every_gemv_matches_one_warp_per_row() {
    let Some(b) = backend() else { return };
    let gpu = b.gpu();
    // Rows shorter than (or as long as) the output count: Falcon-7B's qkv projection,
    // outputs that leave part of the last block empty, rows of one chunk per lane or less.
    for (n, k) in [(4672usize, 4544usize), (256, 256), (1001, 64), (130, 8)] {
        let want = host_product(n, k);
        for split in SPLITS {
            let got = product_on(gpu, n, k, split, true);
            let again = product_on(gpu, n, k, split, true);
            let what = format!("n {n}, k {k}, {split:?} on every GEMV");
            assert!(rel_err(&got, &want) < 1e-5, "{what}: vs host");
            assert!(same_bits(&got, &again), "{what}: not deterministic");
        }
    }
    // The paired products (qkv and MLP up projection in one launch).
    for shape in [
        (4672usize, 18176usize, 4544usize),
        (37, 130, 264),
        (8, 3, 16),
    ] {
        let one = pair(gpu, shape, GemvSplit::One);
        for split in [GemvSplit::Two, GemvSplit::Four] {
            let got = pair(gpu, shape, split);
            let again = pair(gpu, shape, split);
            let what = format!("pair {shape:?}, {split:?}");
            assert!(rel_err(&got, &one) < 1e-5, "{what}: vs one warp per row");
            assert!(same_bits(&got, &again), "{what}: not deterministic");
        }
    }
}

#[test]
fn cuda_split_fused_sum_matches_one_warp_per_row() {
    let Some(b) = backend() else { return };
    let gpu = b.gpu();
    let (was_split, was_overlap) = (gpu.gemv_split(), gpu.sum_overlap());
    for (n, ka, kb) in SUM_SHAPES {
        let (xa, xb) = (random(ka, 21), random(kb, 22));
        let (a, bt) = ((&xa[..], ka, 31), (&xb[..], kb, 41));
        gpu.set_sum_overlap(false);
        gpu.set_gemv_split(GemvSplit::One);
        let one = gpu_sum(gpu, n, [a, bt], false);
        for split in SPLITS {
            gpu.set_gemv_split(split);
            gpu.set_sum_overlap(false);
            let plain = gpu_sum(gpu, n, [a, bt], false);
            let again = gpu_sum(gpu, n, [a, bt], false);
            let swapped = gpu_sum(gpu, n, [bt, a], false);
            gpu.set_sum_overlap(true);
            let late = gpu_sum(gpu, n, [a, bt], true);
            let what = format!("n {n}, k {ka}+{kb}, {split:?}");
            assert!(rel_err(&plain, &one) < 1e-5, "{what}: vs one warp per row");
            assert!(same_bits(&plain, &again), "{what}: not deterministic");
            assert!(
                same_bits(&late, &swapped),
                "{what}: the overlapped sum must be the fused sum of (b, a) of the same split"
            );
        }
    }
    gpu.set_gemv_split(was_split);
    gpu.set_sum_overlap(was_overlap);
}

#[test]
fn cuda_split_gemv_decodes_every_fixture_like_one_warp_per_row() {
    let Some(b) = backend() else { return };
    let gpu = b.gpu();
    for name in LAYOUTS {
        let one = with_split(gpu, GemvSplit::One, false, || greedy_logits(&b, name, 20));
        for (split, all) in [
            (GemvSplit::Two, false),
            (GemvSplit::Four, false),
            (GemvSplit::Two, true),
            (GemvSplit::Four, true),
        ] {
            let got = with_split(gpu, split, all, || greedy_logits(&b, name, 20));
            let again = with_split(gpu, split, all, || greedy_logits(&b, name, 20));
            let what = format!("{name}, {split:?}, every GEMV {all}");
            let differs = got.iter().zip(&again).position(|(x, y)| !same_bits(x, y));
            assert!(
                differs.is_none(),
                "{what}: step {differs:?} differs between two runs"
            );
            for (i, (x, z)) in got.iter().zip(&one).enumerate() {
                let e = rel_err(x, z);
                assert!(e < 1e-3, "{what}: step {i}'s logits off by {e:.2e}");
            }
        }
    }
}
