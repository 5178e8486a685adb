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
//! - per-op figures that explain the decode step (GEMV bandwidth per weight shape).
//!
//! With `HF_BASELINE_JSON` naming the output of `benches/hf_baseline.py` (HF transformers
//! on the same shapes, run just before in the same device call), its figures join the
//! table and the JSON.
//!
//! Prints one table; writes JSON to `$BENCH_OUT` when set. Without a GPU it prints
//! `skipped: no CUDA device (...)` and exits 0.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use falconer_engine::backend::cuda::kernels::{GemvKernel, ATTN_TC_MIN_CTX};
use falconer_engine::backend::cuda::CudaBackend;
use falconer_engine::backend::{AttnConfig, Backend, KvLayout, SeqMeta, StepMeta};
use falconer_engine::config::FalconConfig;
use falconer_engine::error::BackendError;
use falconer_engine::model::expected_tensors;
use falconer_engine::posenc::rope::Rope;
use falconer_engine::sampling::argmax;
use falconer_engine::ProgressFn;
use falconer_engine::{Falcon, LoadOptions, ModelDir, ModelRunner, SeqWork};
use serde_json::{json, Value};

const PROMPT: usize = 128;
const NEW_TOKENS: usize = 256;
const DECODE_RUNS: usize = 5;
const PREFILL: usize = 2048;
const VERIFY_CACHE: usize = 512;
const LONG_CONTEXT: usize = 32 * 1024;
const BLOCK: usize = 16;
/// HBM bandwidth used for the floor (device-to-device copy measured on the H200).
const HBM_BYTES_PER_S: f64 = 4.3e12;

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
    };
    let model = Falcon::load(&ModelDir::new(dir.path()), Arc::clone(&backend), &opts)?;
    backend.synchronize()?;
    let load_s = t.elapsed().as_secs_f64();
    let mut runner = ModelRunner::new(model);

    let weight_bytes = weight_bytes(&cfg);
    let floor_ms = weight_bytes as f64 / HBM_BYTES_PER_S * 1e3;
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut out = serde_json::Map::new();
    out.insert("device".into(), json!(gpu.device_name()));
    out.insert("weight_bytes".into(), json!(weight_bytes));
    out.insert("load_s".into(), json!(load_s));

    // Memory bandwidth and GEMM peak, measured in this run.
    let copy_gbs = copy_bandwidth(&backend)?;
    rows.push((
        "device-to-device copy (read+write)".into(),
        format!("{copy_gbs:.0} GB/s"),
    ));
    out.insert("copy_gb_s".into(), json!(copy_gbs));
    let (peak_tflops, peak_shape) = gemm_peak(&backend)?;
    rows.push((
        "cuBLAS bf16 GEMM peak".into(),
        format!("{peak_tflops:.0} TFLOP/s ({peak_shape})"),
    ));
    out.insert("gemm_peak_tflops".into(), json!(peak_tflops));

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
                let (us, gbs) = gemv_bandwidth(&backend, n, k, r)?;
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
        rows.push((format!("GEMV {n}x{k} ({name}), us GB/s"), cells.join(" | ")));
    }
    rows.push(("sum of GEMVs per token".into(), format!("{est_ms:.3} ms")));

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
            let (us, _) = gemv_bandwidth(&backend, n, k, 5)?;
            parts.push(format!("{us:.1}"));
            sweep.insert(format!("{bps}_{name}_r5_us"), json!(us));
        }
        cells.push(format!("{bps}: {}", parts.join("/")));
    }
    gpu.set_tc_blocks_per_sm(bps_default);
    gpu.set_gemv_kernel(GemvKernel::Auto);
    rows.push((
        "tc GEMV r=5 us by blocks/SM (qkv/dense/h_to_4h/4h_to_h)".into(),
        cells.join(" | "),
    ));
    out.insert("tc_blocks_sweep".into(), Value::Object(sweep));
    out.insert("gemv".into(), Value::Object(gemv));
    out.insert("gemv_sum_ms".into(), json!(est_ms));

    // One decode step's layer ops replayed directly on the backend (same weights every
    // layer: 414 MB per layer cannot stay in L2): host time to queue them against GPU
    // time, and the same with the GEMVs alone.
    for (label, full) in [("all ops", true), ("GEMVs only", false)] {
        let (enqueue_ms, total_ms) = layer_replica(&backend, &cfg, PROMPT + NEW_TOKENS, full)?;
        rows.push((
            format!("decode step layers replayed ({label}), 32 layers"),
            format!("{total_ms:.3} ms GPU+host, {enqueue_ms:.3} ms to queue on the host"),
        ));
        out.insert(
            format!("replica_{}", if full { "all" } else { "gemv" }),
            json!({"total_ms": total_ms, "enqueue_ms": enqueue_ms}),
        );
    }

    // Batch-1 greedy decode, first without programmatic dependent launch (for the
    // comparison), then as configured.
    let vocab = cfg.vocab_size as u32;
    let pdl_default = gpu.pdl();
    if pdl_default {
        gpu.set_pdl(false);
        let s = decode_runs(&mut runner, vocab, 3, false)?;
        let tps = NEW_TOKENS as f64 / median(&s[1..]);
        rows.push((
            "decode without programmatic dependent launch".into(),
            format!("{tps:.1} tokens/s (median of 2)"),
        ));
        out.insert("decode_no_pdl_tokens_per_s".into(), json!(tps));
        gpu.set_pdl(true);
    }
    out.insert("pdl".into(), json!(pdl_default));
    gpu.set_row_invariant(true);
    let s = decode_runs(&mut runner, vocab, 3, false)?;
    gpu.set_row_invariant(false);
    let tps_x = NEW_TOKENS as f64 / median(&s[1..]);
    rows.push((
        "decode with row-invariant (runtime) kernels".into(),
        format!("{tps_x:.1} tokens/s (median of 2)"),
    ));
    out.insert("decode_row_invariant_tokens_per_s".into(), json!(tps_x));
    gpu.set_attn_tc_min_ctx(0);
    let s = decode_runs(&mut runner, vocab, 3, false)?;
    gpu.set_attn_tc_min_ctx(ATTN_TC_MIN_CTX);
    let tps_tc = NEW_TOKENS as f64 / median(&s[1..]);
    rows.push((
        "decode with tensor-core attention at every context".into(),
        format!("{tps_tc:.1} tokens/s (median of 2; default from {ATTN_TC_MIN_CTX})"),
    ));
    out.insert("decode_tc_attention_tokens_per_s".into(), json!(tps_tc));
    let s = decode_runs(&mut runner, vocab, 3, true)?;
    let tps_host = NEW_TOKENS as f64 / median(&s[1..]);
    rows.push((
        "decode with logits copied to the host (argmax there)".into(),
        format!("{tps_host:.1} tokens/s (median of 2)"),
    ));
    out.insert("decode_host_logits_tokens_per_s".into(), json!(tps_host));
    let decode_s = decode_runs(&mut runner, vocab, DECODE_RUNS, false)?;
    // The first run warms up (JIT, allocator pool).
    let med = median(&decode_s[1..]);
    let tps = NEW_TOKENS as f64 / med;
    let ms_tok = med * 1e3 / NEW_TOKENS as f64;
    rows.push((
        format!("decode, batch 1, {PROMPT}-token prompt, {NEW_TOKENS} new"),
        format!("{tps:.1} tokens/s (median of {})", DECODE_RUNS - 1),
    ));
    rows.push((
        "ms/token vs weight-streaming floor".into(),
        format!(
            "{ms_tok:.3} ms vs {floor_ms:.2} ms ({:.0}% of floor speed)",
            floor_ms / ms_tok * 100.0
        ),
    ));
    out.insert("decode_tokens_per_s".into(), json!(tps));
    out.insert("decode_ms_per_token".into(), json!(ms_tok));
    out.insert("decode_runs_s".into(), json!(decode_s));
    out.insert("floor_ms_per_token".into(), json!(floor_ms));

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
    let one_host = step_time(&mut runner, 1, true)?;
    let five_host = step_time(&mut runner, 5, true)?;
    rows.push((
        "verify(5) vs one step, logits copied to the host".into(),
        format!(
            "{:.3} ms vs {:.3} ms = {:.3}x",
            five_host * 1e3,
            one_host * 1e3,
            five_host / one_host
        ),
    ));
    out.insert(
        "verify_ratio_host_logits".into(),
        json!(five_host / one_host),
    );
    let one = step_time(&mut runner, 1, false)?;
    let mut by_bps = Vec::new();
    for bps in [4usize, 16, 24] {
        gpu.set_tc_blocks_per_sm(bps);
        let t = step_time(&mut runner, 5, false)?;
        by_bps.push(format!("{bps}: {:.3}x", t / one));
        out.insert(format!("verify_ratio_tc_blocks_{bps}"), json!(t / one));
    }
    gpu.set_tc_blocks_per_sm(bps_default);
    let five = step_time(&mut runner, 5, false)?;
    // The runtime's row-invariant products: a verify pass gives each row the bits of a
    // one-token step (greedy speculation equals plain greedy decoding by construction).
    gpu.set_row_invariant(true);
    let one_x = step_time(&mut runner, 1, false)?;
    let five_x = step_time(&mut runner, 5, false)?;
    gpu.set_row_invariant(false);
    rows.push((
        "verify(5) vs one step, row-invariant (runtime) kernels".into(),
        format!(
            "{:.3} ms vs {:.3} ms = {:.3}x",
            five_x * 1e3,
            one_x * 1e3,
            five_x / one_x
        ),
    ));
    out.insert("row_invariant_step_1_ms".into(), json!(one_x * 1e3));
    out.insert("row_invariant_verify_5_ms".into(), json!(five_x * 1e3));
    out.insert("row_invariant_verify_ratio".into(), json!(five_x / one_x));
    runner.remove_sequence(seq)?;
    rows.push((
        "verify(5) ratio by tc GEMV blocks/SM".into(),
        format!("{} (default {bps_default})", by_bps.join(", ")),
    ));
    rows.push((
        format!("verify(5) vs one-token step, {VERIFY_CACHE}-token cache, argmax on device"),
        format!(
            "{:.3} ms vs {:.3} ms = {:.3}x",
            five * 1e3,
            one * 1e3,
            five / one
        ),
    ));
    out.insert("step_1_ms".into(), json!(one * 1e3));
    out.insert("verify_5_ms".into(), json!(five * 1e3));
    out.insert("verify_ratio".into(), json!(five / one));

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
    let (linear_flops, attn_flops) = prefill_flops(&cfg, PREFILL);
    let tflops = (linear_flops + attn_flops) / pre_s / 1e12;
    rows.push((
        format!("prefill {PREFILL} tokens"),
        format!(
            "{:.1} ms, {tflops:.0} TFLOP/s = {:.0}% of GEMM peak ({:.1} TFLOP linear + {:.1} attention)",
            pre_s * 1e3,
            tflops / peak_tflops * 100.0,
            linear_flops / 1e12,
            attn_flops / 1e12
        ),
    ));
    out.insert("prefill_ms".into(), json!(pre_s * 1e3));
    out.insert("prefill_tflops".into(), json!(tflops));
    out.insert(
        "prefill_fraction_of_peak".into(),
        json!(tflops / peak_tflops),
    );

    // Decode attention at a 32k context, all layers.
    let (attn_ms, attn_gbs) = long_attention(&backend, &cfg)?;
    rows.push((
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
    out.insert("attention_32k_ms".into(), json!(attn_ms));
    out.insert("attention_32k_gb_s".into(), json!(attn_gbs));

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
                rows.push((
                    format!("HF transformers {version} eager: decode, same shape"),
                    format!(
                        "{hf_tps:.1} tokens/s ({:.2} ms/token); falconer {:.1}x",
                        f("decode_ms_per_token"),
                        tps / hf_tps
                    ),
                ));
                rows.push((
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
                out.insert("hf_baseline".into(), hf);
            }
            Err(e) => rows.push(("HF baseline".into(), format!("unreadable {path}: {e}"))),
        }
    }

    let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    println!("\nfalconer CUDA backend, Falcon-7B shape, random bf16 weights");
    println!("{}", "-".repeat(width + 60));
    for (k, v) in &rows {
        println!("{k:<width$}  {v}");
    }
    println!("{}", "-".repeat(width + 60));
    println!(
        "targets: >= 265 tokens/s decode, verify(5) <= 1.15x one step, prefill >= 50% of GEMM peak, 32k attention >= 80% of copy bandwidth"
    );

    if let Ok(path) = std::env::var("BENCH_OUT") {
        let mut f = std::fs::File::create(&path).with_context(|| format!("creating {path}"))?;
        writeln!(f, "{}", serde_json::to_string_pretty(&Value::Object(out))?)?;
    }
    Ok(())
}

/// `runs` batch-1 greedy decodes of `NEW_TOKENS` after a `PROMPT`-token prompt: seconds
/// each (the first is a warm-up). Greedy tokens come from the device's argmax, or with
/// `host_logits` from logits copied to the host.
fn decode_runs(
    runner: &mut ModelRunner<CudaBackend>,
    vocab: u32,
    runs: usize,
    host_logits: bool,
) -> Result<Vec<f64>> {
    let mut decode_s = Vec::new();
    for run in 0..runs {
        let prompt = tokens(PROMPT, vocab, run as u64);
        let seq = 100 + run as u64;
        runner.add_sequence(seq)?;
        let first = runner.forward(&[SeqWork {
            seq,
            tokens: &prompt,
            all_logits: false,
        }])?;
        let mut next = argmax(first[0].last());
        let t = Instant::now();
        for _ in 0..NEW_TOKENS {
            let work = [SeqWork {
                seq,
                tokens: &[next],
                all_logits: false,
            }];
            next = if host_logits {
                argmax(runner.forward(&work)?[0].last())
            } else {
                runner.forward_greedy(&work)?[0][0].context("no usable logit")?
            };
        }
        decode_s.push(t.elapsed().as_secs_f64());
        runner.remove_sequence(seq)?;
    }
    Ok(decode_s)
}

/// A safetensors file of the right size whose data section is a hole: the header is
/// real, the 14 GB of weights are never written (nor read, by the synthetic backend).
fn write_sparse_checkpoint(dir: &Path, cfg: &FalconConfig) -> Result<()> {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape) in expected_tensors(cfg) {
        if cfg.tie_word_embeddings && name == "lm_head.weight" {
            continue;
        }
        let bytes = shape.iter().product::<usize>() * 2;
        header.insert(
            name,
            json!({"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut text = serde_json::to_string(&Value::Object(header))?;
    while text.len() % 8 != 0 {
        text.push(' ');
    }
    let mut f = std::fs::File::create(dir.join("model.safetensors"))?;
    f.write_all(&(text.len() as u64).to_le_bytes())?;
    f.write_all(text.as_bytes())?;
    f.set_len((8 + text.len() + offset) as u64)?;
    Ok(())
}

/// Bytes read per decoded token: every layer's matrices and the (tied) output head.
fn weight_bytes(cfg: &FalconConfig) -> usize {
    let h = cfg.hidden_size;
    let per_layer = cfg.qkv_rows() * h + h * h + 2 * cfg.ffn_hidden_size * h;
    (per_layer * cfg.num_layers + cfg.vocab_size * h) * 2
}

/// Multiply-add FLOPs of a prefill of `t` tokens: the linear layers (logits for the
/// last token only) and causal attention (QK^T and PV over the visible keys).
fn prefill_flops(cfg: &FalconConfig, t: usize) -> (f64, f64) {
    let h = cfg.hidden_size as f64;
    let per_layer = (cfg.qkv_rows() as f64 + h + 2.0 * cfg.ffn_hidden_size as f64) * h;
    let linear =
        2.0 * t as f64 * per_layer * cfg.num_layers as f64 + 2.0 * h * cfg.vocab_size as f64;
    let visible = (t * (t + 1) / 2) as f64;
    let attn = 4.0 * visible * (cfg.num_heads * cfg.head_dim) as f64 * cfg.num_layers as f64;
    (linear, attn)
}

fn tokens(n: usize, vocab: u32, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % u64::from(vocab)) as u32
        })
        .collect()
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs `f` `iters` times after one warm-up call, synchronised; seconds per call.
fn time_it(backend: &CudaBackend, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    backend.synchronize()?;
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    backend.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / iters as f64)
}

fn copy_bandwidth(backend: &CudaBackend) -> Result<f64> {
    let gpu = backend.gpu();
    let n = 1usize << 30; // 2 GiB of bf16
    let mut src = gpu.alloc(n)?;
    gpu.fill_uniform_bf16(&mut src, 1, 1.0)?;
    let s = time_it(backend, 10, || {
        let _copy = gpu.duplicate(&src)?;
        Ok(())
    })?;
    Ok(2.0 * (n * 2) as f64 / s / 1e9)
}

fn gemm_peak(backend: &CudaBackend) -> Result<(f64, String)> {
    let gpu = backend.gpu();
    let mut best = (0.0, String::new());
    for (m, n, k) in [
        (4096usize, 4096usize, 4096usize),
        (2048, 18176, 4544),
        (2048, 4672, 4544),
    ] {
        let mut a = gpu.alloc(m * k)?;
        let mut w = gpu.alloc(n * k)?;
        gpu.fill_uniform_bf16(&mut a, 2, 1.0)?;
        gpu.fill_uniform_bf16(&mut w, 3, 0.05)?;
        let mut c = gpu.alloc(m * n)?;
        let s = time_it(backend, 20, || Ok(gpu.gemm_bf16(&a, m, k, &w, n, &mut c)?))?;
        let tflops = 2.0 * (m * n * k) as f64 / s / 1e12;
        if tflops > best.0 {
            best = (tflops, format!("{m}x{n}x{k}"));
        }
    }
    Ok(best)
}

/// One `linear` of `rows` activation rows on an `[n, k]` bf16 weight: microseconds and
/// GB/s of weights.
fn gemv_bandwidth(backend: &CudaBackend, n: usize, k: usize, rows: usize) -> Result<(f64, f64)> {
    let gpu = backend.gpu();
    let mut w = gpu.alloc(n * k)?;
    gpu.fill_uniform_bf16(&mut w, 4, 0.05)?;
    let mut x = gpu.alloc(rows * k)?;
    gpu.fill_uniform_f32(&mut x, 5, 1.0, 0.0)?;
    let s = time_it(backend, 50, || {
        let _y = gpu.linear(&x, rows, k, &w, n, None, &[])?;
        Ok(())
    })?;
    Ok((s * 1e6, (n * k * 2) as f64 / s / 1e9))
}

/// One decode row at position 32k-1 attending over every layer's cache.
fn long_attention(backend: &CudaBackend, cfg: &FalconConfig) -> Result<(f64, f64)> {
    let blocks = LONG_CONTEXT / BLOCK;
    let layout = KvLayout {
        num_layers: cfg.num_layers,
        num_blocks: blocks,
        block_size: BLOCK,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
    };
    let mut kv = backend.alloc_kv(&layout)?;
    backend.fill_kv_uniform(&mut kv, 77)?;
    let pos = LONG_CONTEXT - 1;
    let rope = Rope::new(&cfg.rope, cfg.head_dim);
    let mut meta = StepMeta {
        token_ids: vec![0],
        slots: vec![pos as u32],
        block_size: BLOCK,
        seqs: vec![SeqMeta {
            first_row: 0,
            num_rows: 1,
            start_pos: pos,
            block_table: (0..blocks as u32).collect(),
        }],
        ..StepMeta::default()
    };
    rope.push_cos_sin(pos, pos + 1, &mut meta.rope_cos, &mut meta.rope_sin);
    let step = backend.prepare_step(&meta)?;
    let attn = AttnConfig {
        num_heads: cfg.num_heads,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        alibi_slopes: None,
    };
    let width = cfg.qkv_rows();
    let qkv: Vec<f32> = tokens(width, 1000, 3)
        .iter()
        .map(|&t| t as f32 / 500.0 - 1.0)
        .collect();
    let x = backend.upload_hidden(&qkv, 1, width)?;
    let s = time_it(backend, 20, || {
        for layer in 0..cfg.num_layers {
            backend.attention(&x, &mut kv, layer, &step, &attn)?;
        }
        Ok(())
    })?;
    let bytes = 2 * cfg.num_layers * LONG_CONTEXT * cfg.num_kv_heads * cfg.head_dim * 2;
    Ok((s * 1e3, bytes as f64 / s / 1e9))
}

/// Queues `cfg.num_layers` decode layers (one row at `ctx - 1`) through the backend ops
/// with one set of layer weights: host milliseconds to queue, and milliseconds until the
/// GPU is done. `full = false` queues only the four GEMVs per layer.
fn layer_replica(
    backend: &CudaBackend,
    cfg: &FalconConfig,
    ctx: usize,
    full: bool,
) -> Result<(f64, f64)> {
    let h = cfg.hidden_size;
    let f = cfg.ffn_hidden_size;
    let tensor = |shape: &[usize]| -> Result<_> {
        Ok(backend.upload(&falconer_engine::checkpoint::HostTensor {
            dtype: falconer_engine::checkpoint::Dtype::Bf16,
            shape,
            bytes: &[],
        })?)
    };
    let (qkv_w, dense_w) = (tensor(&[cfg.qkv_rows(), h])?, tensor(&[h, h])?);
    let (up_w, down_w) = (tensor(&[f, h])?, tensor(&[h, f])?);
    let (ln_w, ln_b) = (tensor(&[h])?, tensor(&[h])?);
    let blocks = ctx.div_ceil(BLOCK);
    let layout = KvLayout {
        num_layers: cfg.num_layers,
        num_blocks: blocks,
        block_size: BLOCK,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
    };
    let mut kv = backend.alloc_kv(&layout)?;
    backend.fill_kv_uniform(&mut kv, 5)?;
    let pos = ctx - 1;
    let rope = Rope::new(&cfg.rope, cfg.head_dim);
    let mut meta = StepMeta {
        token_ids: vec![0],
        slots: vec![pos as u32],
        block_size: BLOCK,
        seqs: vec![SeqMeta {
            first_row: 0,
            num_rows: 1,
            start_pos: pos,
            block_table: (0..blocks as u32).collect(),
        }],
        ..StepMeta::default()
    };
    rope.push_cos_sin(pos, pos + 1, &mut meta.rope_cos, &mut meta.rope_sin);
    let step = backend.prepare_step(&meta)?;
    let attn = AttnConfig {
        num_heads: cfg.num_heads,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        alibi_slopes: None,
    };
    let x0: Vec<f32> = tokens(h, 1000, 9)
        .iter()
        .map(|&t| t as f32 / 500.0 - 1.0)
        .collect();
    let mut enqueue = Vec::new();
    let mut total = Vec::new();
    for _ in 0..11 {
        let mut x = backend.upload_hidden(&x0, 1, h)?;
        backend.synchronize()?;
        let t = Instant::now();
        for layer in 0..cfg.num_layers {
            if full {
                let a = backend.layer_norm(&x, &ln_w, &ln_b, 1e-5)?;
                let qkv = backend.linear(&a, &qkv_w, None)?;
                let ctx_out = backend.attention(&qkv, &mut kv, layer, &step, &attn)?;
                backend.linear_add(&ctx_out, &dense_w, None, &mut x)?;
                let up = backend.linear_gelu(&a, &up_w, None)?;
                backend.linear_add(&up, &down_w, None, &mut x)?;
            } else {
                let qkv = backend.linear(&x, &qkv_w, None)?;
                let _ = qkv;
                let _d = backend.linear(&x, &dense_w, None)?;
                let up = backend.linear(&x, &up_w, None)?;
                let _down = backend.linear(&up, &down_w, None)?;
            }
        }
        enqueue.push(t.elapsed().as_secs_f64());
        backend.synchronize()?;
        total.push(t.elapsed().as_secs_f64());
    }
    Ok((median(&enqueue[1..]) * 1e3, median(&total[1..]) * 1e3))
}
