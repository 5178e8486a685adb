//! The CUDA backend's fused residual sum (`linear_add_sum`: attention output and MLP down
//! projections added to the residual stream in one launch for one row) against the same
//! two products run as two accumulating launches, and against the CPU backend.
//!
//! Without a GPU every test prints `skipped: no CUDA device (<reason>)` and passes.
#![cfg(feature = "cuda")]

use falconer_engine::backend::cuda::CudaBackend;
use falconer_engine::backend::Backend;
use falconer_engine::checkpoint::{Dtype, HostTensor};
use falconer_engine::CpuBackend;

use crate::common::rel_err;
use crate::cuda_golden::{backend, bf16_bytes, random};

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
