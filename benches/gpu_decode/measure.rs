//! The measurements behind the benchmark's rows: timed decode runs, bandwidth and peak
//! probes, the decode attention at a long context, a decode layer replayed op by op;
//! and the stand-in checkpoint they run on.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use falconer_engine::backend::cuda::kernels::{bf16, DeviceBuffer, Gpu, PairHalf, SumTerm};
use falconer_engine::backend::cuda::CudaBackend;
use falconer_engine::backend::{AttnConfig, Backend, KvLayout, ParallelWeights, SeqMeta, StepMeta};
use falconer_engine::config::FalconConfig;
use falconer_engine::model::{expected_tensors, linear_shapes};
use falconer_engine::posenc::rope::Rope;
use falconer_engine::sampling::{argmax, sample_from_probs, SamplingParams};
use falconer_engine::{ModelRunner, RowsOut, RowsWanted, SeqWork, WeightFormat};
use serde_json::{json, Value};

use crate::{BLOCK, LONG_CONTEXT, NEW_TOKENS, PROMPT};

/// How a decode step picks its token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pick {
    /// Greedy, the argmax taken on the device.
    DeviceArgmax,
    /// Greedy, logits copied to the host and the argmax taken there.
    HostArgmax,
    /// Sampled under [`SAMPLED`] from the distribution `Backend::warp_rows` gives
    /// (warped on the device or on the host, as the backend is set).
    Sampled,
}

/// The sampling parameters of [`Pick::Sampled`]: a common chat setting.
pub(crate) const SAMPLED: SamplingParams = SamplingParams {
    temperature: 0.8,
    top_k: 50,
    top_p: 0.95,
    repetition_penalty: 1.0,
    seed: 7,
};

/// `runs` batch-1 decodes of `NEW_TOKENS` after a `PROMPT`-token prompt: seconds each
/// (the first is a warm-up).
pub(crate) fn decode_runs(
    runner: &mut ModelRunner<CudaBackend>,
    vocab: u32,
    runs: usize,
    pick: Pick,
) -> Result<Vec<f64>> {
    let mut decode_s = Vec::new();
    let mut rng = SAMPLED.rng();
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
            next = match pick {
                Pick::HostArgmax => argmax(runner.forward(&work)?[0].last()),
                Pick::DeviceArgmax => {
                    runner.forward_greedy(&work)?[0][0].context("no usable logit")?
                }
                Pick::Sampled => {
                    let want = RowsWanted::Warped {
                        params: &SAMPLED,
                        history: &[],
                    };
                    match runner.forward_outputs(&work, &[want])?.pop() {
                        Some(RowsOut::Warped(rows)) => {
                            let p = rows.last().context("no row")?.as_ref();
                            sample_from_probs(p.map_err(|e| anyhow::anyhow!("{e}"))?, &mut rng)
                        }
                        other => anyhow::bail!("distributions expected, got {other:?}"),
                    }
                }
            };
        }
        decode_s.push(t.elapsed().as_secs_f64());
        runner.remove_sequence(seq)?;
    }
    Ok(decode_s)
}

/// Tokens/s of a decode configuration under comparison: three runs, the first a
/// warm-up, the median of the other two.
pub(crate) fn variant_tokens_per_s(
    runner: &mut ModelRunner<CudaBackend>,
    vocab: u32,
    pick: Pick,
) -> Result<f64> {
    let s = decode_runs(runner, vocab, 3, pick)?;
    Ok(NEW_TOKENS as f64 / median(&s[1..]))
}

/// A safetensors file of the right size whose data section is a hole: the header is
/// real, the 14 GB of weights are never written (nor read, by the synthetic backend).
pub(crate) fn write_sparse_checkpoint(dir: &Path, cfg: &FalconConfig) -> Result<()> {
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

/// Bytes read per decoded token with the layers' weights in `format`: every layer's
/// matrices (bf16, or integers and f32 scales) and the (tied) bf16 output head.
pub(crate) fn weight_bytes(cfg: &FalconConfig, format: WeightFormat) -> usize {
    let per_layer: usize = linear_shapes(cfg)
        .iter()
        .map(|&(_, n, k)| match format.quant() {
            None => 2 * n * k,
            Some(q) => {
                let s = q.stored_layout(n, k);
                s.shape.iter().product::<usize>() + 4 * s.scale_shape.iter().product::<usize>()
            }
        })
        .sum();
    per_layer * cfg.num_layers + 2 * cfg.vocab_size * cfg.hidden_size
}

/// Multiply-add FLOPs of a prefill of `t` tokens: the linear layers (logits for the
/// last token only) and causal attention (QK^T and PV over the visible keys).
pub(crate) fn prefill_flops(cfg: &FalconConfig, t: usize) -> (f64, f64) {
    let h = cfg.hidden_size as f64;
    let per_layer = (cfg.qkv_rows() as f64 + h + 2.0 * cfg.ffn_hidden_size as f64) * h;
    let linear =
        2.0 * t as f64 * per_layer * cfg.num_layers as f64 + 2.0 * h * cfg.vocab_size as f64;
    let visible = (t * (t + 1) / 2) as f64;
    let attn = 4.0 * visible * (cfg.num_heads * cfg.head_dim) as f64 * cfg.num_layers as f64;
    (linear, attn)
}

pub(crate) fn tokens(n: usize, vocab: u32, seed: u64) -> Vec<u32> {
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

pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs `f` `iters` times after one warm-up call, synchronised; seconds per call.
pub(crate) fn time_it(
    backend: &CudaBackend,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    f()?;
    backend.synchronize()?;
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    backend.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / iters as f64)
}

/// What a plain device copy reaches on `layers` buffers of `bytes` each, one launch per
/// buffer (as attention reads one layer's KV per launch): GB/s of bytes read. The
/// ceiling for reads this small is per-launch latency, not DRAM bandwidth.
pub(crate) fn layer_copy_bandwidth(
    backend: &CudaBackend,
    bytes: usize,
    layers: usize,
) -> Result<f64> {
    let gpu = backend.gpu();
    let mut bufs = Vec::with_capacity(layers);
    for l in 0..layers {
        let mut b = gpu.alloc(bytes / 2)?;
        gpu.fill_uniform_bf16(&mut b, l as u64, 1.0)?;
        bufs.push(b);
    }
    let s = time_it(backend, 20, || {
        for b in &bufs {
            let _copy = gpu.duplicate(b)?;
        }
        Ok(())
    })?;
    Ok((bytes * layers) as f64 / s / 1e9)
}

pub(crate) fn copy_bandwidth(backend: &CudaBackend) -> Result<f64> {
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

pub(crate) fn gemm_peak(backend: &CudaBackend) -> Result<(f64, String)> {
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

/// A device buffer of `len` seeded random bf16 weights.
fn random_weights(gpu: &Gpu, len: usize, seed: u64) -> Result<DeviceBuffer<bf16>> {
    let mut w = gpu.alloc(len)?;
    gpu.fill_uniform_bf16(&mut w, seed, 0.05)?;
    Ok(w)
}

/// A device buffer of `len` seeded random f32 activations in [-1, 1).
fn random_inputs(gpu: &Gpu, len: usize, seed: u64) -> Result<DeviceBuffer<f32>> {
    let mut x = gpu.alloc(len)?;
    gpu.fill_uniform_f32(&mut x, seed, 1.0, 0.0)?;
    Ok(x)
}

/// One `linear` of `rows` activation rows on an `[n, k]` bf16 weight: microseconds and
/// GB/s of weights.
pub(crate) fn gemv_bandwidth(
    backend: &CudaBackend,
    n: usize,
    k: usize,
    rows: usize,
) -> Result<(f64, f64)> {
    let gpu = backend.gpu();
    let w = random_weights(gpu, n * k, 4)?;
    let x = random_inputs(gpu, rows * k, 5)?;
    let s = time_it(backend, 50, || {
        let _y = gpu.linear(&x, rows, k, &w, n, None, &[])?;
        Ok(())
    })?;
    Ok((s * 1e6, (n * k * 2) as f64 / s / 1e9))
}

/// One row's fused residual sum `acc += xa @ wa^T + xb @ wb^T` (`[n, ka]` and `[n, kb]`
/// bf16 weights, as Falcon's attention output and MLP down projections): microseconds
/// and GB/s of weights.
pub(crate) fn sum_bandwidth(
    backend: &CudaBackend,
    n: usize,
    ka: usize,
    kb: usize,
) -> Result<(f64, f64)> {
    let gpu = backend.gpu();
    let (wa, wb) = (
        random_weights(gpu, n * ka, 6)?,
        random_weights(gpu, n * kb, 7)?,
    );
    let (xa, xb) = (random_inputs(gpu, ka, 8)?, random_inputs(gpu, kb, 9)?);
    let mut acc = random_inputs(gpu, n, 10)?;
    let term = |x, k, w| SumTerm {
        x,
        k,
        w,
        bias: None,
    };
    let s = time_it(backend, 50, || {
        gpu.linear_accumulate_sum(
            1,
            n,
            term(&xa, ka, &wa),
            term(&xb, kb, &wb),
            &mut acc,
            &[1],
            false,
        )?;
        Ok(())
    })?;
    Ok((s * 1e6, (n * (ka + kb) * 2) as f64 / s / 1e9))
}

/// One row's paired products `x @ wa^T`, `gelu(x @ wb^T)` in one launch (Falcon's qkv
/// and MLP up projections, `[na, k]` and `[nb, k]` bf16 weights): microseconds and GB/s
/// of weights.
pub(crate) fn pair_bandwidth(
    backend: &CudaBackend,
    na: usize,
    nb: usize,
    k: usize,
) -> Result<(f64, f64)> {
    let gpu = backend.gpu();
    let (wa, wb) = (
        random_weights(gpu, na * k, 11)?,
        random_weights(gpu, nb * k, 12)?,
    );
    let x = random_inputs(gpu, k, 13)?;
    let half = |w, n, gelu| PairHalf {
        w,
        n,
        bias: None,
        gelu,
    };
    let s = time_it(backend, 50, || {
        let _y = gpu.linear_pair(&x, 1, k, half(&wa, na, false), half(&wb, nb, true), &[1])?;
        Ok(())
    })?;
    Ok((s * 1e6, ((na + nb) * k * 2) as f64 / s / 1e9))
}

/// The long-context attention's input: one row of seeded qkv activations, and
/// [`one_row_step`]'s cache and step at `LONG_CONTEXT`.
#[allow(clippy::type_complexity)]
fn long_attention_input(
    backend: &CudaBackend,
    cfg: &FalconConfig,
) -> Result<(
    <CudaBackend as Backend>::Tensor,
    <CudaBackend as Backend>::KvCache,
    <CudaBackend as Backend>::Step,
    AttnConfig,
)> {
    let (kv, step, attn) = one_row_step(backend, cfg, LONG_CONTEXT, 77)?;
    let width = cfg.qkv_rows();
    let qkv: Vec<f32> = tokens(width, 1000, 3)
        .iter()
        .map(|&t| t as f32 / 500.0 - 1.0)
        .collect();
    Ok((backend.upload_hidden(&qkv, 1, width)?, kv, step, attn))
}

/// Bytes of one layer's keys and values over `ctx` positions (bf16).
pub(crate) fn kv_layer_bytes(cfg: &FalconConfig, ctx: usize) -> usize {
    ctx * cfg.kv_bytes_per_token(2) / cfg.num_layers
}

/// One decode row at position 32k-1 attending over every layer's cache.
pub(crate) fn long_attention(
    backend: &CudaBackend,
    cfg: &FalconConfig,
    iters: usize,
) -> Result<(f64, f64)> {
    let (x, mut kv, step, attn) = long_attention_input(backend, cfg)?;
    let s = time_it(backend, iters, || {
        for layer in 0..cfg.num_layers {
            backend.attention(&x, &mut kv, layer, &step, &attn)?;
        }
        Ok(())
    })?;
    let bytes = LONG_CONTEXT * cfg.kv_bytes_per_token(2);
    Ok((s * 1e3, bytes as f64 / s / 1e9))
}

/// [`long_attention`]'s layers captured once as a CUDA graph (after running them on the
/// stream, so that their scratch comes from the pool): milliseconds a replay.
pub(crate) fn long_attention_graph(backend: &CudaBackend, cfg: &FalconConfig) -> Result<f64> {
    let (x, mut kv, step, attn) = long_attention_input(backend, cfg)?;
    let mut layers = || -> Result<()> {
        for layer in 0..cfg.num_layers {
            backend.attention(&x, &mut kv, layer, &step, &attn)?;
        }
        Ok(())
    };
    layers()?;
    backend.synchronize()?;
    let ((), graph) = backend.gpu().capture(&mut layers)?;
    let s = time_it(backend, 20, || Ok(graph.replay()?))?;
    Ok(s * 1e3)
}

/// Milliseconds a decode step's layers take, queued `cfg.num_layers` times (one row at
/// `ctx - 1`) through the backend ops with one set of layer weights.
pub(crate) struct Replica {
    /// Host time to queue the layers.
    pub enqueue_ms: f64,
    /// Until the GPU is done.
    pub total_ms: f64,
    /// The same layers captured once as a CUDA graph, until a replay is done (`full`
    /// only).
    pub graph_ms: Option<f64>,
}

/// See [`Replica`]; `full = false` queues only the four GEMVs per layer.
pub(crate) fn layer_replica(
    backend: &CudaBackend,
    cfg: &FalconConfig,
    ctx: usize,
    full: bool,
) -> Result<Replica> {
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
    let (mut kv, step, attn) = one_row_step(backend, cfg, ctx, 5)?;
    let x0: Vec<f32> = tokens(h, 1000, 9)
        .iter()
        .map(|&t| t as f32 / 500.0 - 1.0)
        .collect();
    let stand_in = backend.upload_hidden(&x0, 1, h)?;
    let queue = |x: &mut _, kv: &mut _| -> Result<()> {
        for layer in 0..cfg.num_layers {
            // The calls the model makes for a layer under one shared norm (see
            // `Falcon::layer`), or their products alone (the hidden state standing in
            // for the attention output, of the same width).
            if full {
                let a = backend.layer_norm(x, &ln_w, &ln_b, 1e-5)?;
                let w = ParallelWeights {
                    qkv: (&qkv_w, None),
                    up: (&up_w, None),
                    dense: (&dense_w, None),
                    down: (&down_w, None),
                };
                backend.parallel_attention(&a, &w, kv, layer, &step, &attn, x)?;
            } else {
                let (_qkv, up) = backend.linear_and_gelu(x, &qkv_w, None, &up_w, None)?;
                backend.linear_add_sum(&stand_in, &dense_w, None, &up, &down_w, None, x)?;
            }
        }
        Ok(())
    };
    let mut enqueue = Vec::new();
    let mut total = Vec::new();
    for _ in 0..11 {
        let mut x = backend.upload_hidden(&x0, 1, h)?;
        backend.synchronize()?;
        let t = Instant::now();
        queue(&mut x, &mut kv)?;
        enqueue.push(t.elapsed().as_secs_f64());
        backend.synchronize()?;
        total.push(t.elapsed().as_secs_f64());
    }
    // The same layers as one graph: every scratch buffer now comes from the pool, and
    // nothing else runs between replays (see `Gpu::capture`).
    let graph_ms = if full {
        let mut x = backend.upload_hidden(&x0, 1, h)?;
        backend.synchronize()?;
        let mut replayed = || -> Result<f64> {
            let ((), graph) = backend.gpu().capture(|| queue(&mut x, &mut kv))?;
            let mut replays = Vec::new();
            for _ in 0..11 {
                let t = Instant::now();
                graph.replay()?;
                backend.synchronize()?;
                replays.push(t.elapsed().as_secs_f64());
            }
            Ok(median(&replays[1..]) * 1e3)
        };
        match replayed() {
            Ok(ms) => Some(ms),
            Err(e) => {
                eprintln!("layers as a CUDA graph: {e:#}");
                None
            }
        }
    } else {
        None
    };
    Ok(Replica {
        enqueue_ms: median(&enqueue[1..]) * 1e3,
        total_ms: median(&total[1..]) * 1e3,
        graph_ms,
    })
}

/// A KV cache of `ctx` positions (seeded random keys and values) and a prepared step of
/// one decode row at `ctx - 1`, with the model's attention geometry.
fn one_row_step(
    backend: &CudaBackend,
    cfg: &FalconConfig,
    ctx: usize,
    seed: u64,
) -> Result<(
    <CudaBackend as Backend>::KvCache,
    <CudaBackend as Backend>::Step,
    AttnConfig,
)> {
    let blocks = ctx.div_ceil(BLOCK);
    let layout = KvLayout {
        num_layers: cfg.num_layers,
        num_blocks: blocks,
        block_size: BLOCK,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
    };
    let mut kv = backend.alloc_kv(&layout)?;
    backend.fill_kv_uniform(&mut kv, seed)?;
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
    Ok((kv, step, attn))
}
