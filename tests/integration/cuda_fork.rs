//! Work forked onto a second stream (`Gpu::fork`) and the layer that uses it, the MLP
//! down projection beside the attention (`Gpu::set_fork_mlp`, on by default, its qkv
//! projection storing the rotary itself): the fork starts after what the main stream
//! queued before it and the join orders it before what follows; greedy decoding on
//! every fixture matches the unforked layer (fused sum, `rope_qkv`), gives the same bits
//! on every run, and the same bits again when the steps are replayed as CUDA graphs
//! (the fork and join recorded as graph edges). With `Gpu::set_fork_wide` (on by
//! default; the tests switch it themselves) the whole MLP forks under separate norms
//! and changes no bit; in row-invariant mode (the runtime's) forked products take
//! scratch and arrival counters reserved before the fork, and a forked layer changes no
//! bit: decode and verify steps equal the unforked ones.
//!
//! Without a GPU every test prints `skipped: no CUDA device (<reason>)` and passes.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use falconer_engine::backend::cuda::kernels::{bf16, DeviceBuffer, Gpu, PairHalf};
use falconer_engine::backend::cuda::CudaBackend;

use crate::common::{rel_err, LAYOUTS};
use crate::cuda_golden::{backend, greedy_logits, random, same_bits, verify_and_one_at_a_time};
use crate::cuda_graphs::replays_match;

fn weights(gpu: &Gpu, n: usize, k: usize, seed: u64) -> DeviceBuffer<bf16> {
    let w: Vec<bf16> = random(n * k, seed)
        .into_iter()
        .map(|v| bf16::from_f32(v * 0.05))
        .collect();
    gpu.upload(&w).unwrap()
}

/// Falcon-7B's MLP shape: `h = x @ up^T` (18176 features) on the main stream, then
/// `acc += h @ down^T` forked while the main stream computes a small product `y`, then
/// after the join `acc += y @ small^T`, or the same kernels in the same order on one
/// stream. A fork that did not wait for `h` would read the last round's `h`; a join that
/// did not wait for the forked product would let the last product race it on `acc`.
fn mlp_round(gpu: &Gpu, w: &[DeviceBuffer<bf16>; 3], seed: u64, fork: bool) -> Vec<f32> {
    let (hidden, inner) = (4544, 18176);
    let x = gpu.upload(&random(hidden, seed)).unwrap();
    let mut acc = gpu.upload(&random(hidden, seed + 1)).unwrap();
    let h = gpu.linear(&x, 1, hidden, &w[0], inner, None, &[1]).unwrap();
    let down = |acc: &mut DeviceBuffer<f32>| {
        gpu.linear_accumulate(&h, 1, inner, &w[1], hidden, None, acc, &[1])
    };
    let y = if fork {
        let ((), forked) = gpu.fork(|| down(&mut acc)).unwrap();
        let y = gpu
            .linear(&x, 1, hidden, &w[2], hidden, None, &[1])
            .unwrap();
        forked.join().unwrap();
        y
    } else {
        down(&mut acc).unwrap();
        gpu.linear(&x, 1, hidden, &w[2], hidden, None, &[1])
            .unwrap()
    };
    gpu.linear_accumulate(&y, 1, hidden, &w[2], hidden, None, &mut acc, &[1])
        .unwrap();
    gpu.download_f32(&acc).unwrap()
}

#[test]
fn cuda_forked_work_runs_after_the_fork_and_before_the_join() {
    let Some(b) = backend() else { return };
    let gpu = b.gpu();
    let w = [
        weights(gpu, 18176, 4544, 1),
        weights(gpu, 4544, 18176, 2),
        weights(gpu, 4544, 4544, 3),
    ];
    let before = gpu.forks();
    for round in 0..5u64 {
        let seed = 100 + 10 * round;
        let one = mlp_round(gpu, &w, seed, false);
        let forked = mlp_round(gpu, &w, seed, true);
        assert!(
            same_bits(&forked, &one),
            "round {round}: forked work gave other bits than one stream (off by {:.2e})",
            rel_err(&forked, &one)
        );
    }
    assert_eq!(
        gpu.forks() - before,
        5,
        "every forked round counts one fork"
    );
    // Forks do not nest, and forked work allocates nothing (a scratch buffer would go
    // back to the pool before the join): both refused, and the GPU goes on working.
    let nested = gpu.fork(|| gpu.fork(|| Ok(())).map(|_| ()));
    assert!(nested.is_err(), "a fork inside a fork must be refused");
    let x = gpu.upload(&random(4544, 7)).unwrap();
    let allocating = gpu.fork(|| gpu.linear(&x, 1, 4544, &w[2], 4544, None, &[1]));
    assert!(
        allocating.is_err(),
        "a product into a new buffer must be refused in forked work"
    );
    let one = mlp_round(gpu, &w, 7, false);
    let forked = mlp_round(gpu, &w, 7, true);
    assert!(same_bits(&forked, &one), "after the refusals");
}

/// Greedy decoding on a fixture (steps queued kernel by kernel) with the MLP forked or
/// not (then with `rope_qkv`, not the fused projection): every step's logits, how many
/// forks ran and how many fused qkv-rotary projections.
fn greedy_fork(b: &Arc<CudaBackend>, name: &str, fork: bool) -> (Vec<Vec<f32>>, u64, u64) {
    let gpu = b.gpu();
    let was = (gpu.fork_mlp(), gpu.fuse_rope(), gpu.fork_wide());
    gpu.set_fork_mlp(fork);
    gpu.set_fork_wide(fork);
    gpu.set_fuse_rope(false);
    b.set_step_graphs(false);
    let (forks0, fused0) = (gpu.forks(), gpu.fused_rope_launches());
    let all = greedy_logits(b, name, 30);
    let forks = gpu.forks() - forks0;
    let fused = gpu.fused_rope_launches() - fused0;
    gpu.set_fork_mlp(was.0);
    gpu.set_fuse_rope(was.1);
    gpu.set_fork_wide(was.2);
    b.set_step_graphs(true);
    (all, forks, fused)
}

/// Layouts whose attention and MLP have norms of their own (the new decoder
/// architecture's two norms): their whole MLP forks, with no fused rotary.
const SEPARATE_NORMS: [&str; 4] = [
    "new_arch_gqa_sharded",
    "rope_linear",
    "rope_yarn",
    "f16_weights",
];

#[test]
fn cuda_forked_mlp_decodes_every_fixture_like_the_fused_sum() {
    let Some(b) = backend() else { return };
    let (mut shared, mut separate) = (0, 0);
    for name in LAYOUTS {
        let (on, forks, fused) = greedy_fork(&b, name, true);
        let (again, _, _) = greedy_fork(&b, name, true);
        let (off, none, unfused) = greedy_fork(&b, name, false);
        assert_eq!(none, 0, "{name}: switched off, no layer may fork");
        assert_eq!(unfused, 0, "{name}: unforked, rope_qkv was asked for");
        let differs = on.iter().zip(&again).position(|(x, y)| !same_bits(x, y));
        assert!(
            differs.is_none(),
            "{name}: forked decoding differs between two runs from step {differs:?}"
        );
        if SEPARATE_NORMS.contains(name) {
            // The same kernels in the same order of sums: the same bits.
            assert_eq!(fused, 0, "{name}: a fused rotary under separate norms");
            let differs = on.iter().zip(&off).position(|(x, y)| !same_bits(x, y));
            assert!(
                differs.is_none(),
                "{name}: the forked MLP changed step {differs:?}'s logits"
            );
            separate += usize::from(forks > 0);
        } else {
            // Every forked layer stores the rotary from its projection, and adds the
            // MLP before the attention output projection (other rounding).
            assert_eq!(
                fused, forks,
                "{name}: forked layers without the fused projection"
            );
            for (i, (x, z)) in on.iter().zip(&off).enumerate() {
                let e = rel_err(x, z);
                assert!(e < 1e-3, "{name}: step {i}'s logits off by {e:.2e}");
            }
            shared += usize::from(forks > 0);
        }
        println!("{name}: {forks} forks over 29 decode steps");
    }
    // The layouts with one shared norm before parallel attention fork (the same ones
    // that fuse the residual sum), and every one with separate norms.
    assert!(
        shared >= 5,
        "only {shared} shared-norm layouts forked their MLP"
    );
    assert_eq!(
        separate,
        SEPARATE_NORMS.len(),
        "separate-norm layouts that forked"
    );
}

/// `replays_match` on the fixtures `names` with every fork on (`row_invariant`: in
/// row-invariant mode): each fixture's steps must be recorded and replayed with the
/// bits of the steps queued kernel by kernel, and some layer must fork.
fn forked_replays_match(b: &Arc<CudaBackend>, names: &[&str], row_invariant: bool) {
    let gpu = b.gpu();
    let was = (gpu.fork_mlp(), gpu.fork_wide());
    gpu.set_fork_mlp(true);
    gpu.set_fork_wide(true);
    gpu.set_row_invariant(row_invariant);
    let before = gpu.forks();
    let results: Vec<_> = names
        .iter()
        .map(|name| (name, replays_match(b, name)))
        .collect();
    let forks = gpu.forks() - before;
    gpu.set_fork_mlp(was.0);
    gpu.set_fork_wide(was.1);
    gpu.set_row_invariant(false);
    for (name, r) in results {
        match r {
            Ok(s) => {
                println!("{name}: {s:?}");
                assert!(
                    s.failed == 0 && s.recorded >= 6 && s.replayed >= 140,
                    "{name} (row-invariant {row_invariant}): forked steps were not recorded \
                     and replayed: {s:?}"
                );
            }
            Err(e) => panic!(
                "{name} (row-invariant {row_invariant}): with the MLP forked, {e} differs \
                 from the replay"
            ),
        }
    }
    assert!(forks > 0, "no layer forked");
}

#[test]
fn cuda_forked_mlp_replays_equal_steps_queued_kernel_by_kernel() {
    let Some(b) = backend() else { return };
    let names = ["falcon7b_mqa", "new_arch_one_ln", "bias_mha", "rope_linear"];
    forked_replays_match(&b, &names, false);
}

/// Row-invariant mode at Falcon-7B's MLP down projection (its split-K tensor-core GEMV
/// takes partials and arrival counters): `acc += h @ down^T` forked while the main
/// stream runs the same kind of GEMV on other weights, against the same product on one
/// stream, for 1 to 16 rows. A forked product that shared the main stream's counters or
/// scratch would race the main one.
#[test]
fn cuda_row_invariant_forked_products_take_their_own_scratch() {
    let Some(b) = backend() else { return };
    let gpu = b.gpu();
    gpu.set_row_invariant(true);
    let (hidden, inner) = (4544, 18176);
    let down = weights(gpu, hidden, inner, 4);
    let up = weights(gpu, inner, hidden, 6);
    let other = weights(gpu, 4672, hidden, 5);
    let before = gpu.forks();
    let mut failures = Vec::new();
    for (i, rows) in [1usize, 5, 9, 16].into_iter().enumerate() {
        let seed = 200 + 10 * i as u64;
        let h = gpu.upload(&random(rows * inner, seed)).unwrap();
        let x = gpu.upload(&random(rows * hidden, seed + 1)).unwrap();
        let acc0 = random(rows * hidden, seed + 2);
        let mut one = gpu.upload(&acc0).unwrap();
        gpu.linear_accumulate(&h, rows, inner, &down, hidden, None, &mut one, &[rows])
            .unwrap();
        let y_one = gpu
            .linear(&x, rows, hidden, &other, 4672, None, &[rows])
            .unwrap();
        let mut forked = gpu.upload(&acc0).unwrap();
        let fork = gpu
            .fork_linear_accumulate(&h, rows, inner, &down, hidden, None, &mut forked, &[rows])
            .unwrap();
        let y = gpu
            .linear(&x, rows, hidden, &other, 4672, None, &[rows])
            .unwrap();
        fork.join().unwrap();
        let (want, got) = (
            gpu.download_f32(&one).unwrap(),
            gpu.download_f32(&forked).unwrap(),
        );
        if !same_bits(&got, &want) {
            failures.push(format!(
                "{rows} rows: forked product off by {:.2e}",
                rel_err(&got, &want)
            ));
        }
        // The product into a buffer of its own, forked, against `linear` on one stream.
        let product = gpu
            .fork_linear(&h, rows, inner, &down, hidden, None, &[rows])
            .unwrap();
        let alone = gpu
            .linear(&h, rows, inner, &down, hidden, None, &[rows])
            .unwrap();
        let product = gpu.download_f32(&product.join().unwrap()).unwrap();
        if !same_bits(&product, &gpu.download_f32(&alone).unwrap()) {
            failures.push(format!(
                "{rows} rows: the forked product differs from linear"
            ));
        }
        // The whole MLP forked, against its two products on one stream.
        let mlp = gpu
            .fork_mlp_product(
                &x,
                rows,
                hidden,
                PairHalf {
                    w: &up,
                    n: inner,
                    bias: None,
                    gelu: true,
                },
                PairHalf {
                    w: &down,
                    n: hidden,
                    bias: None,
                    gelu: false,
                },
                &[rows],
            )
            .unwrap();
        let h1 = gpu
            .linear_gelu(&x, rows, hidden, &up, inner, None, &[rows])
            .unwrap();
        let alone = gpu
            .linear(&h1, rows, inner, &down, hidden, None, &[rows])
            .unwrap();
        let mlp = gpu.download_f32(&mlp.join().unwrap()).unwrap();
        if !same_bits(&mlp, &gpu.download_f32(&alone).unwrap()) {
            failures.push(format!(
                "{rows} rows: the forked MLP differs from its products"
            ));
        }
        let (y_want, y_got) = (
            gpu.download_f32(&y_one).unwrap(),
            gpu.download_f32(&y).unwrap(),
        );
        if !same_bits(&y_got, &y_want) {
            failures.push(format!(
                "{rows} rows: the main stream's product beside the fork differs"
            ));
        }
    }
    let forks = gpu.forks() - before;
    // cuBLAS (prefill-sized products) never runs forked.
    let h = gpu.upload(&random(40 * inner, 9)).unwrap();
    let mut acc = gpu.upload(&random(40 * hidden, 10)).unwrap();
    let refused = gpu
        .fork_linear_accumulate(&h, 40, inner, &down, hidden, None, &mut acc, &[40])
        .is_err();
    gpu.set_row_invariant(false);
    assert!(failures.is_empty(), "{failures:#?}");
    assert_eq!(forks, 12, "every forked product counts one fork");
    assert!(
        refused,
        "a 40-row product (cuBLAS) must be refused in forked work"
    );
}

/// Row-invariant mode on every fixture: greedy decoding and a verify pass with the MLP
/// forked give the bits of the unforked layers (the forked product is added after the
/// attention output projection, as unforked), and verify rows still equal one-token
/// steps.
#[test]
fn cuda_row_invariant_forked_layers_change_no_bit() {
    let Some(b) = backend() else { return };
    let gpu = b.gpu();
    let was = (gpu.fork_mlp(), gpu.fork_wide());
    gpu.set_row_invariant(true);
    gpu.set_fork_wide(true);
    b.set_step_graphs(false);
    let mut failures = Vec::new();
    let mut forking = 0;
    for name in LAYOUTS {
        let run = |fork: bool| {
            gpu.set_fork_mlp(fork);
            let before = gpu.forks();
            let greedy = greedy_logits(&b, name, 20);
            let (verify, ones) = verify_and_one_at_a_time(&b, name);
            (greedy, verify, ones, gpu.forks() - before)
        };
        let (g_on, v_on, o_on, forks) = run(true);
        let (g_off, v_off, o_off, none) = run(false);
        if none != 0 {
            failures.push(format!("{name}: {none} forks with the fork off"));
        }
        for (what, on, off) in [
            ("decode", &g_on, &g_off),
            ("verify", &v_on, &v_off),
            ("one-token", &o_on, &o_off),
        ] {
            if let Some(i) = on.iter().zip(off).position(|(x, y)| !same_bits(x, y)) {
                failures.push(format!(
                    "{name}: {what} row {i} differs forked (off by {:.2e})",
                    rel_err(&on[i], &off[i])
                ));
            }
        }
        if let Some(i) = v_on.iter().zip(&o_on).position(|(x, y)| !same_bits(x, y)) {
            failures.push(format!(
                "{name}: forked verify row {i} differs from the one-token step"
            ));
        }
        println!("{name}: {forks} forks");
        if forks > 0 {
            forking += 1;
        }
    }
    gpu.set_fork_mlp(was.0);
    gpu.set_fork_wide(was.1);
    gpu.set_row_invariant(false);
    b.set_step_graphs(true);
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(forking >= 5, "only {forking} layouts forked their MLP");
}

/// Row-invariant forked steps (decode and three-token verify steps, whose forked
/// products take reserved scratch) replayed as CUDA graphs equal the same steps queued
/// kernel by kernel.
#[test]
fn cuda_row_invariant_forked_replays_equal_steps_queued_kernel_by_kernel() {
    let Some(b) = backend() else { return };
    forked_replays_match(
        &b,
        &["falcon7b_mqa", "bias_mha", "new_arch_gqa_sharded"],
        true,
    );
}
