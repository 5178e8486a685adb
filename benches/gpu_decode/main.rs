//! GPU benchmark of the CUDA backend in the Falcon-7B shape (hidden 4544, 32 layers, 71
//! query heads sharing 1 kv head, vocab 65024) with random bf16 weights.
//!
//! No 14 GB checkpoint is written: the model directory holds a real `config.json` and a
//! *sparse* `model.safetensors` whose header lists every tensor; the backend is
//! [`CudaBackend::synthetic`], whose `upload` reads only the shapes and fills each
//! tensor with seeded random values on the device. So `Falcon::load`, `ModelRunner` and
//! every op run exactly as for a real checkpoint.
//!
//! Measures (CUDA work timed after a warm-up, with the stream synchronised; medians):
//! - batch-1 greedy decode: 128-token prompt, 256 new tokens, tokens/s and ms/token
//!   against the weight-streaming floor (weight bytes / 4.3 TB/s);
//! - a verify pass over 5 new positions against a one-token step;
//! - prefill of 2048 tokens in TFLOP/s against a cuBLAS bf16 GEMM peak measured here;
//! - decode attention at a 32k context (32 layers) in GB/s of KV read;
//! - per-op figures that explain the decode step (GEMV bandwidth per weight shape);
//! - int8 and int4 weights: integer GEMV bandwidth and decode against their own floors.
//!
//! With `HF_BASELINE_JSON` naming the output of `benches/hf_baseline.py` (HF transformers
//! on the same shapes, run just before in the same device call), its figures join the
//! table and the JSON.
//!
//! Prints one table; writes JSON to `$BENCH_OUT` when set. Without a GPU it prints
//! `skipped: no CUDA device (...)` and exits 0. `BENCH_ONLY` (a comma list of `gemv`,
//! `replica`, `decode`, `verify`, `prefill`, `attention`, `quant`) runs only those sections;
//! `BENCH_ONLY=profile` runs a short decode and one long-context attention pass for a
//! profiler (ncu), and nothing else.

mod decode;
mod measure;
mod quant;

use std::io::Write;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use decode::{decode_section, verify_section};
use falconer_engine::backend::cuda::kernels::{
    GemvKernel, GemvSplit, PairLaunch, ATTN_SPLIT_KEYS, ATTN_TC_MIN_CTX, PAIR_LAUNCH,
};
use falconer_engine::backend::cuda::CudaBackend;
use falconer_engine::config::FalconConfig;
use falconer_engine::error::BackendError;
use falconer_engine::ProgressFn;
use falconer_engine::{Falcon, LoadOptions, ModelDir, ModelRunner, SeqWork, WeightFormat};
use measure::*;
use serde_json::{json, Value};

pub(crate) const PROMPT: usize = 128;
pub(crate) const NEW_TOKENS: usize = 256;
const DECODE_RUNS: usize = 5;
const PREFILL: usize = 2048;
const VERIFY_CACHE: usize = 512;
pub(crate) const LONG_CONTEXT: usize = 32 * 1024;
pub(crate) const BLOCK: usize = 16;
/// HBM bandwidth used for the floor (device-to-device copy measured on the H200).
pub(crate) const HBM_BYTES_PER_S: f64 = 4.3e12;

const CONFIG_7B: &str = r#"{
  "model_type": "falcon",
  "architectures": ["FalconForCausalLM"],
  "vocab_size": 65024,
  "hidden_size": 4544,
  "num_hidden_layers": 32,
  "num_attention_heads": 71,
  "multi_query": true,
  "new_decoder_architecture": false,
  "parallel_attn": true,
  "bias": false,
  "alibi": false,
  "layer_norm_epsilon": 1e-5,
  "rope_theta": 10000.0,
  "max_position_embeddings": 2048,
  "bos_token_id": 11,
  "eos_token_id": 11,
  "tie_word_embeddings": true
}"#;

fn main() -> Result<()> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("config.json"), CONFIG_7B)?;
    let cfg = FalconConfig::from_file(&dir.path().join("config.json"))?;
    write_sparse_checkpoint(dir.path(), &cfg)?;
    // Checks the stand-in checkpoint (header, offsets, file size) before any GPU work.
    let files = ModelDir::new(dir.path()).weights()?;
    drop(files);
    let backend = match CudaBackend::synthetic(0, 20_241_128) {
        Ok(b) => Arc::new(b),
        Err(BackendError::Unavailable { reason, .. }) => {
            println!("skipped: no CUDA device ({reason})");
            return Ok(());
        }
        Err(e) => return Err(e).context("opening the CUDA backend"),
    };
    let gpu = backend.gpu();
    println!(
        "device: {} (sm_{}{}, {} SMs, {:.1} GiB)",
        gpu.device_name(),
        gpu.compute_capability().0,
        gpu.compute_capability().1,
        gpu.sm_count(),
        gpu.total_memory() as f64 / (1u64 << 30) as f64
    );

    let t = Instant::now();
    let opts = LoadOptions {
        layers: None,
        kv_blocks: (PREFILL + PROMPT + NEW_TOKENS + 64) / BLOCK * 2,
        block_size: BLOCK,
        progress: Some(ProgressFn::stderr_bar("uploading weights", 0)),
        weights: Default::default(),
    };
    let model = Falcon::load(&ModelDir::new(dir.path()), Arc::clone(&backend), &opts)?;
    backend.synchronize()?;
    let load_s = t.elapsed().as_secs_f64();
    let mut runner = ModelRunner::new(model);

    let weight_bytes = weight_bytes(&cfg, WeightFormat::Checkpoint);
    let floor_ms = weight_bytes as f64 / HBM_BYTES_PER_S * 1e3;
    let mut r = Report::default();
    r.out.insert("device".into(), json!(gpu.device_name()));
    r.out.insert("weight_bytes".into(), json!(weight_bytes));
    r.out.insert("load_s".into(), json!(load_s));

    // Memory bandwidth and GEMM peak, measured in this run.
    let copy_gbs = copy_bandwidth(&backend)?;
    r.row((
        "device-to-device copy (read+write)".into(),
        format!("{copy_gbs:.0} GB/s"),
    ));
    r.out.insert("copy_gb_s".into(), json!(copy_gbs));
    let (peak_tflops, peak_shape) = gemm_peak(&backend)?;
    r.row((
        "cuBLAS bf16 GEMM peak".into(),
        format!("{peak_tflops:.0} TFLOP/s ({peak_shape})"),
    ));
    r.out.insert("gemm_peak_tflops".into(), json!(peak_tflops));

    let only = std::env::var("BENCH_ONLY").ok();
    let want = |name: &str| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|s| s.trim() == name))
    };
    if only.as_deref() == Some("profile") {
        return profile(&backend, &mut runner, &cfg);
    }
    if want("gemv") {
        gemv_section(&backend, &cfg, &mut r)?;
    }
    if want("replica") {
        replica_section(&backend, &cfg, &mut r)?;
    }
    let tps = if want("decode") {
        Some(decode_section(
            &backend,
            &mut runner,
            &cfg,
            floor_ms,
            &mut r,
        )?)
    } else {
        None
    };
    let one = if want("verify") {
        Some(verify_section(&backend, &mut runner, &cfg, &mut r)?)
    } else {
        None
    };
    if want("prefill") {
        prefill_section(&mut runner, &cfg, peak_tflops, &mut r)?;
    }
    if want("attention") {
        attention_section(&backend, &cfg, copy_gbs, &mut r)?;
    }
    if want("quant") {
        quant::quant_section(&backend, dir.path(), &cfg, &mut r)?;
    }
    hf_section(tps.unwrap_or(f64::NAN), one.unwrap_or(f64::NAN), &mut r);

    let width = r.rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    println!("\nfalconer CUDA backend, Falcon-7B shape, random bf16 weights");
    println!("{}", "-".repeat(width + 60));
    for (k, v) in &r.rows {
        println!("{k:<width$}  {v}");
    }
    println!("{}", "-".repeat(width + 60));
    println!(
        "targets: >= 265 tokens/s decode, verify(5) <= 1.15x one step, prefill >= 50% of GEMM peak, 32k attention >= 80% of copy bandwidth"
    );

    if let Ok(path) = std::env::var("BENCH_OUT") {
        let mut f = std::fs::File::create(&path).with_context(|| format!("creating {path}"))?;
        writeln!(
            f,
            "{}",
            serde_json::to_string_pretty(&Value::Object(r.out))?
        )?;
    }
    Ok(())
}

/// The table rows and JSON fields the sections add.
#[derive(Default)]
struct Report {
    rows: Vec<(String, String)>,
    out: serde_json::Map<String, Value>,
}

impl Report {
    /// Adds a table row, and prints it at once (to stderr) so that a run cut short
    /// still shows what it measured.
    fn row(&mut self, (k, v): (String, String)) {
        eprintln!("{k}: {v}");
        self.rows.push((k, v));
    }
}

/// Per-shape GEMV bandwidth for 1 and 5 rows, the one-row variants, the tensor-core
/// GEMV by blocks per SM.
fn gemv_section(backend: &CudaBackend, cfg: &FalconConfig, r: &mut Report) -> Result<()> {
    let gpu = backend.gpu();
    // Per-shape GEMV bandwidth (batch 1): the decode step is these plus small ops.
    let h = cfg.hidden_size;
    let shapes = [
        ("qkv", cfg.qkv_rows(), h),
        ("dense", h, h),
        ("h_to_4h", cfg.ffn_hidden_size, h),
        ("4h_to_h", h, cfg.ffn_hidden_size),
        ("lm_head", cfg.vocab_size, h),
    ];
    let mut gemv = serde_json::Map::new();
    let mut est_ms = 0.0;
    // Both few-row kernels: tensor cores and CUDA cores (one row takes CUDA cores by
    // default, 2 to 8 rows tensor cores).
    for (name, n, k) in shapes {
        let mut cells = Vec::new();
        for r in [1usize, 5] {
            let mut cell = Vec::new();
            for (kind, kernel) in [("tc4", GemvKernel::Tc4), ("simt", GemvKernel::Simt)] {
                gpu.set_gemv_kernel(kernel);
                let (us, gbs) = gemv_bandwidth(backend, n, k, r)?;
                cell.push(format!("{kind} {us:.1}us {gbs:.0}"));
                gemv.insert(
                    format!("{name}_r{r}_{kind}"),
                    json!({"us": us, "gb_s": gbs}),
                );
                // The per-token estimate with the kernel one row takes by default.
                if r == 1 && kernel == GemvKernel::Simt {
                    let per_token = if name == "lm_head" {
                        1.0
                    } else {
                        cfg.num_layers as f64
                    };
                    est_ms += us * per_token / 1e3;
                }
            }
            cells.push(format!("R={r}: {}", cell.join(", ")));
        }
        gpu.set_gemv_kernel(GemvKernel::Auto);
        r.rows
            .push((format!("GEMV {n}x{k} ({name}), us GB/s"), cells.join(" | ")));
    }
    r.rows
        .push(("sum of GEMVs per token".into(), format!("{est_ms:.3} ms")));

    // One-row products by warps per output (GemvSplit): those whose rows are longer than
    // their output count (the MLP down projection alone, and fused with the attention
    // output projection as decode runs it), then, the split applied to every one-row
    // GEMV, the paired qkv and MLP up projections and the lm_head.
    let (split_default, all_default) = (gpu.gemv_split(), gpu.gemv_split_all());
    let mut by_split = serde_json::Map::new();
    type Piece<'a> = (&'a str, &'a dyn Fn() -> Result<(f64, f64)>);
    let mut split_row = |all: bool, title: String, pieces: &[Piece<'_>]| -> Result<()> {
        gpu.set_gemv_split_all(all);
        let mut cells = Vec::new();
        for split in [GemvSplit::One, GemvSplit::Two, GemvSplit::Four] {
            gpu.set_gemv_split(split);
            let w = split as u32;
            let mut parts = Vec::new();
            for (name, f) in pieces {
                let (us, gbs) = f()?;
                parts.push(format!("{name} {us:.1}us {gbs:.0}"));
                let key = format!("{}split{w}_{name}", if all { "all_" } else { "" });
                by_split.insert(key, json!({"us": us, "gb_s": gbs}));
            }
            cells.push(format!("{w}: {}", parts.join(", ")));
        }
        gpu.set_gemv_split(split_default);
        gpu.set_gemv_split_all(all_default);
        r.row((title, cells.join(" | ")));
        Ok(())
    };
    let ffn = cfg.ffn_hidden_size;
    split_row(
        false,
        format!(
            "one-row GEMV by warps per output (default {}), us GB/s",
            split_default as u32
        ),
        &[
            ("4h_to_h", &|| gemv_bandwidth(backend, h, ffn, 1)),
            ("sum", &|| sum_bandwidth(backend, h, h, ffn)),
        ],
    )?;
    split_row(
        true,
        "one-row GEMV, split applied to every GEMV, us GB/s".into(),
        &[
            ("qkv+h_to_4h", &|| {
                pair_bandwidth(backend, cfg.qkv_rows(), ffn, h)
            }),
            ("lm_head", &|| gemv_bandwidth(backend, cfg.vocab_size, h, 1)),
        ],
    )?;
    r.out
        .insert("gemv_by_split".into(), Value::Object(by_split));

    // The split-K tensor-core GEMV by blocks per SM (more splits start more loads at
    // once; fewer cost less in partial sums).
    let bps_default = gpu.tc_blocks_per_sm();
    gpu.set_gemv_kernel(GemvKernel::Tc4);
    let mut cells = Vec::new();
    let mut sweep = serde_json::Map::new();
    for bps in [4usize, 8, 16, 24] {
        gpu.set_tc_blocks_per_sm(bps);
        let mut parts = Vec::new();
        for (name, n, k) in &shapes[..4] {
            let (name, n, k) = (*name, *n, *k);
            let (us, _) = gemv_bandwidth(backend, n, k, 5)?;
            parts.push(format!("{us:.1}"));
            sweep.insert(format!("{bps}_{name}_r5_us"), json!(us));
        }
        cells.push(format!("{bps}: {}", parts.join("/")));
    }
    gpu.set_tc_blocks_per_sm(bps_default);
    gpu.set_gemv_kernel(GemvKernel::Auto);
    r.row((
        "tc GEMV r=5 us by blocks/SM (qkv/dense/h_to_4h/4h_to_h)".into(),
        cells.join(" | "),
    ));
    r.out.insert("tc_blocks_sweep".into(), Value::Object(sweep));
    r.out.insert("gemv".into(), Value::Object(gemv));
    r.out.insert("gemv_sum_ms".into(), json!(est_ms));
    Ok(())
}

fn replica_section(backend: &CudaBackend, cfg: &FalconConfig, r: &mut Report) -> Result<()> {
    // One decode step's layer ops replayed directly on the backend (same weights every
    // layer: 414 MB per layer cannot stay in L2): host time to queue them against GPU
    // time, and the same with the GEMVs alone.
    // All ops with the MLP down projection forked beside the attention and not.
    let gpu = backend.gpu();
    let fork_default = gpu.fork_mlp();
    for (label, key, full, fork) in [
        ("all ops, MLP forked", "all_fork", true, true),
        ("all ops, MLP not forked", "all", true, false),
        ("GEMVs only", "gemv", false, fork_default),
    ] {
        gpu.set_fork_mlp(fork);
        let rep = layer_replica(backend, cfg, PROMPT + NEW_TOKENS, full);
        gpu.set_fork_mlp(fork_default);
        let rep = rep?;
        let (total_ms, enqueue_ms) = (rep.total_ms, rep.enqueue_ms);
        r.row((
            format!("decode step layers replayed ({label}), 32 layers"),
            format!("{total_ms:.3} ms GPU+host, {enqueue_ms:.3} ms to queue on the host"),
        ));
        r.out.insert(
            format!("replica_{key}"),
            json!({"total_ms": total_ms, "enqueue_ms": enqueue_ms, "graph_ms": rep.graph_ms}),
        );
        if let Some(graph_ms) = rep.graph_ms {
            r.row((
                format!("decode step layers ({label}) captured as one CUDA graph"),
                format!("{graph_ms:.3} ms a replay (the stream above: {total_ms:.3} ms)"),
            ));
        }
    }
    Ok(())
}

fn prefill_section(
    runner: &mut ModelRunner<CudaBackend>,
    cfg: &FalconConfig,
    peak_tflops: f64,
    r: &mut Report,
) -> Result<()> {
    let vocab = cfg.vocab_size as u32;
    // Prefill of 2048 tokens.
    let mut pre = Vec::new();
    for run in 0..4 {
        let seq = 200 + run;
        runner.add_sequence(seq)?;
        let toks = tokens(PREFILL, vocab, 500 + run);
        let t = Instant::now();
        runner.forward(&[SeqWork {
            seq,
            tokens: &toks,
            all_logits: false,
        }])?;
        pre.push(t.elapsed().as_secs_f64());
        runner.remove_sequence(seq)?;
    }
    let pre_s = median(&pre[1..]);
    let (linear_flops, attn_flops) = prefill_flops(cfg, PREFILL);
    let tflops = (linear_flops + attn_flops) / pre_s / 1e12;
    r.row((
        format!("prefill {PREFILL} tokens"),
        format!(
            "{:.1} ms, {tflops:.0} TFLOP/s = {:.0}% of GEMM peak ({:.1} TFLOP linear + {:.1} attention)",
            pre_s * 1e3,
            tflops / peak_tflops * 100.0,
            linear_flops / 1e12,
            attn_flops / 1e12
        ),
    ));
    r.out.insert("prefill_ms".into(), json!(pre_s * 1e3));
    r.out.insert("prefill_tflops".into(), json!(tflops));
    r.out.insert(
        "prefill_fraction_of_peak".into(),
        json!(tflops / peak_tflops),
    );
    Ok(())
}

fn attention_section(
    backend: &CudaBackend,
    cfg: &FalconConfig,
    copy_gbs: f64,
    r: &mut Report,
) -> Result<()> {
    // Decode attention at a 32k context, all layers: with the kernels' keys loaded
    // before their PDL wait (the default) and after it, interleaved three times.
    let gpu = backend.gpu();
    let early_default = gpu.early_kv();
    let (mut early, mut late) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        for (on, into) in [(true, &mut early), (false, &mut late)] {
            gpu.set_early_kv(on);
            into.push(long_attention(backend, cfg, 20)?.0);
        }
    }
    gpu.set_early_kv(early_default);
    let layer_bytes = kv_layer_bytes(cfg, LONG_CONTEXT);
    let kv_bytes = cfg.num_layers * layer_bytes;
    let attn_ms = median(if early_default { &early } else { &late });
    let attn_gbs = kv_bytes as f64 / attn_ms / 1e6;
    r.row((
        format!(
            "decode attention, {}k context, {} layers",
            LONG_CONTEXT / 1024,
            cfg.num_layers
        ),
        format!(
            "{attn_ms:.3} ms, {attn_gbs:.0} GB/s of KV = {:.0}% of copy bandwidth",
            attn_gbs / copy_gbs * 100.0
        ),
    ));
    r.out.insert("attention_32k_ms".into(), json!(attn_ms));
    r.out.insert("attention_32k_gb_s".into(), json!(attn_gbs));
    let (early_ms, late_ms) = (median(&early), median(&late));
    r.row((
        format!(
            "decode attention, {}k context: keys loaded before / after the PDL wait",
            LONG_CONTEXT / 1024
        ),
        format!(
            "{early_ms:.3} / {late_ms:.3} ms (median of 3 interleaved; default {})",
            if early_default { "before" } else { "after" }
        ),
    ));
    r.out
        .insert("attention_32k_early_kv_ms".into(), json!(early));
    r.out.insert("attention_32k_late_kv_ms".into(), json!(late));
    // The same bytes per launch, copied: what one layer's worth of KV allows at all.
    let copy_layer_gbs = layer_copy_bandwidth(backend, layer_bytes, cfg.num_layers)?;
    r.row((
        format!(
            "device copy of one layer's KV ({:.1} MB) per launch, {} launches",
            layer_bytes as f64 / 1e6,
            cfg.num_layers
        ),
        format!(
            "{copy_layer_gbs:.0} GB/s read; attention reads at {:.0}% of it",
            attn_gbs / copy_layer_gbs * 100.0
        ),
    ));
    r.out
        .insert("layer_copy_gb_s".into(), json!(copy_layer_gbs));
    // The same layers as one CUDA graph: what launching them one by one costs.
    match long_attention_graph(backend, cfg) {
        Ok(graph_ms) => {
            r.row((
                format!(
                    "decode attention, {}k context, as one CUDA graph",
                    LONG_CONTEXT / 1024
                ),
                format!(
                    "{graph_ms:.3} ms a replay, {:.0} GB/s of KV",
                    kv_bytes as f64 / graph_ms / 1e6
                ),
            ));
            r.out
                .insert("attention_32k_graph_ms".into(), json!(graph_ms));
        }
        Err(e) => eprintln!("attention as a CUDA graph: {e:#}"),
    }
    in_step_kv_section(backend, cfg, copy_gbs, r)
}

/// What a 32k context costs inside a whole decode step: every layer's ops (the model's
/// calls, as one CUDA graph) at the long context against the same at the bench's
/// decode context, three interleaved runs each. The extra time reads the extra KV; with
/// the MLP forked, the attention's latency-bound kernels run beside the down projection,
/// so this is what a user's step pays for the KV, where the figure above times the
/// attention launches alone.
fn in_step_kv_section(
    backend: &CudaBackend,
    cfg: &FalconConfig,
    copy_gbs: f64,
    r: &mut Report,
) -> Result<()> {
    let short_ctx = PROMPT + NEW_TOKENS;
    let (mut short, mut long) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        for (ctx, into) in [(short_ctx, &mut short), (LONG_CONTEXT, &mut long)] {
            let rep = layer_replica(backend, cfg, ctx, true)?;
            into.push(rep.graph_ms.unwrap_or(rep.total_ms));
        }
    }
    let (short_ms, long_ms) = (median(&short), median(&long));
    let extra_bytes = (LONG_CONTEXT - short_ctx) * cfg.kv_bytes_per_token(2);
    let extra_ms = long_ms - short_ms;
    let gbs = extra_bytes as f64 / extra_ms / 1e6;
    r.row((
        format!(
            "decode step layers at {}k against {short_ctx} context (one graph, median of 3)",
            LONG_CONTEXT / 1024
        ),
        format!(
            "{long_ms:.3} / {short_ms:.3} ms: the extra {:.0} MB of KV cost {extra_ms:.3} ms, \
             {gbs:.0} GB/s = {:.0}% of copy bandwidth",
            extra_bytes as f64 / 1e6,
            gbs / copy_gbs * 100.0
        ),
    ));
    r.out.insert(
        "in_step_kv".into(),
        json!({"long_ms": long, "short_ms": short, "short_ctx": short_ctx,
               "extra_bytes": extra_bytes, "gb_s": gbs,
               "fraction_of_copy": gbs / copy_gbs, "fork_mlp": backend.gpu().fork_mlp()}),
    );
    Ok(())
}

/// HF transformers' figures from `HF_BASELINE_JSON`, next to falconer's `tps` (decode
/// tokens/s) and `one` (one-token step, seconds).
fn hf_section(tps: f64, one: f64, r: &mut Report) {
    // The HF transformers baseline (benches/hf_baseline.py), run in the same device call.
    if let Ok(path) = std::env::var("HF_BASELINE_JSON") {
        match std::fs::read_to_string(&path)
            .map_err(anyhow::Error::from)
            .and_then(|t| Ok(serde_json::from_str::<Value>(&t)?))
        {
            Ok(hf) => {
                let f = |k: &str| hf.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
                let version = hf
                    .get("transformers")
                    .and_then(Value::as_str)
                    .unwrap_or("?");
                let hf_tps = f("decode_tokens_per_s");
                r.row((
                    format!("HF transformers {version} eager: decode, same shape"),
                    format!(
                        "{hf_tps:.1} tokens/s ({:.2} ms/token); falconer {:.1}x",
                        f("decode_ms_per_token"),
                        tps / hf_tps
                    ),
                ));
                r.row((
                    format!(
                        "HF verify(5) vs one-token step, {}-token cache",
                        f("cache_len")
                    ),
                    format!(
                        "{:.3} ms vs {:.3} ms = {:.3}x; falconer step {:.1}x faster",
                        f("verify_5_ms"),
                        f("step_1_ms"),
                        f("verify_ratio"),
                        f("step_1_ms") / (one * 1e3)
                    ),
                ));
                r.out.insert("hf_baseline".into(), hf);
            }
            Err(e) => r
                .rows
                .push(("HF baseline".into(), format!("unreadable {path}: {e}"))),
        }
    }
}

/// For a profiler: a 128-token prompt, 4 greedy decode steps, one pass of decode
/// attention at the long context over all layers.
fn profile(
    backend: &CudaBackend,
    runner: &mut ModelRunner<CudaBackend>,
    cfg: &FalconConfig,
) -> Result<()> {
    let vocab = cfg.vocab_size as u32;
    let seq = 1;
    runner.add_sequence(seq)?;
    let prompt = tokens(PROMPT, vocab, 1);
    runner.forward(&[SeqWork {
        seq,
        tokens: &prompt,
        all_logits: false,
    }])?;
    let mut next = 0;
    for _ in 0..4 {
        let work = [SeqWork {
            seq,
            tokens: &[next],
            all_logits: false,
        }];
        next = runner.forward_greedy(&work)?[0][0].context("no usable logit")?;
    }
    runner.remove_sequence(seq)?;
    backend.synchronize()?;
    let (ms, gbs) = long_attention(backend, cfg, 1)?;
    println!("profile: long-context attention {ms:.3} ms, {gbs:.0} GB/s");
    Ok(())
}
