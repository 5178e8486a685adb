//! Work forked onto a second stream (`Gpu::fork`) and the layer that uses it, the MLP
//! down projection beside the attention (`Gpu::set_fork_mlp`, on by default, its qkv
//! projection storing the rotary itself): the fork starts after what the main stream
//! queued before it and the join orders it before what follows; greedy decoding on
//! every fixture matches the unforked layer (fused sum, `rope_qkv`), gives the same bits
//! on every run, and the same bits again when the steps are replayed as CUDA graphs
//! (the fork and join recorded as graph edges).
//!
//! Without a GPU every test prints `skipped: no CUDA device (<reason>)` and passes.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use falconer_engine::backend::cuda::kernels::{bf16, DeviceBuffer, Gpu};
use falconer_engine::backend::cuda::CudaBackend;

use crate::common::{rel_err, LAYOUTS};
use crate::cuda_golden::{backend, greedy_logits, random, same_bits};
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
    let was = (gpu.fork_mlp(), gpu.fuse_rope());
    gpu.set_fork_mlp(fork);
    gpu.set_fuse_rope(false);
    b.set_step_graphs(false);
    let (forks0, fused0) = (gpu.forks(), gpu.fused_rope_launches());
    let all = greedy_logits(b, name, 30);
    let forks = gpu.forks() - forks0;
    let fused = gpu.fused_rope_launches() - fused0;
    gpu.set_fork_mlp(was.0);
    gpu.set_fuse_rope(was.1);
    b.set_step_graphs(true);
    (all, forks, fused)
}

#[test]
fn cuda_forked_mlp_decodes_every_fixture_like_the_fused_sum() {
    let Some(b) = backend() else { return };
    let mut forking = 0;
    for name in LAYOUTS {
        let (on, forks, fused) = greedy_fork(&b, name, true);
        let (again, _, _) = greedy_fork(&b, name, true);
        let (off, none, unfused) = greedy_fork(&b, name, false);
        assert_eq!(none, 0, "{name}: switched off, no layer may fork");
        assert_eq!(unfused, 0, "{name}: unforked, rope_qkv was asked for");
        // Every forked layer stores the rotary from its projection.
        assert_eq!(
            fused, forks,
            "{name}: forked layers without the fused projection"
        );
        let differs = on.iter().zip(&again).position(|(x, y)| !same_bits(x, y));
        assert!(
            differs.is_none(),
            "{name}: forked decoding differs between two runs from step {differs:?}"
        );
        for (i, (x, z)) in on.iter().zip(&off).enumerate() {
            let e = rel_err(x, z);
            assert!(e < 1e-3, "{name}: step {i}'s logits off by {e:.2e}");
        }
        println!("{name}: {forks} forks over 29 decode steps");
        if forks > 0 {
            forking += 1;
        }
    }
    // The layouts with one shared norm before parallel attention fork (the same ones
    // that fuse the residual sum).
    assert!(forking >= 5, "only {forking} layouts forked their MLP");
}

#[test]
fn cuda_forked_mlp_replays_equal_steps_queued_kernel_by_kernel() {
    let Some(b) = backend() else { return };
    let gpu = b.gpu();
    let was = gpu.fork_mlp();
    gpu.set_fork_mlp(true);
    let before = gpu.forks();
    let results: Vec<_> = ["falcon7b_mqa", "new_arch_one_ln", "bias_mha"]
        .into_iter()
        .map(|name| (name, replays_match(&b, name)))
        .collect();
    let forks = gpu.forks() - before;
    gpu.set_fork_mlp(was);
    for (name, r) in results {
        match r {
            Ok(s) => {
                println!("{name}: {s:?}");
                assert!(
                    s.failed == 0 && s.recorded >= 6 && s.replayed >= 140,
                    "{name}: forked steps were not recorded and replayed: {s:?}"
                );
            }
            Err(e) => panic!("{name}: with the MLP forked, {e} differs from the replay"),
        }
    }
    assert!(forks > 0, "no layer forked");
}
