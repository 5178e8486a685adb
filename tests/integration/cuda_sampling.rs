//! Sampling distributions warped on the GPU against the host's warp: the same kept
//! tokens (top-k and top-p are exact selections, ties included), probabilities within
//! f32 rounding, and the same token drawn from either with the same random stream.

#![cfg(feature = "cuda")]

use std::time::Instant;

use falconer_engine::backend::cuda::CudaBackend;
use falconer_engine::backend::{penalized_argmax_on_host, Backend, WarpRow};
use falconer_engine::sampling::{
    sample_from_probs, warp_penalised, Rng, SamplingError, SamplingParams,
};
use falconer_engine::{RowsOut, RowsWanted, SeqWork};

use crate::common::reference;
use crate::cuda_golden::{backend, cuda_runner};

/// Logit-like rows: roughly normal with standard deviation `sd` (a sum of uniforms).
fn normal_row(n: usize, seed: u64, sd: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut u = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 40) as f32 / (1u64 << 24) as f32
    };
    (0..n)
        .map(|_| {
            let z: f32 = (0..4).map(|_| u()).sum::<f32>() - 2.0;
            z * sd * 1.732
        })
        .collect()
}

fn params(temperature: f32, top_k: usize, top_p: f32, penalty: f32) -> SamplingParams {
    SamplingParams {
        temperature,
        top_k,
        top_p,
        repetition_penalty: penalty,
        seed: 0,
    }
}

/// Whether two distributions keep the same tokens and agree within f32 rounding.
fn compare(got: &[f32], want: &[f32]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{} entries against {}", got.len(), want.len()));
    }
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if (g == 0.0) != (w == 0.0) {
            return Err(format!("token {i}: {g} on the device, {w} on the host"));
        }
        if (g - w).abs() > 1e-9 + 2e-6 * w.abs() {
            return Err(format!("token {i}: {g} against {w}"));
        }
    }
    Ok(())
}

/// Warps every (row, params) pair on the device and on the host and compares them.
fn check_rows(
    b: &CudaBackend,
    rows: &[Vec<f32>],
    grid: &[SamplingParams],
    context: &[u32],
) -> Vec<String> {
    let v = rows[0].len();
    let x = b.upload_hidden(&rows.concat(), rows.len(), v).unwrap();
    let specs: Vec<WarpRow<'_>> = grid
        .iter()
        .flat_map(|p| {
            (0..rows.len()).map(move |row| WarpRow {
                row,
                params: p,
                context,
            })
        })
        .collect();
    b.set_device_warp(true);
    let got = b.warp_rows(&x, v, &specs).unwrap();
    b.set_device_warp(false);
    let host = b.warp_rows(&x, v, &specs).unwrap();
    b.set_device_warp(true);
    let mut failures = Vec::new();
    for ((s, g), h) in specs.iter().zip(&got).zip(&host) {
        // The host path of the backend is the host function itself.
        let want: Result<Vec<f32>, SamplingError> = warp_penalised(&rows[s.row], context, s.params);
        assert_eq!(h, &want);
        let what = format!("row {} with {:?}", s.row, s.params);
        match (g, &want) {
            (Ok(g), Ok(w)) => {
                if let Err(e) = compare(g, w) {
                    failures.push(format!("{what}: {e}"));
                    continue;
                }
                // The same stream draws the same tokens from either.
                let (mut r1, mut r2) = (Rng::new(s.row as u64), Rng::new(s.row as u64));
                for draw in 0..50 {
                    let (a, c) = (sample_from_probs(g, &mut r1), sample_from_probs(w, &mut r2));
                    if a != c {
                        failures.push(format!("{what}: draw {draw} gave {a} against {c}"));
                        break;
                    }
                }
            }
            (Err(g), Err(w)) if g == w => {}
            (g, w) => failures.push(format!(
                "{what}: {:?} against {:?}",
                g.as_ref().map(|_| "probs"),
                w.as_ref().map(|_| "probs")
            )),
        }
    }
    failures
}

#[test]
fn cuda_device_warp_matches_the_host_warp() {
    let Some(b) = backend() else { return };
    let v = 65024;
    let mut rows: Vec<Vec<f32>> = (0..4u64).map(|s| normal_row(v, 70 + s, 2.5)).collect();
    // Ties everywhere: values on a 0.5 grid (top-k keeps ties with the k-th; top-p
    // removes the lowest indices of the boundary value first).
    rows.push(
        normal_row(v, 80, 2.0)
            .iter()
            .map(|x| (x * 2.0).round() / 2.0)
            .collect(),
    );
    rows.push(normal_row(v, 81, 4.0).iter().map(|x| x.round()).collect());
    // NaN and -inf entries never get probability.
    let mut holes = normal_row(v, 82, 3.0);
    for i in (0..v).step_by(7) {
        holes[i] = if i % 2 == 0 {
            f32::NAN
        } else {
            f32::NEG_INFINITY
        };
    }
    rows.push(holes);
    // Rows the kernel hands to the host: a +inf logit, and no usable logit at all.
    let mut inf = normal_row(v, 83, 1.0);
    inf[5] = f32::INFINITY;
    inf[60000] = f32::INFINITY;
    rows.push(inf);
    rows.push(vec![f32::NAN; v]);
    let grid = [
        params(1.0, 0, 1.0, 1.0),
        params(0.7, 50, 1.0, 1.0),
        params(1.0, 0, 0.9, 1.0),
        params(1.3, 40, 0.8, 1.0),
        params(1.0, 1, 1.0, 1.0),
        params(1.0, 0, 0.01, 1.0),
        params(0.5, v, 1.0, 1.0),
        params(0.8, 0, 0.95, 1.3),
        params(0.9, 1000, 0.5, 0.7),
        // Greedy with a penalty: the host's one-hot.
        params(0.0, 0, 1.0, 1.2),
    ];
    // A context with repeats and an id outside the vocabulary (ignored, as on the host).
    let context: Vec<u32> = (0..600u32)
        .map(|i| (i * 7919) % 70000)
        .chain([3, 3, 3])
        .collect();
    let failures = check_rows(&b, &rows, &grid, &context);
    assert!(
        failures.is_empty(),
        "{} failures: {failures:#?}",
        failures.len()
    );

    // A small vocabulary, where one block covers few tokens per thread.
    let small: Vec<Vec<f32>> = (0..3u64).map(|s| normal_row(300, 90 + s, 1.5)).collect();
    let failures = check_rows(&b, &small, &grid, &context);
    assert!(
        failures.is_empty(),
        "{} failures: {failures:#?}",
        failures.len()
    );

    // What it saves: one 65k row warped on the device against on the host.
    let x = b.upload_hidden(&rows[0], 1, v).unwrap();
    let p = params(0.8, 50, 0.95, 1.0);
    let spec = [WarpRow {
        row: 0,
        params: &p,
        context: &[],
    }];
    for device in [true, false] {
        b.set_device_warp(device);
        b.warp_rows(&x, v, &spec).unwrap();
        let t = Instant::now();
        for _ in 0..20 {
            b.warp_rows(&x, v, &spec).unwrap();
        }
        println!(
            "warp of one {v}-token row ({}): {:.3} ms",
            if device { "device" } else { "host" },
            t.elapsed().as_secs_f64() * 1e3 / 20.0
        );
    }
    b.set_device_warp(true);
}

#[test]
fn cuda_outputs_warp_sampled_chunks_as_the_host_would() {
    let Some(b) = backend() else { return };
    let name = "falcon7b_mqa";
    let r = reference(name);
    let prompt = &r.prompt_ids;
    let mut m = cuda_runner(&b, name);
    m.add_sequence(1).unwrap();
    m.add_sequence(2).unwrap();
    let work = |seq, tokens| SeqWork {
        seq,
        tokens,
        all_logits: true,
    };
    let p = params(0.8, 30, 0.9, 1.3);
    let history: Vec<u32> = prompt.iter().rev().copied().collect();
    let logits = m
        .forward_outputs(&[work(1, prompt)], &[RowsWanted::Logits])
        .unwrap();
    let warped = m
        .forward_outputs(
            &[work(2, prompt)],
            &[RowsWanted::Warped {
                params: &p,
                history: &history,
            }],
        )
        .unwrap();
    let (RowsOut::Logits(l), RowsOut::Warped(w)) = (&logits[0], &warped[0]) else {
        panic!("outputs not in the asked forms");
    };
    assert_eq!(w.len(), prompt.len());
    for (i, row) in l.rows().enumerate() {
        let mut ctx = history.clone();
        ctx.extend_from_slice(&prompt[..=i]);
        let want = warp_penalised(row, &ctx, &p).unwrap();
        if let Err(e) = compare(w[i].as_ref().unwrap(), &want) {
            panic!("row {i}: {e}");
        }
    }
}

#[test]
fn cuda_penalized_argmax_matches_the_host() {
    let Some(b) = backend() else { return };
    let v = 65024;
    let mut rows: Vec<Vec<f32>> = (0..3u64).map(|s| normal_row(v, 100 + s, 2.0)).collect();
    // Ties (the first index wins), NaN everywhere, and a row whose maximum is penalised.
    rows.push(normal_row(v, 103, 2.0).iter().map(|x| x.round()).collect());
    rows.push(vec![f32::NAN; v]);
    let mut top = normal_row(v, 104, 1.0);
    top[321] = 50.0;
    rows.push(top);
    let x = b.upload_hidden(&rows.concat(), rows.len(), v).unwrap();
    let penalties = [1.0f32, 1.3, 0.8, 60.0];
    let params: Vec<SamplingParams> = penalties
        .iter()
        .map(|&p| SamplingParams {
            temperature: 0.0,
            repetition_penalty: p,
            ..SamplingParams::default()
        })
        .collect();
    let context: Vec<u32> = (0..500u32)
        .map(|i| (i * 131) % v as u32)
        .chain([321, 321])
        .collect();
    let specs: Vec<WarpRow<'_>> = params
        .iter()
        .flat_map(|p| {
            (0..rows.len()).map(|row| WarpRow {
                row,
                params: p,
                context: &context,
            })
        })
        .collect();
    let got = b.penalized_argmax_rows(&x, v, &specs).unwrap();
    let want = penalized_argmax_on_host(&rows.concat(), v, &specs).unwrap();
    assert_eq!(got, want);
    // The penalty moves the argmax off a penalised maximum (token 321 at 50 / 60).
    let last = |p: usize| got[p * rows.len() + rows.len() - 1];
    assert_eq!(last(0), Some(321));
    assert_ne!(last(3), Some(321));
    assert_eq!(got[4], None, "an all-NaN row has no greedy token");
}
