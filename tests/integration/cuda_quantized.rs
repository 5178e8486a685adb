//! Integer weights on the GPU (`WeightFormat::Int8` / `Int4`).
//!
//! Op level: the integer GEMVs (1..16 rows) against host sums over the dequantized
//! weights, for widths that are and are not multiples of 32 (odd ones for int4); many
//! rows through the bf16 dequantization and cuBLAS; the dequantization bit for bit
//! against the host's `bf16::from_f32(q * scale)`; the fused GELU and accumulate
//! epilogues bit for bit against the separate ops; every row of a product equal to the
//! same row alone (row invariance, which exact greedy speculation needs).
//!
//! Model level: quantized fixtures on the GPU against the CPU backend loading the same
//! format (1e-2 relative, as bf16 weights against HF), and the runtime's greedy
//! speculative output equal to plain greedy output with a quantized target.
//!
//! Without a GPU every test prints `skipped: no CUDA device (<reason>)` and passes.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use falconer::engine::error::BackendError;
use falconer::{Device, Runtime, RuntimeError, Speculation, WeightFormat};
use falconer_engine::backend::cuda::kernels::{bf16, Gpu, QuantWeight};
use falconer_engine::backend::cuda::upload_quant_weight;
use falconer_engine::quant::{Quant, QuantMatrix};
use falconer_engine::{CpuBackend, Falcon, LoadOptions, ModelRunner};

use crate::common::{
    fixture, fixture_dir, greedy, prompt_then_steps, prompts, reference, rel_err, tokio_rt, LAYOUTS,
};
use crate::cuda_golden::{backend, report, same_bits, TOL};

/// Deterministic values in (-0.5, 0.5).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn upload(gpu: &Gpu, m: &QuantMatrix) -> QuantWeight {
    upload_quant_weight(gpu, m).unwrap()
}

const QUANTS: [Quant; 3] = [
    Quant::Int8,
    Quant::Int4 { group: 16 },
    Quant::Int4 { group: 64 },
];

#[test]
fn cuda_integer_products_match_host_sums_over_dequantized_weights() {
    let Some(b) = backend() else { return };
    let gpu = b.gpu();
    let was = gpu.row_invariant();
    let mut failures = Vec::new();
    for (n, k) in [(37, 100), (19, 37), (72, 576), (130, 1024)] {
        for quant in QUANTS {
            let m = QuantMatrix::quantize(&values(n * k, 1), n, k, quant).unwrap();
            let d = m.dequantize();
            let w = upload(gpu, &m);
            let bias = values(n, 2);
            let bd = gpu.upload(&bias).unwrap();
            for rows in [1, 3, 8, 11, 16, 40] {
                let x = values(rows * k, 3 + rows as u64);
                let xd = gpu.upload(&x).unwrap();
                let got = gpu
                    .download_f32(&gpu.linear_quant(&xd, rows, &w, Some(&bd), &[]).unwrap())
                    .unwrap();
                // The GEMVs multiply f32 weights and activations; 40 rows go through
                // bf16 weights and activations on cuBLAS.
                let tol = if rows <= 16 { 1e-5 } else { 1e-2 };
                let mut worst = 0.0f64;
                for r in 0..rows {
                    for o in 0..n {
                        let (mut sum, mut mag) = (f64::from(bias[o]), f64::from(bias[o].abs()));
                        for c in 0..k {
                            let p = f64::from(x[r * k + c]) * f64::from(d[o * k + c]);
                            sum += p;
                            mag += p.abs();
                        }
                        worst = worst.max((f64::from(got[r * n + o]) - sum).abs() / mag.max(1e-6));
                    }
                }
                if worst > tol {
                    failures.push(format!(
                        "[{n}, {k}] {quant:?} {rows} rows: error {worst:.2e}"
                    ));
                }
            }
        }
    }
    gpu.set_row_invariant(was);
    report("integer products", &failures);
}

#[test]
fn cuda_dequantization_is_the_hosts_rounding_bit_for_bit() {
    let Some(b) = backend() else { return };
    let gpu = b.gpu();
    for (n, k) in [(19, 37), (72, 576)] {
        for quant in QUANTS {
            let m = QuantMatrix::quantize(&values(n * k, 4), n, k, quant).unwrap();
            let got = gpu
                .download(&gpu.dequantize_bf16(&upload(gpu, &m)).unwrap())
                .unwrap();
            let want: Vec<bf16> = m.dequantize().into_iter().map(bf16::from_f32).collect();
            assert_eq!(got, want, "[{n}, {k}] {quant:?}");
        }
    }
}

#[test]
fn cuda_integer_products_are_row_invariant_and_fuse_exactly() {
    let Some(b) = backend() else { return };
    let gpu = b.gpu();
    let was = gpu.row_invariant();
    let (n, k) = (72, 576);
    for invariant in [false, true] {
        gpu.set_row_invariant(invariant);
        for quant in QUANTS {
            let m = QuantMatrix::quantize(&values(n * k, 5), n, k, quant).unwrap();
            let w = upload(gpu, &m);
            let x = values(16 * k, 6);
            let xd = gpu.upload(&x).unwrap();
            let alone: Vec<Vec<f32>> = (0..16)
                .map(|r| {
                    let xr = gpu.upload(&x[r * k..(r + 1) * k]).unwrap();
                    gpu.download_f32(&gpu.linear_quant(&xr, 1, &w, None, &[]).unwrap())
                        .unwrap()
                })
                .collect();
            for rows in [2, 5, 8, 16] {
                let xs = gpu.upload(&x[..rows * k]).unwrap();
                // Chunks of a step (row-invariant mode splits by them).
                let chunks = [rows / 2, rows - rows / 2];
                let y = gpu.download_f32(&gpu.linear_quant(&xs, rows, &w, None, &chunks).unwrap());
                let y = y.unwrap();
                for (r, want) in alone.iter().enumerate().take(rows) {
                    assert!(
                        same_bits(&y[r * n..(r + 1) * n], want),
                        "{quant:?} invariant={invariant}: row {r} of {rows}"
                    );
                }
            }
            // Epilogues: GELU fused equals the product then GELU; accumulate equals
            // the product then add.
            let plain = gpu.linear_quant(&xd, 16, &w, None, &[]).unwrap();
            let mut gelu = gpu.linear_quant(&xd, 16, &w, None, &[]).unwrap();
            gpu.gelu(&mut gelu).unwrap();
            let fused = gpu.linear_quant_gelu(&xd, 16, &w, None, &[]).unwrap();
            assert!(same_bits(
                &gpu.download_f32(&fused).unwrap(),
                &gpu.download_f32(&gelu).unwrap()
            ));
            let base = values(16 * n, 7);
            let mut acc = gpu.upload(&base).unwrap();
            gpu.linear_quant_accumulate(&xd, 16, &w, None, &mut acc, &[])
                .unwrap();
            let mut sum = gpu.upload(&base).unwrap();
            gpu.add(&mut sum, &plain).unwrap();
            assert!(same_bits(
                &gpu.download_f32(&acc).unwrap(),
                &gpu.download_f32(&sum).unwrap()
            ));
        }
    }
    gpu.set_row_invariant(was);
}

fn logits<B: falconer_engine::Backend>(
    b: Arc<B>,
    name: &str,
    weights: WeightFormat,
) -> Vec<Vec<f32>> {
    let opts = LoadOptions {
        kv_blocks: 64,
        block_size: 4,
        weights,
        ..LoadOptions::default()
    };
    let mut m = ModelRunner::new(Falcon::load(&fixture(name), b, &opts).unwrap());
    prompt_then_steps(&mut m, &reference(name), 4)
}

#[test]
fn cuda_quantized_models_match_the_cpu_backend_in_the_same_format() {
    let Some(b) = backend() else { return };
    let cpu = Arc::new(CpuBackend::new());
    let mut failures = Vec::new();
    for &name in LAYOUTS {
        for weights in [WeightFormat::Int8, WeightFormat::INT4] {
            let got = logits(Arc::clone(&b), name, weights);
            let want = logits(Arc::clone(&cpu), name, weights);
            let worst = got
                .iter()
                .zip(&want)
                .map(|(g, w)| rel_err(g, w))
                .fold(0.0f32, f32::max);
            println!("{name} {weights}: worst rel err {worst:.2e} against the CPU");
            if worst > TOL {
                failures.push(format!("{name} {weights}: {worst}"));
            }
        }
    }
    report("quantized models", &failures);
}

#[test]
fn cuda_greedy_speculative_with_a_quantized_target_equals_plain() {
    tokio_rt().block_on(async {
        for weights in [WeightFormat::Int8, WeightFormat::INT4] {
            let rt = match Runtime::builder()
                .target(fixture_dir("new_arch_gqa_sharded"))
                .draft(fixture_dir("falcon7b_mqa"))
                .weights(weights)
                .device(Device::Cuda(0))
                .block_size(16)
                .load_progress(None)
                .build()
                .await
            {
                Ok(rt) => rt,
                Err(RuntimeError::Backend(BackendError::Unavailable { reason, .. })) => {
                    println!("skipped: no CUDA device ({reason})");
                    return;
                }
                Err(e) => panic!("{e}"),
            };
            for prompt in prompts("new_arch_gqa_sharded") {
                let plain = greedy(&rt, &prompt, 32, Speculation::Off, None).await;
                for k in [None, Some(1), Some(4), Some(8)] {
                    for spec in [Speculation::DraftModel, Speculation::PromptLookup] {
                        let s = greedy(&rt, &prompt, 32, spec, k).await;
                        assert_eq!(s.ids, plain.ids, "{weights} k={k:?} {spec:?}");
                    }
                }
            }
        }
    });
}
