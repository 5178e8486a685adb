//! The CUDA backend against HF transformers and against the CPU reference backend.
//!
//! Model level, on every fixture layout: prefill and decode logits within 1e-2 relative
//! (bf16 weights and KV cache), greedy continuations identical (a flip is tolerated
//! only at a bf16 near tie, and reported), verify passes equal to one-at-a-time decoding,
//! truncate-then-redecode, copy-on-write forks, batched sequences, and the KV cache's
//! bytes per token.
//!
//! Op level, against the CPU backend on random data in shapes the fixtures do not
//! reach: the GEMV and cuBLAS paths of `linear` (attention: `cuda_attention`).
//!
//! Without a GPU or CUDA libraries (CI, the development machine) every test prints
//! `skipped: no CUDA device (<reason>)` and passes. Run with `--test-threads=1` on a GPU.
#![cfg(feature = "cuda")]

use std::sync::{Arc, OnceLock};

use falconer_engine::backend::cuda::kernels::{bf16, GemvKernel};
use falconer_engine::backend::cuda::CudaBackend;
use falconer_engine::backend::Backend;
use falconer_engine::checkpoint::{Dtype, HostTensor};
use falconer_engine::error::BackendError;
use falconer_engine::sampling::{argmax, greedy_token};
use falconer_engine::{CpuBackend, Falcon, LoadOptions, ModelRunner, SeqWork};

use crate::common::{fixture, reference, rel_err, LAYOUTS};

pub(crate) const TOL: f32 = 1e-2;

/// One backend for the whole test binary (context, kernels and cuBLAS set up once), or
/// the reason there is none.
pub(crate) fn backend() -> Option<Arc<CudaBackend>> {
    static B: OnceLock<Result<Arc<CudaBackend>, String>> = OnceLock::new();
    let b = B.get_or_init(|| match CudaBackend::new(0) {
        Ok(b) => Ok(Arc::new(b)),
        Err(BackendError::Unavailable { reason, .. }) => Err(reason),
        Err(e) => panic!("CUDA backend failed on a machine that has CUDA: {e}"),
    });
    match b {
        Ok(b) => Some(Arc::clone(b)),
        Err(reason) => {
            println!("skipped: no CUDA device ({reason})");
            None
        }
    }
}

pub(crate) fn cuda_runner(b: &Arc<CudaBackend>, name: &str) -> ModelRunner<CudaBackend> {
    let opts = LoadOptions {
        kv_blocks: 64,
        block_size: 4,
        ..LoadOptions::default()
    };
    let model = Falcon::load(&fixture(name), Arc::clone(b), &opts).unwrap();
    ModelRunner::new(model)
}

fn work(seq: u64, tokens: &[u32], all_logits: bool) -> SeqWork<'_> {
    SeqWork {
        seq,
        tokens,
        all_logits,
    }
}

/// Prints one line per layout and fails at the end, so that one run shows every
/// layout's numbers even when several fail.
pub(crate) fn report(what: &str, failures: &[String]) {
    assert!(failures.is_empty(), "{what} failed for: {failures:#?}");
}

/// Greedy decoding of `steps` steps on a fixture from the prompt 1..=9, one step at a
/// time on the GPU as configured: every step's last logits.
pub(crate) fn greedy_logits(b: &Arc<CudaBackend>, name: &str, steps: usize) -> Vec<Vec<f32>> {
    let mut m = cuda_runner(b, name);
    m.add_sequence(1).unwrap();
    let mut tokens: Vec<u32> = (1..=9).collect();
    let mut all = Vec::new();
    for _ in 0..steps {
        let out = m
            .forward(&[SeqWork {
                seq: 1,
                tokens: &tokens,
                all_logits: false,
            }])
            .unwrap();
        let last = out[0].last().to_vec();
        tokens = vec![argmax(&last) as u32];
        all.push(last);
    }
    all
}

/// Whether two rows hold the same values bit for bit.
pub(crate) fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// A fixture's prompt then a verify pass over its first 6 greedy tokens, and the same
/// tokens one step at a time on a second sequence: (verify rows, one-step rows).
pub(crate) fn verify_and_one_at_a_time(
    b: &Arc<CudaBackend>,
    name: &str,
) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let r = reference(name);
    let mut m = cuda_runner(b, name);
    let new = &r.greedy_ids[..6];
    m.add_sequence(1).unwrap();
    m.forward(&[work(1, &r.prompt_ids, false)]).unwrap();
    let verify = m.forward(&[work(1, new, true)]).unwrap();
    m.add_sequence(2).unwrap();
    m.forward(&[work(2, &r.prompt_ids, false)]).unwrap();
    let ones = new
        .iter()
        .map(|t| {
            m.forward(&[work(2, &[*t], false)]).unwrap()[0]
                .last()
                .to_vec()
        })
        .collect();
    let rows = (0..new.len()).map(|i| verify[0].row(i).to_vec()).collect();
    (rows, ones)
}

#[test]
fn cuda_prefill_and_decode_logits_match_transformers() {
    let Some(b) = backend() else { return };
    let mut failures = Vec::new();
    for &name in LAYOUTS {
        let r = reference(name);
        let mut m = cuda_runner(&b, name);
        m.add_sequence(1).unwrap();
        let pre = m.forward(&[work(1, &r.prompt_ids, true)]).unwrap();
        assert_eq!(pre[0].num_rows(), r.prompt_ids.len());
        let prefill = r
            .prefill_logits
            .iter()
            .enumerate()
            .map(|(i, want)| rel_err(pre[0].row(i), want))
            .fold(0.0f32, f32::max);
        let mut decode = 0.0f32;
        for (i, want) in r.decode_step_logits.iter().enumerate() {
            let out = m.forward(&[work(1, &[r.greedy_ids[i]], false)]).unwrap();
            decode = decode.max(rel_err(out[0].last(), want));
        }
        println!(
            "{name}: logits rel err vs transformers: prefill {prefill:.2e}, decode {decode:.2e}"
        );
        if prefill >= TOL || decode >= TOL {
            failures.push(format!(
                "{name}: prefill {prefill:.3e}, decode {decode:.3e}"
            ));
        }
    }
    report("logits within 1e-2", &failures);
}

#[test]
fn cuda_greedy_continuations_match_transformers() {
    let Some(b) = backend() else { return };
    let mut failures = Vec::new();
    for &name in LAYOUTS {
        let r = reference(name);
        let mut m = cuda_runner(&b, name);
        m.add_sequence(7).unwrap();
        let mut next = r.prompt_ids.clone();
        for (i, &want) in r.greedy_ids.iter().enumerate() {
            let out = m.forward(&[work(7, &next, false)]).unwrap();
            let logits = out[0].last();
            let got = argmax(logits);
            if got != want {
                // A flip is acceptable only where bf16 rounding can decide it: the two
                // candidates' logits within 1e-2 of the logit scale.
                let scale = logits.iter().fold(0.0f32, |a, v| a.max(v.abs()));
                let margin = (logits[got as usize] - logits[want as usize]).abs() / scale;
                println!(
                    "{name}: greedy token {i} is {got}, transformers {want}: margin \
                     {margin:.2e} of the logit scale {scale:.3} (tokens before it match)"
                );
                if margin >= 1e-2 {
                    failures.push(format!(
                        "{name}: token {i} flipped with margin {margin:.3e}"
                    ));
                }
                break;
            }
            next = vec![got];
        }
        m.remove_sequence(7).unwrap();
        assert_eq!(m.pool().used_blocks(), 0, "{name}: blocks leaked");
    }
    report("greedy continuations", &failures);
}

#[test]
fn cuda_verify_pass_equals_one_token_at_a_time() {
    let Some(b) = backend() else { return };
    let mut failures = Vec::new();
    for &name in LAYOUTS {
        let (verify, ones) = verify_and_one_at_a_time(&b, name);
        let worst = verify
            .iter()
            .zip(&ones)
            .fold(0.0f32, |w, (v, o)| w.max(rel_err(v, o)));
        println!("{name}: verify vs one-at-a-time worst rel err {worst:.2e}");
        if worst >= TOL {
            failures.push(format!("{name}: {worst:.3e}"));
        }
    }
    report("verify == one at a time", &failures);
}

/// Greedy tokens from the device's argmax equal the host's argmax of the same pass's
/// logits, for prefill and verify rows, on every layout; and the kernel follows the
/// host's rules on ties, NaN, -0.0 and rows without a usable logit.
#[test]
fn cuda_device_argmax_equals_host_argmax() {
    let Some(b) = backend() else { return };
    for &name in LAYOUTS {
        let r = reference(name);
        let mut m = cuda_runner(&b, name);
        m.add_sequence(1).unwrap();
        m.add_sequence(2).unwrap();
        let logits = m.forward(&[work(1, &r.prompt_ids, true)]).unwrap();
        let ids = m.forward_greedy(&[work(2, &r.prompt_ids, true)]).unwrap();
        let want: Vec<Option<u32>> = (0..logits[0].num_rows())
            .map(|i| Some(argmax(logits[0].row(i))))
            .collect();
        assert_eq!(
            ids[0], want,
            "{name}: device argmax differs from the host's"
        );
    }
    let v = 5000;
    let mut rows: Vec<Vec<f32>> = (0..6u64).map(|s| random(v, 40 + s)).collect();
    rows[1][17] = 3.0; // a tie: the first index wins
    rows[1][4000] = 3.0;
    rows[2].iter_mut().for_each(|x| *x = f32::NAN);
    rows[3].iter_mut().for_each(|x| *x = f32::NEG_INFINITY);
    rows[4]
        .iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x = if i % 3 == 0 { f32::NAN } else { 0.0 });
    rows[4][1] = -0.0;
    rows[5][v - 1] = f32::INFINITY;
    let flat: Vec<f32> = rows.concat();
    let t = b.upload_hidden(&flat, rows.len(), v).unwrap();
    let got = b.argmax_rows(&t, v).unwrap();
    let want: Vec<Option<u32>> = rows.iter().map(|r| greedy_token(r)).collect();
    assert_eq!(got, want);
    // A tie goes to the first index; all NaN or all -inf is no usable logit.
    assert_eq!(&got[1..4], &[Some(17), None, None]);
}

#[test]
fn cuda_truncate_then_redecode_equals_never_decoded() {
    let Some(b) = backend() else { return };
    let mut failures = Vec::new();
    for &name in LAYOUTS {
        let r = reference(name);
        let mut m = cuda_runner(&b, name);
        m.add_sequence(1).unwrap();
        m.forward(&[work(1, &r.prompt_ids, false)]).unwrap();
        let n = r.prompt_ids.len();
        m.forward(&[work(1, &[3, 5, 7, 11, 13], true)]).unwrap();
        m.truncate(1, n).unwrap();
        assert_eq!(m.cached_len(1).unwrap(), n);
        let out = m.forward(&[work(1, &[r.greedy_ids[0]], false)]).unwrap();
        let e = rel_err(out[0].last(), &r.decode_step_logits[0]);
        println!("{name}: after truncate rel err vs transformers {e:.2e}");
        if e >= TOL {
            failures.push(format!("{name}: {e:.3e}"));
        }
    }
    report("truncate then redecode", &failures);
}

#[test]
fn cuda_fork_copies_shared_block_on_write() {
    let Some(b) = backend() else { return };
    let mut failures = Vec::new();
    for name in ["falcon7b_mqa", "new_arch_gqa_sharded", "alibi_rw"] {
        let r = reference(name);
        let mut m = cuda_runner(&b, name);
        // 18 prompt tokens in blocks of 4: the last block is half full and shared.
        let prompt = &r.prompt_ids[..18];
        m.add_sequence(1).unwrap();
        m.forward(&[work(1, prompt, false)]).unwrap();
        m.fork(1, 2, 18).unwrap();
        let child = m.forward(&[work(2, &[r.prompt_ids[18]], false)]).unwrap();
        let parent = m.forward(&[work(1, &[r.prompt_ids[18]], false)]).unwrap();
        m.add_sequence(3).unwrap();
        let fresh = m.forward(&[work(3, &r.prompt_ids[..19], false)]).unwrap();
        let e1 = rel_err(child[0].last(), fresh[0].last());
        let e2 = rel_err(parent[0].last(), fresh[0].last());
        println!("{name}: fork vs fresh rel err: child {e1:.2e}, parent {e2:.2e}");
        if e1 >= TOL || e2 >= TOL {
            failures.push(format!("{name}: child {e1:.3e}, parent {e2:.3e}"));
        }
    }
    report("copy-on-write fork", &failures);
}

#[test]
fn cuda_batched_sequences_match_their_solo_runs() {
    let Some(b) = backend() else { return };
    let name = "new_arch_gqa_sharded";
    let r = reference(name);
    let mut m = cuda_runner(&b, name);
    m.add_sequence(1).unwrap();
    m.add_sequence(2).unwrap();
    let short = &r.prompt_ids[..9];
    let out = m
        .forward(&[work(1, &r.prompt_ids, true), work(2, short, true)])
        .unwrap();
    for (i, want) in r.prefill_logits.iter().enumerate() {
        assert!(rel_err(out[0].row(i), want) < TOL, "row {i}");
    }
    for (i, want) in r.prefill_logits[..9].iter().enumerate() {
        assert!(rel_err(out[1].row(i), want) < TOL, "short row {i}");
    }
}

#[test]
fn cuda_kv_cache_holds_exactly_the_kv_heads_in_bf16() {
    let Some(b) = backend() else { return };
    for &name in LAYOUTS {
        let m = cuda_runner(&b, name);
        let cfg = m.model().config().clone();
        let layout = m.model().kv_layout();
        let kv = b.alloc_kv(&layout).unwrap();
        let per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2;
        assert_eq!(kv.bytes_per_token(), per_token, "{name}");
        assert_eq!(kv.bytes_per_token(), cfg.kv_bytes_per_token(2), "{name}");
        assert_eq!(kv.byte_size(), per_token * layout.num_slots(), "{name}");
    }
}

/// Deterministic pseudo-random values in (-1, 1), rounded to bf16 so that both backends
/// start from identical numbers.
pub(crate) fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            bf16::from_f32(2.0 * u - 1.0).to_f32()
        })
        .collect()
}

pub(crate) fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
        .collect()
}

#[test]
fn cuda_linear_matches_cpu_on_both_paths_and_fused_epilogues_change_no_bit() {
    let Some(b) = backend() else { return };
    let cpu = CpuBackend::new();
    for (n, k) in [(200usize, 320usize), (67, 36), (4672, 4544), (1000, 18176)] {
        let w = random(n * k, 1);
        let bias = random(n, 2);
        let wb = bf16_bytes(&w);
        let shape = [n, k];
        let wt = HostTensor {
            dtype: Dtype::Bf16,
            shape: &shape,
            bytes: &wb,
        };
        let bshape = [n];
        let bb = bf16_bytes(&bias);
        let bt = HostTensor {
            dtype: Dtype::Bf16,
            shape: &bshape,
            bytes: &bb,
        };
        let (gw, gb) = (b.upload(&wt).unwrap(), b.upload(&bt).unwrap());
        let (cw, cb) = (cpu.upload(&wt).unwrap(), cpu.upload(&bt).unwrap());
        // A second weight of another height for the two-product launch.
        let n2 = n / 3 + 5;
        let w2 = bf16_bytes(&random(n2 * k, 4));
        let shape2 = [n2, k];
        let gw2 = b
            .upload(&HostTensor {
                dtype: Dtype::Bf16,
                shape: &shape2,
                bytes: &w2,
            })
            .unwrap();
        for rows in [1usize, 2, 3, 4, 5, 7, 8, 9, 40, 100] {
            let x = random(rows * k, 3 + rows as u64);
            let want = cpu
                .to_host(
                    &cpu.linear(&cpu.upload_hidden(&x, rows, k).unwrap(), &cw, Some(&cb))
                        .unwrap(),
                )
                .unwrap();
            let gx = b.upload_hidden(&x, rows, k).unwrap();
            // Both few-row kernels: tensor cores (activations split into bf16 hi + lo,
            // split-K with a deterministic last-block reduction) and CUDA cores.
            for kernel in [GemvKernel::Tc4, GemvKernel::Simt] {
                b.gpu().set_gemv_kernel(kernel);
                let got = b.to_host(&b.linear(&gx, &gw, Some(&gb)).unwrap()).unwrap();
                let again = b.to_host(&b.linear(&gx, &gw, Some(&gb)).unwrap()).unwrap();
                // GEMV (few rows or a small problem): f32 activations (or hi + lo), only
                // the summation order differs. Otherwise cuBLAS takes them in bf16.
                let tol = if rows <= 8 || rows * n * k <= 1 << 26 {
                    1e-4
                } else {
                    1e-2
                };
                let e = rel_err(&got, &want);
                assert!(
                    e < tol,
                    "linear {rows}x{k} @ {n}x{k} ({kernel:?}): rel err {e}"
                );
                assert!(
                    same_bits(&got, &again),
                    "linear {rows}x{k} @ {n}x{k} ({kernel:?}) is not deterministic"
                );
                // The fused epilogues change no bit.
                let mut h = b.linear(&gx, &gw, Some(&gb)).unwrap();
                b.gelu(&mut h).unwrap();
                let fused = b.linear_gelu(&gx, &gw, Some(&gb)).unwrap();
                assert!(
                    same_bits(&b.to_host(&fused).unwrap(), &b.to_host(&h).unwrap()),
                    "linear_gelu {rows}x{k} @ {n}x{k} ({kernel:?}) differs from linear + gelu"
                );
                let acc0 = random(rows * n, 99);
                let mut acc = b.upload_hidden(&acc0, rows, n).unwrap();
                b.linear_add(&gx, &gw, Some(&gb), &mut acc).unwrap();
                let mut sum = b.upload_hidden(&acc0, rows, n).unwrap();
                b.add(&mut sum, &b.linear(&gx, &gw, Some(&gb)).unwrap())
                    .unwrap();
                assert!(
                    same_bits(&b.to_host(&acc).unwrap(), &b.to_host(&sum).unwrap()),
                    "linear_add {rows}x{k} @ {n}x{k} ({kernel:?}) differs from linear + add"
                );
            }
            b.gpu().set_gemv_kernel(GemvKernel::Auto);
            // Two products of one input (one launch for few rows): each the bits of its
            // own call, in the default and in the row-invariant kernels.
            for exact in [false, true] {
                b.gpu().set_row_invariant(exact);
                let (pa, pb) = b.linear_and_gelu(&gx, &gw, Some(&gb), &gw2, None).unwrap();
                let alone_a = b.linear(&gx, &gw, Some(&gb)).unwrap();
                let alone_b = b.linear_gelu(&gx, &gw2, None).unwrap();
                for (pair, alone, what) in [(pa, alone_a, "first"), (pb, alone_b, "second")] {
                    assert!(
                        same_bits(&b.to_host(&pair).unwrap(), &b.to_host(&alone).unwrap()),
                        "linear_and_gelu {rows}x{k} (n {n} and {n2}, row-invariant {exact}): \
                         the {what} product differs from its own call"
                    );
                }
            }
            b.gpu().set_row_invariant(false);
        }
    }
}

/// In row-invariant mode (the runtime's), a verify pass gives every row the logits a
/// one-token step gives it, bit for bit, on every fixture layout; and a product of 1 to
/// 16 rows gives each row the bits of that row alone, at Falcon-7B's qkv shape.
#[test]
fn cuda_row_invariant_mode_gives_every_row_the_same_bits() {
    let Some(b) = backend() else { return };
    b.gpu().set_row_invariant(true);
    let (n, k) = (4672usize, 4544usize);
    let w = random(n * k, 11);
    let shape = [n, k];
    let wb = bf16_bytes(&w);
    let gw = b
        .upload(&HostTensor {
            dtype: Dtype::Bf16,
            shape: &shape,
            bytes: &wb,
        })
        .unwrap();
    let x = random(16 * k, 12);
    let alone: Vec<Vec<f32>> = (0..16)
        .map(|r| {
            let gx = b.upload_hidden(&x[r * k..(r + 1) * k], 1, k).unwrap();
            b.to_host(&b.linear(&gx, &gw, None).unwrap()).unwrap()
        })
        .collect();
    for rows in 1..=16 {
        let gx = b.upload_hidden(&x[..rows * k], rows, k).unwrap();
        let y = b.to_host(&b.linear(&gx, &gw, None).unwrap()).unwrap();
        for (r, want) in alone.iter().enumerate().take(rows) {
            assert!(
                same_bits(&y[r * n..(r + 1) * n], want),
                "row {r} of {rows} differs from the row alone"
            );
        }
    }
    for &name in LAYOUTS {
        let (verify, ones) = verify_and_one_at_a_time(&b, name);
        for (i, (v, o)) in verify.iter().zip(&ones).enumerate() {
            assert!(
                same_bits(v, o),
                "{name}: verify row {i} differs from the one-token step"
            );
        }
    }
    b.gpu().set_row_invariant(false);
}

/// Row-invariant mode with a step's chunks: each chunk of a batched product gets the
/// bits it gets alone, whether it takes cuBLAS (prefill-sized) or the GEMV (decode and
/// verify rows, however many of them are batched).
#[test]
fn cuda_batched_chunks_get_the_bits_they_get_alone() {
    use falconer_engine::backend::cuda::CudaData;
    let Some(b) = backend() else { return };
    let gpu = b.gpu();
    gpu.set_row_invariant(true);
    let (n, k) = (4672usize, 4544usize);
    let shape = [n, k];
    let wb = bf16_bytes(&random(n * k, 21));
    let w = b
        .upload(&HostTensor {
            dtype: Dtype::Bf16,
            shape: &shape,
            bytes: &wb,
        })
        .unwrap();
    let CudaData::Bf16(w) = w.data() else {
        panic!("weights not bf16")
    };
    let groups = [40usize, 1, 1, 20, 3, 15];
    let rows: usize = groups.iter().sum();
    let x = random(rows * k, 22);
    let product = |x: &[f32], rows: usize, groups: &[usize]| {
        let xt = b.upload_hidden(x, rows, k).unwrap();
        let CudaData::F32(xd) = xt.data() else {
            panic!("not f32")
        };
        let y = gpu.linear(xd, rows, k, w, n, None, groups).unwrap();
        gpu.download_f32(&y).unwrap()
    };
    let batched = product(&x, rows, &groups);
    let mut at = 0;
    for g in groups {
        let alone = product(&x[at * k..(at + g) * k], g, &[]);
        assert!(
            same_bits(&batched[at * n..(at + g) * n], &alone),
            "the chunk of {g} rows at row {at} differs from the chunk alone"
        );
        at += g;
    }
    gpu.set_row_invariant(false);
}
