//! Models loaded with 8-bit and 4-bit weights ([`WeightFormat`]): logits close to HF
//! transformers' on every fixture layout, the shipped target predicting Python it never
//! saw nearly as it does unquantized, and speculative decoding with a quantized target
//! giving exactly the quantized target's plain greedy output.

use std::path::PathBuf;
use std::sync::Arc;

use falconer::{Runtime, Speculation, WeightFormat};
use falconer_engine::checkpoint::{Dtype, HostTensor};
use falconer_engine::quant::QuantMatrix;
use falconer_engine::{CpuBackend, Falcon, LoadOptions, ModelDir, ModelRunner, SeqWork, Tokenizer};

use crate::common::{
    cpu_runner, fixture, fixture_dir, greedy, prompt_then_steps, prompts, reference, rel_err,
    tokio_rt, LAYOUTS,
};
use crate::loader_errors::{copy_fixture, edit_safetensors};

fn runner(dir: &ModelDir, weights: WeightFormat) -> ModelRunner<CpuBackend> {
    let opts = LoadOptions {
        kv_blocks: 64,
        block_size: 16,
        weights,
        ..LoadOptions::default()
    };
    ModelRunner::new(Falcon::load(dir, Arc::new(CpuBackend::new()), &opts).unwrap())
}

fn argmax(row: &[f32]) -> u32 {
    falconer_engine::sampling::greedy_token(row).unwrap()
}

/// Against a layout's HF reference: the worst relative logit error (max |diff| / max
/// |reference| of a row) over the prefill rows and decode steps, and how many greedy
/// tokens of those steps (fed the reference's tokens) equal the reference's, of how many.
fn against_reference(name: &str, weights: WeightFormat) -> (f32, usize, usize) {
    let r = reference(name);
    let rows = prompt_then_steps(
        &mut runner(&fixture(name), weights),
        &r,
        r.decode_step_logits.len(),
    );
    let want = r.prefill_logits.iter().chain(&r.decode_step_logits);
    let worst = rows
        .iter()
        .zip(want)
        .map(|(g, w)| rel_err(g, w))
        .fold(0.0f32, f32::max);
    // The last prefill row predicts greedy token 0, decode step i token i + 1.
    let predicted = &rows[r.prompt_ids.len() - 1..];
    let agree = predicted
        .iter()
        .zip(&r.greedy_ids)
        .filter(|(row, &id)| argmax(row) == id)
        .count();
    (worst, agree, predicted.len())
}

/// The fixtures are tiny random models (no structure for the scales to follow), so the
/// bounds are loose; a wrong scale, nibble order or row would be far outside them. At
/// this commit: int8 worst 0.015-0.027 per layout and 59 of 60 greedy tokens; int4 with
/// groups of 64: 0.26-0.50, with groups of 16 0.19-0.42.
#[test]
fn quantized_logits_stay_close_to_transformers() {
    let (mut agree8, mut total) = (0, 0);
    let mut mean4 = [0.0f32; 2];
    for &name in LAYOUTS {
        let (e8, a, n) = against_reference(name, WeightFormat::Int8);
        assert!(e8 < 0.05, "{name} int8: rel err {e8}");
        (agree8, total) = (agree8 + a, total + n);
        for (mean, group) in mean4.iter_mut().zip([64, 16]) {
            let (e4, _, _) = against_reference(name, WeightFormat::Int4 { group });
            assert!(e4 < 0.75, "{name} int4:g{group}: rel err {e4}");
            *mean += e4 / LAYOUTS.len() as f32;
        }
    }
    assert!(
        agree8 * 10 >= total * 9,
        "int8: {agree8} of {total} greedy tokens"
    );
    // Finer groups follow the weights more closely.
    assert!(
        mean4[1] < 0.9 * mean4[0],
        "int4 mean rel err g16 {} vs g64 {}",
        mean4[1],
        mean4[0]
    );
}

fn shipped(name: &str) -> ModelDir {
    ModelDir::new(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("examples/models")
            .join(name),
    )
}

/// Teacher-forced over `ids`: each position's greedy token and the mean negative log
/// likelihood of the next token.
fn predictions(dir: &ModelDir, weights: WeightFormat, ids: &[u32]) -> (Vec<u32>, f64) {
    let mut m = runner(dir, weights);
    m.add_sequence(1).unwrap();
    let out = m
        .forward(&[SeqWork {
            seq: 1,
            tokens: ids,
            all_logits: true,
        }])
        .unwrap();
    let mut nll = 0.0f64;
    for (row, &next) in out[0].rows().zip(&ids[1..]) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let log_z = row
            .iter()
            .map(|&v| f64::from(v - max).exp())
            .sum::<f64>()
            .ln();
        nll += log_z - f64::from(row[next as usize] - max);
    }
    let greedy = out[0].rows().map(argmax).collect();
    (greedy, nll / (ids.len() - 1) as f64)
}

/// The shipped target (trained on Python) on Python it was not trained on (its training
/// script): the quantized models' next-token choices agree with the checkpoint's and
/// their perplexity grows little. At this commit: int8 agrees on all 384 positions
/// (perplexity x0.9998); int4 with groups of 64 on 88.6% (x1.0013: its different picks
/// cost almost no likelihood).
#[test]
fn the_shipped_target_predicts_nearly_as_unquantized() {
    let dir = shipped("falcon-mini");
    let tok = Tokenizer::from_file(&dir.tokenizer_path()).unwrap();
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/models/train_pair.py"),
    )
    .unwrap();
    // Its code, from the first function on.
    let code = &text[text.find("\ndef ").unwrap()..];
    let ids: Vec<u32> = tok.encode(code).unwrap().into_iter().take(385).collect();
    let (base, base_nll) = predictions(&dir, WeightFormat::Checkpoint, &ids);
    for (weights, min_agree, max_ppl) in [
        (WeightFormat::Int8, 0.97, 1.02),
        (WeightFormat::INT4, 0.80, 1.05),
    ] {
        let (got, nll) = predictions(&dir, weights, &ids);
        let agree =
            got.iter().zip(&base).filter(|(a, b)| a == b).count() as f64 / base.len() as f64;
        let ppl = (nll - base_nll).exp();
        println!(
            "{weights}: agreement {:.1}%, perplexity x{ppl:.4} (nll {nll:.4} vs {base_nll:.4})",
            100.0 * agree
        );
        assert!(agree >= min_agree, "{weights}: top-1 agreement {agree}");
        assert!(ppl <= max_ppl, "{weights}: perplexity ratio {ppl}");
    }
}

/// Speculation keeps the quantized target's output exactly: greedy speculative decoding
/// (a quantized or unquantized draft, prompt lookup, several k) equals plain greedy.
#[test]
fn greedy_speculative_with_a_quantized_target_equals_plain_greedy() {
    tokio_rt().block_on(async {
        for (name, draft) in [
            ("new_arch_gqa_sharded", "falcon7b_mqa"),
            ("falcon7b_mqa", "sequential"),
        ] {
            for (weights, draft_weights) in [
                (WeightFormat::Int8, WeightFormat::Checkpoint),
                (WeightFormat::INT4, WeightFormat::Int8),
            ] {
                let rt = Runtime::builder()
                    .target(fixture_dir(name))
                    .draft(fixture_dir(draft))
                    .weights(weights)
                    .draft_weights(draft_weights)
                    .block_size(4)
                    .load_progress(None)
                    .build()
                    .await
                    .unwrap();
                let info = rt.info();
                assert_eq!(
                    (info.weight_bytes, info.draft_weight_bytes),
                    (
                        runner(&fixture(name), weights).model().weight_bytes(),
                        runner(&fixture(draft), draft_weights)
                            .model()
                            .weight_bytes()
                    ),
                    "{name} {weights}: ModelInfo's bytes"
                );
                let mut plain_differs = false;
                for (pi, prompt) in prompts(name).iter().enumerate() {
                    let plain = greedy(&rt, prompt, 24, Speculation::Off, None).await;
                    let unquantized = cpu_runner(name).greedy(1, prompt, 24).unwrap();
                    plain_differs |= plain.ids != unquantized;
                    for k in [1, 3, 6] {
                        for spec in [Speculation::DraftModel, Speculation::PromptLookup] {
                            let s = greedy(&rt, prompt, 24, spec, Some(k)).await;
                            assert_eq!(
                                s.ids, plain.ids,
                                "{name} {weights} prompt {pi} k={k} {spec:?}"
                            );
                        }
                    }
                }
                if weights == WeightFormat::INT4 {
                    // The check above must be about the quantized model: int4 changes
                    // these random models' continuations.
                    assert!(
                        plain_differs,
                        "{name}: int4 output equals the checkpoint's on every prompt"
                    );
                }
            }
        }
    });
}

/// The logits of every prefill row and four decode steps of a layout's reference.
fn all_logits(dir: &ModelDir, weights: WeightFormat, r: &crate::common::Reference) -> Vec<f32> {
    prompt_then_steps(&mut runner(dir, weights), r, 4).concat()
}

/// Whether `name` is one of a decoder layer's four linear weights (what is quantized).
fn is_linear_weight(name: &str) -> bool {
    [
        "query_key_value",
        "self_attention.dense",
        "dense_h_to_4h",
        "dense_4h_to_h",
    ]
    .iter()
    .any(|s| name.ends_with(&format!("{s}.weight")))
}

/// A quantized load computes with exactly the dequantized weights and nothing else
/// changes: the same checkpoint with its decoder-layer linear weights replaced by their
/// dequantized f32 values, loaded as it is, gives the same logits bit for bit. (A
/// quantized tensor other than these four, or one left out, would show.)
#[test]
fn a_quantized_load_computes_with_exactly_its_dequantized_weights() {
    for (name, weights) in [
        ("falcon7b_mqa", WeightFormat::Int8),
        ("new_arch_gqa_sharded", WeightFormat::INT4),
        ("bf16_weights", WeightFormat::Int4 { group: 16 }),
        ("bias_mha", WeightFormat::Int8),
    ] {
        let tmp = copy_fixture(name);
        let mut replaced = 0;
        for entry in std::fs::read_dir(tmp.path()).unwrap() {
            let file = entry.unwrap().file_name().into_string().unwrap();
            if !file.ends_with(".safetensors") {
                continue;
            }
            edit_safetensors(tmp.path(), &file, |raw| {
                for t in raw.tensors.iter_mut().filter(|t| is_linear_weight(&t.name)) {
                    let dtype = match t.dtype.as_str() {
                        "F32" => Dtype::F32,
                        "BF16" => Dtype::Bf16,
                        "F16" => Dtype::F16,
                        other => panic!("{}: dtype {other}", t.name),
                    };
                    let (rows, cols) = (t.shape[0], t.shape[1]);
                    let host = HostTensor {
                        dtype,
                        shape: &t.shape,
                        bytes: &t.data,
                    };
                    let q =
                        QuantMatrix::quantize(&host.to_f32(), rows, cols, weights.quant().unwrap())
                            .unwrap();
                    t.dtype = "F32".into();
                    t.data = q
                        .dequantize()
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect();
                    replaced += 1;
                }
            });
        }
        let cfg = fixture(name).config().unwrap();
        assert_eq!(replaced, 4 * cfg.num_layers, "{name}");
        let r = reference(name);
        let quantized = all_logits(&fixture(name), weights, &r);
        let dequantized = all_logits(&ModelDir::new(tmp.path()), WeightFormat::Checkpoint, &r);
        let unquantized = all_logits(&fixture(name), WeightFormat::Checkpoint, &r);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&quantized), bits(&dequantized), "{name} {weights}");
        assert_ne!(
            bits(&quantized),
            bits(&unquantized),
            "{name} {weights}: nothing quantized"
        );
    }
}

/// `Falcon::weight_bytes` and the runtime's `ModelInfo` report what each format holds:
/// f32 values on the CPU, and for the layers' linear weights int8 bytes plus a scale per
/// row, or int4 nibbles (rows rounded up to a byte) plus a scale per group; a tied head
/// counted once, or twice when pipeline shards each hold a copy.
#[test]
fn weight_bytes_are_what_each_format_holds() {
    for name in ["falcon7b_mqa", "new_arch_gqa_sharded", "bias_mha"] {
        let dir = fixture(name);
        let cfg = dir.config().unwrap();
        let tables = 4 * cfg.vocab_size * cfg.hidden_size;
        for weights in [
            WeightFormat::Checkpoint,
            WeightFormat::Int8,
            WeightFormat::INT4,
        ] {
            let mut want: usize = falconer_engine::model::expected_tensors(&cfg)
                .iter()
                .map(|(n, shape)| match (weights, shape.as_slice()) {
                    (WeightFormat::Int8, &[r, c]) if is_linear_weight(n) => r * c + 4 * r,
                    (WeightFormat::Int4 { group }, &[r, c]) if is_linear_weight(n) => {
                        r * c.div_ceil(2) + 4 * r * c.div_ceil(group)
                    }
                    _ => 4 * shape.iter().product::<usize>(),
                })
                .sum();
            if cfg.tie_word_embeddings {
                want -= tables;
            }
            let m = runner(&dir, weights);
            assert_eq!(m.model().weight_bytes(), want, "{name} {weights}");
            // Two pipeline shards: the same, plus a second copy of a tied table.
            let two: usize = [0..1, 1..cfg.num_layers]
                .into_iter()
                .map(|layers| {
                    let opts = LoadOptions {
                        layers: Some(layers),
                        weights,
                        ..LoadOptions::default()
                    };
                    Falcon::load(&dir, Arc::new(CpuBackend::new()), &opts)
                        .unwrap()
                        .weight_bytes()
                })
                .sum();
            let extra = if cfg.tie_word_embeddings { tables } else { 0 };
            assert_eq!(two, want + extra, "{name} {weights}, two shards");
        }
    }
}
