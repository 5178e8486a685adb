//! The decode and verify sections: batch-1 decode against the weight-streaming floor
//! and its variants (each setting flipped within the run), and the verify pass against
//! a one-token step.

use super::*;

/// Batch-1 greedy decode in several configurations; returns the default's tokens/s.
pub(crate) fn decode_section(
    backend: &CudaBackend,
    runner: &mut ModelRunner<CudaBackend>,
    cfg: &FalconConfig,
    floor_ms: f64,
    r: &mut Report,
) -> Result<f64> {
    let gpu = backend.gpu();
    let vocab = cfg.vocab_size as u32;
    let pdl_default = gpu.pdl();
    // `BENCH_MATRIX=label,label` runs only the listed matrix entries (and the
    // default) and skips the other variants: a short device call.
    let matrix = std::env::var("BENCH_MATRIX").ok();
    if matrix.is_none() {
        launch_variants(backend, runner, vocab, r)?;
    }
    // Programmatic dependent launch, the fused attention input (rotary and KV write in
    // the qkv projection), the decode attention's own split merge and the residual sum
    // overlapping the attention, in combinations run in turn three times each: their
    // effects are about the size of the run-to-run spread, so a single pair says little.
    // The residual sum's warps per output (GemvSplit) join the matrix as `split2`,
    // `split4`, applied to every one-row GEMV with `all`; the decode attention's keys
    // loaded only after its PDL wait as `latekv`; the MLP down projection forked onto a
    // second stream beside the attention as `fork` (its layers always store the rotary
    // from the projection, so `rope` only matters unforked), in row-invariant steps too
    // with `wide` (without it `fork` changes nothing there; the default-mode rows take
    // the default `wide`, which this shape's shared norm leaves without effect there,
    // and a label shows `wide` only with `fork`); the CUDA-core attention's
    // keys per split, when set from the environment, as `keysN` (measured slower).
    #[derive(Clone, Copy)]
    struct Launch {
        pdl: bool,
        rope: bool,
        merge: bool,
        overlap: bool,
        split: GemvSplit,
        all: bool,
        early: bool,
        fork: bool,
        wide: bool,
        keys: usize,
    }
    let cfg = |pdl, rope, merge, overlap| Launch {
        pdl,
        rope,
        merge,
        overlap,
        split: GemvSplit::One,
        all: false,
        early: true,
        fork: false,
        wide: false,
        keys: ATTN_SPLIT_KEYS,
    };
    let late_kv = |c: Launch| Launch { early: false, ..c };
    let fork = |c: Launch| Launch { fork: true, ..c };
    let wide = |c: Launch| Launch {
        fork: true,
        wide: true,
        ..c
    };
    let split = |c: Launch, split| Launch { split, ..c };
    let split_all = |c: Launch, split| Launch {
        split,
        all: true,
        ..c
    };
    let defaults = Launch {
        split: gpu.gemv_split(),
        all: gpu.gemv_split_all(),
        early: gpu.early_kv(),
        fork: gpu.fork_mlp(),
        wide: gpu.fork_wide(),
        keys: gpu.attn_split_keys(),
        ..cfg(
            gpu.pdl(),
            gpu.fuse_rope(),
            gpu.fuse_combine(),
            gpu.sum_overlap(),
        )
    };
    let set = |c: Launch| {
        gpu.set_pdl(c.pdl && pdl_default);
        gpu.set_fuse_rope(c.rope);
        gpu.set_fuse_combine(c.merge);
        gpu.set_sum_overlap(c.overlap);
        gpu.set_gemv_split(c.split);
        gpu.set_gemv_split_all(c.all);
        gpu.set_early_kv(c.early);
        gpu.set_fork_mlp(c.fork);
        gpu.set_fork_wide(c.wide);
        // Only the accepted lengths are listed below.
        let _ = gpu.set_attn_split_keys(c.keys);
    };
    let label = |c: Launch| {
        let flags = [
            (c.pdl, "pdl"),
            (c.rope, "rope"),
            (c.merge, "merge"),
            (c.overlap, "overlap"),
            (c.split == GemvSplit::Two, "split2"),
            (c.split == GemvSplit::Four, "split4"),
            (c.all && c.split != GemvSplit::One, "all"),
            (!c.early, "latekv"),
            (c.fork, "fork"),
            (c.fork && c.wide, "wide"),
        ];
        let mut on: Vec<String> = flags
            .iter()
            .filter(|f| f.0)
            .map(|f| f.1.to_string())
            .collect();
        if c.keys != ATTN_SPLIT_KEYS {
            on.push(format!("keys{}", c.keys));
        }
        if on.is_empty() {
            "none".to_string()
        } else {
            on.join("+")
        }
    };
    for exact in [false, true] {
        gpu.set_row_invariant(exact);
        // (Row-invariant steps never fuse the sum, so never overlap it.)
        let configs: Vec<Launch> = if exact {
            vec![
                fork(cfg(true, false, false, false)),
                wide(cfg(true, false, false, false)),
                fork(cfg(true, true, false, false)),
                wide(late_kv(cfg(true, false, false, false))),
                fork(cfg(false, false, false, false)),
            ]
        } else {
            vec![
                fork(cfg(true, false, false, false)),
                cfg(true, false, false, false),
                fork(split(cfg(true, false, false, false), GemvSplit::Four)),
                fork(split_all(cfg(true, false, false, false), GemvSplit::Four)),
                fork(late_kv(cfg(true, false, false, false))),
                fork(cfg(true, false, true, false)),
                cfg(true, true, true, true),
                fork(cfg(false, false, false, false)),
                cfg(false, false, false, false),
            ]
            .into_iter()
            .map(|c| Launch {
                wide: defaults.wide,
                ..c
            })
            .collect()
        };
        let listed = |c: &Launch| {
            matrix.as_deref().is_none_or(|m| {
                let l = label(*c);
                l == label(defaults) || m.split(',').any(|s| s.trim() == l)
            })
        };
        let configs: Vec<Launch> = configs.into_iter().filter(listed).collect();
        let mut runs = vec![Vec::new(); configs.len()];
        for _ in 0..3 {
            for (&c, into) in configs.iter().zip(runs.iter_mut()) {
                set(c);
                into.push(variant_tokens_per_s(runner, vocab, Pick::DeviceArgmax)?);
            }
        }
        set(defaults);
        gpu.set_row_invariant(false);
        let shown: Vec<String> = configs
            .iter()
            .zip(&runs)
            .map(|(&c, v)| format!("{} {:.1}", label(c), median(v)))
            .collect();
        let mode = if exact { "row-invariant" } else { "default" };
        r.row((
            format!("decode ({mode}) by launch settings, median of 3 interleaved"),
            format!(
                "{} tokens/s (default {})",
                shown.join(", "),
                label(defaults)
            ),
        ));
        let fields: serde_json::Map<String, Value> = configs
            .iter()
            .zip(&runs)
            .map(|(&c, v)| (label(c), json!(v)))
            .collect();
        r.out.insert(
            format!("decode_{}_by_launch_settings", mode.replace('-', "_")),
            Value::Object(fields),
        );
    }
    if matrix.is_none() {
        kernel_variants(backend, runner, vocab, r)?;
    }
    let decode_s = decode_runs(runner, vocab, DECODE_RUNS, Pick::DeviceArgmax)?;
    // The first run warms up (JIT, allocator pool).
    let med = median(&decode_s[1..]);
    let tps = NEW_TOKENS as f64 / med;
    let ms_tok = med * 1e3 / NEW_TOKENS as f64;
    r.row((
        format!("decode, batch 1, {PROMPT}-token prompt, {NEW_TOKENS} new"),
        format!("{tps:.1} tokens/s (median of {})", DECODE_RUNS - 1),
    ));
    r.row((
        "ms/token vs weight-streaming floor".into(),
        format!(
            "{ms_tok:.3} ms vs {floor_ms:.2} ms ({:.0}% of floor speed)",
            floor_ms / ms_tok * 100.0
        ),
    ));
    r.out.insert("decode_tokens_per_s".into(), json!(tps));
    r.out.insert("decode_ms_per_token".into(), json!(ms_tok));
    r.out.insert("decode_runs_s".into(), json!(decode_s));
    r.out.insert("floor_ms_per_token".into(), json!(floor_ms));
    let graphs = runner.model().step_graphs();
    if let Some(why) = graphs.last_failure() {
        eprintln!("a CUDA graph capture failed: {why}");
    }
    let g = graphs.stats();
    r.row((
        "CUDA graph recordings of the decode model's steps".into(),
        format!(
            "{} recorded, {} replayed, {} warm-up, {} failed, {} not recordable",
            g.recorded, g.replayed, g.warmed, g.failed, g.direct
        ),
    ));
    r.out.insert(
        "graph_stats".into(),
        json!({"recorded": g.recorded, "replayed": g.replayed, "warmed": g.warmed,
               "failed": g.failed, "direct": g.direct}),
    );
    Ok(tps)
}

/// Decode with one launch setting flipped each: programmatic dependent launch off, CUDA
/// graphs flipped, the residual products as two launches.
fn launch_variants(
    backend: &CudaBackend,
    runner: &mut ModelRunner<CudaBackend>,
    vocab: u32,
    r: &mut Report,
) -> Result<()> {
    let gpu = backend.gpu();
    let pdl_default = gpu.pdl();
    // Batch-1 greedy decode, first without programmatic dependent launch (for the
    // comparison), then as configured.
    if pdl_default {
        gpu.set_pdl(false);
        let tps = variant_tokens_per_s(runner, vocab, Pick::DeviceArgmax)?;
        r.row((
            "decode without programmatic dependent launch".into(),
            format!("{tps:.1} tokens/s (median of 2)"),
        ));
        r.out
            .insert("decode_no_pdl_tokens_per_s".into(), json!(tps));
        gpu.set_pdl(true);
    }
    r.out.insert("pdl".into(), json!(pdl_default));
    // Steps queued kernel by kernel, or replayed as CUDA graphs.
    let graphs_default = backend.step_graphs();
    backend.set_step_graphs(!graphs_default);
    let tps_g = variant_tokens_per_s(runner, vocab, Pick::DeviceArgmax)?;
    backend.set_step_graphs(graphs_default);
    r.row((
        format!(
            "decode with CUDA graphs {}",
            if graphs_default { "off" } else { "on" }
        ),
        format!(
            "{tps_g:.1} tokens/s (median of 2; default: {})",
            if graphs_default { "on" } else { "off" }
        ),
    ));
    r.out
        .insert("decode_graphs_flipped_tokens_per_s".into(), json!(tps_g));
    r.out.insert("step_graphs".into(), json!(graphs_default));
    // The layer's two residual products (attention output, MLP down) as two launches,
    // the MLP not forked (a forked layer never fuses them).
    let (fuse_default, fork_default) = (gpu.fuse_sum(), gpu.fork_mlp());
    gpu.set_fuse_sum(!fuse_default);
    gpu.set_fork_mlp(false);
    let tps_f = variant_tokens_per_s(runner, vocab, Pick::DeviceArgmax)?;
    gpu.set_fuse_sum(fuse_default);
    gpu.set_fork_mlp(fork_default);
    r.row((
        format!(
            "decode, MLP not forked, with the residual products {}",
            if fuse_default {
                "as two launches"
            } else {
                "as one launch"
            }
        ),
        format!(
            "{tps_f:.1} tokens/s (median of 2; default: {})",
            if fuse_default { "one" } else { "two" }
        ),
    ));
    r.out
        .insert("decode_fuse_sum_flipped_tokens_per_s".into(), json!(tps_f));
    r.out.insert("fuse_sum".into(), json!(fuse_default));
    Ok(())
}

/// Decode with other kernels: row-invariant, tensor-core attention everywhere, logits
/// on the host, sampled (warped on the device or the host), and the pair launches.
fn kernel_variants(
    backend: &CudaBackend,
    runner: &mut ModelRunner<CudaBackend>,
    vocab: u32,
    r: &mut Report,
) -> Result<()> {
    let gpu = backend.gpu();
    gpu.set_row_invariant(true);
    let tps_x = variant_tokens_per_s(runner, vocab, Pick::DeviceArgmax)?;
    gpu.set_row_invariant(false);
    r.row((
        "decode with row-invariant (runtime) kernels".into(),
        format!("{tps_x:.1} tokens/s (median of 2)"),
    ));
    r.out
        .insert("decode_row_invariant_tokens_per_s".into(), json!(tps_x));
    gpu.set_attn_tc_min_ctx(0);
    let tps_tc = variant_tokens_per_s(runner, vocab, Pick::DeviceArgmax)?;
    gpu.set_attn_tc_min_ctx(ATTN_TC_MIN_CTX);
    r.row((
        "decode with tensor-core attention at every context".into(),
        format!("{tps_tc:.1} tokens/s (median of 2; default from {ATTN_TC_MIN_CTX})"),
    ));
    r.out
        .insert("decode_tc_attention_tokens_per_s".into(), json!(tps_tc));
    let tps_host = variant_tokens_per_s(runner, vocab, Pick::HostArgmax)?;
    r.row((
        "decode with logits copied to the host (argmax there)".into(),
        format!("{tps_host:.1} tokens/s (median of 2)"),
    ));
    r.out
        .insert("decode_host_logits_tokens_per_s".into(), json!(tps_host));
    // Sampled decoding: the distribution warped where the logits are, or on the host.
    let mut cells = Vec::new();
    for device in [true, false] {
        backend.set_device_warp(device);
        let t = variant_tokens_per_s(runner, vocab, Pick::Sampled)?;
        let place = if device { "device" } else { "host" };
        cells.push(format!("{t:.1} warped on the {place}"));
        r.out.insert(
            format!("decode_sampled_{place}_warp_tokens_per_s"),
            json!(t),
        );
    }
    backend.set_device_warp(true);
    r.row((
        format!(
            "sampled decode (t {}, top-k {}, top-p {}), tokens/s",
            SAMPLED.temperature, SAMPLED.top_k, SAMPLED.top_p
        ),
        cells.join(", "),
    ));
    // The qkv and MLP up projections in one launch or two, in both kernel sets.
    let mut cells = Vec::new();
    for exact in [false, true] {
        gpu.set_row_invariant(exact);
        let modes: &[PairLaunch] = if exact {
            &[PairLaunch::Off, PairLaunch::TensorCores]
        } else {
            &[PairLaunch::Off, PairLaunch::Simt, PairLaunch::TensorCores]
        };
        for &mode in modes {
            gpu.set_pair_launch(mode);
            let t = variant_tokens_per_s(runner, vocab, Pick::DeviceArgmax)?;
            let kind = if exact { "row-invariant" } else { "default" };
            cells.push(format!("{kind} {mode:?} {t:.1}"));
            r.out.insert(
                format!("decode_pair_{kind}_{mode:?}_tokens_per_s"),
                json!(t),
            );
        }
    }
    gpu.set_row_invariant(false);
    gpu.set_pair_launch(PAIR_LAUNCH);
    r.row((
        "decode tokens/s, qkv + MLP up projection launches".into(),
        format!("{} (default {PAIR_LAUNCH:?})", cells.join(", ")),
    ));
    Ok(())
}

/// Verify pass against a one-token step; returns the one-token step in seconds.
pub(crate) fn verify_section(
    backend: &CudaBackend,
    runner: &mut ModelRunner<CudaBackend>,
    cfg: &FalconConfig,
    r: &mut Report,
) -> Result<f64> {
    let gpu = backend.gpu();
    let vocab = cfg.vocab_size as u32;
    let bps_default = gpu.tc_blocks_per_sm();
    // Verify pass (5 new positions) vs a one-token step over a 512-token cache (as the
    // HF baseline).
    let seq = 7;
    runner.add_sequence(seq)?;
    let ctx = tokens(VERIFY_CACHE, vocab, 99);
    runner.forward(&[SeqWork {
        seq,
        tokens: &ctx,
        all_logits: false,
    }])?;
    let base = runner.cached_len(seq)?;
    // Greedy verification as the runtime needs it: every row's argmax on the device
    // (`host_logits`: every row's logits copied to the host instead).
    let step_time =
        |runner: &mut ModelRunner<CudaBackend>, n: usize, host_logits: bool| -> Result<f64> {
            let mut times = Vec::new();
            for i in 0..21 {
                let toks = tokens(n, vocab, 1000 + i);
                let t = Instant::now();
                let work = [SeqWork {
                    seq,
                    tokens: &toks,
                    all_logits: true,
                }];
                if host_logits {
                    runner.forward(&work)?;
                } else {
                    runner.forward_greedy(&work)?;
                }
                times.push(t.elapsed().as_secs_f64());
                runner.truncate(seq, base)?;
            }
            Ok(median(&times[1..]))
        };
    let one_host = step_time(runner, 1, true)?;
    let five_host = step_time(runner, 5, true)?;
    r.row((
        "verify(5) vs one step, logits copied to the host".into(),
        format!(
            "{:.3} ms vs {:.3} ms = {:.3}x",
            five_host * 1e3,
            one_host * 1e3,
            five_host / one_host
        ),
    ));
    r.out.insert(
        "verify_ratio_host_logits".into(),
        json!(five_host / one_host),
    );
    let one = step_time(runner, 1, false)?;
    let mut by_bps = Vec::new();
    for bps in [4usize, 16, 24] {
        gpu.set_tc_blocks_per_sm(bps);
        let t = step_time(runner, 5, false)?;
        by_bps.push(format!("{bps}: {:.3}x", t / one));
        r.out
            .insert(format!("verify_ratio_tc_blocks_{bps}"), json!(t / one));
    }
    gpu.set_tc_blocks_per_sm(bps_default);
    let five = step_time(runner, 5, false)?;
    // The runtime's row-invariant products: a verify pass gives each row the bits of a
    // one-token step (greedy speculation equals plain greedy decoding by construction).
    gpu.set_row_invariant(true);
    let one_x = step_time(runner, 1, false)?;
    let five_x = step_time(runner, 5, false)?;
    gpu.set_row_invariant(false);
    r.row((
        "verify(5) vs one step, row-invariant (runtime) kernels".into(),
        format!(
            "{:.3} ms vs {:.3} ms = {:.3}x",
            five_x * 1e3,
            one_x * 1e3,
            five_x / one_x
        ),
    ));
    r.out
        .insert("row_invariant_step_1_ms".into(), json!(one_x * 1e3));
    r.out
        .insert("row_invariant_verify_5_ms".into(), json!(five_x * 1e3));
    r.out
        .insert("row_invariant_verify_ratio".into(), json!(five_x / one_x));
    runner.remove_sequence(seq)?;
    r.row((
        "verify(5) ratio by tc GEMV blocks/SM".into(),
        format!("{} (default {bps_default})", by_bps.join(", ")),
    ));
    r.row((
        format!("verify(5) vs one-token step, {VERIFY_CACHE}-token cache, argmax on device"),
        format!(
            "{:.3} ms vs {:.3} ms = {:.3}x",
            five * 1e3,
            one * 1e3,
            five / one
        ),
    ));
    r.out.insert("step_1_ms".into(), json!(one * 1e3));
    r.out.insert("verify_5_ms".into(), json!(five * 1e3));
    r.out.insert("verify_ratio".into(), json!(five / one));
    Ok(one)
}
