//! The `quant` section: int8 and int4 weights (`WeightFormat`) on the GPU. Per-shape
//! integer GEMV bandwidth beside the bf16 GEMV, then whole-model batch-1 decode with each
//! format against its own weight-streaming floor.
//!
//! The integer weights are quantized by the loader from the stand-in checkpoint, whose
//! values are zeros (all integers 0, scales 0): the integer kernels do the same loads and
//! arithmetic whatever the values, so the timings are those of real weights; the tokens
//! decoded are meaningless.

use std::sync::Arc;

use anyhow::Result;
use falconer_engine::backend::cuda::{upload_quant_weight, CudaBackend};
use falconer_engine::config::FalconConfig;
use falconer_engine::quant::{Quant, QuantMatrix};
use falconer_engine::{Falcon, LoadOptions, ModelDir, ModelRunner, WeightFormat};
use serde_json::json;

use crate::measure::{decode_runs, gemv_bandwidth, median, time_it, weight_bytes, Pick};
use crate::{Report, BLOCK, HBM_BYTES_PER_S, NEW_TOKENS, PROMPT};

/// Deterministic weights in (-0.05, 0.05), quantized on the host.
fn quantized(n: usize, k: usize, quant: Quant) -> Result<QuantMatrix> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let w: Vec<f32> = (0..n * k)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect();
    Ok(QuantMatrix::quantize(&w, n, k, quant)?)
}

pub(crate) fn quant_section(
    backend: &Arc<CudaBackend>,
    dir: &std::path::Path,
    cfg: &FalconConfig,
    r: &mut Report,
) -> Result<()> {
    let gpu = backend.gpu();
    let h = cfg.hidden_size;
    let mut gemv = serde_json::Map::new();
    for (name, n, k) in [
        ("qkv", cfg.qkv_rows(), h),
        ("dense", h, h),
        ("h_to_4h", cfg.ffn_hidden_size, h),
        ("4h_to_h", h, cfg.ffn_hidden_size),
    ] {
        let mut cells = Vec::new();
        for (label, quant) in [("int8", Quant::Int8), ("int4", Quant::Int4 { group: 64 })] {
            let w = upload_quant_weight(gpu, &quantized(n, k, quant)?)?;
            for rows in [1usize, 5] {
                let mut x = gpu.alloc::<f32>(rows * k)?;
                gpu.fill_uniform_f32(&mut x, 9, 1.0, 0.0)?;
                let s = time_it(backend, 50, || {
                    let _y = gpu.linear_quant(&x, rows, &w, None, &[])?;
                    Ok(())
                })?;
                let gbs = w.byte_size() as f64 / s / 1e9;
                cells.push(format!("{label} R={rows} {:.1}us {gbs:.0}", s * 1e6));
                gemv.insert(
                    format!("{name}_{label}_r{rows}"),
                    json!({"us": s * 1e6, "gb_s": gbs, "bytes": w.byte_size()}),
                );
            }
        }
        let (us, gbs) = gemv_bandwidth(backend, n, k, 1)?;
        cells.push(format!("bf16 R=1 {us:.1}us {gbs:.0}"));
        r.row((
            format!("integer GEMV {n}x{k} ({name}), us GB/s"),
            cells.join(" | "),
        ));
    }
    r.out
        .insert("quant_gemv".into(), serde_json::Value::Object(gemv));

    let mut decode = serde_json::Map::new();
    for format in [WeightFormat::Int8, WeightFormat::INT4] {
        let opts = LoadOptions {
            layers: None,
            kv_blocks: (PROMPT + NEW_TOKENS + 64) / BLOCK * 2,
            block_size: BLOCK,
            progress: None,
            weights: format,
        };
        let t = std::time::Instant::now();
        let model = Falcon::load(&ModelDir::new(dir), Arc::clone(backend), &opts)?;
        backend.synchronize()?;
        let load_s = t.elapsed().as_secs_f64();
        let mut runner = ModelRunner::new(model);
        let s = decode_runs(&mut runner, cfg.vocab_size as u32, 4, Pick::DeviceArgmax)?;
        let tps = NEW_TOKENS as f64 / median(&s[1..]);
        let floor_ms = weight_bytes(cfg, format) as f64 / HBM_BYTES_PER_S * 1e3;
        let pct = floor_ms / (1e3 / tps) * 100.0;
        r.row((
            format!("decode, {format} weights (batch 1, {NEW_TOKENS} tokens)"),
            format!(
                "{tps:.1} tokens/s ({:.2} ms/token, {pct:.0}% of its {floor_ms:.2} ms floor; load {load_s:.0} s)",
                1e3 / tps
            ),
        ));
        decode.insert(
            format.to_string(),
            json!({"tokens_per_s": tps, "floor_ms": floor_ms, "load_s": load_s, "runs_s": s}),
        );
    }
    r.out
        .insert("quant_decode".into(), serde_json::Value::Object(decode));
    Ok(())
}
