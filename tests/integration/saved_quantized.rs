//! Quantized checkpoints (`quant::save_quantized`): written once, loaded as stored. A
//! saved checkpoint computes exactly what quantizing on load computes, keeps shards and
//! index, reports its format, refuses another format, and every broken part of it is a
//! typed error naming the tensor.

use std::path::Path;
use std::sync::Arc;

use falconer::{Runtime, Speculation, WeightFormat};
use falconer_engine::error::{LoadError, QuantError};
use falconer_engine::quant::{save_quantized, SaveError};
use falconer_engine::{CpuBackend, Falcon, LoadOptions, ModelDir, ModelRunner, ProgressFn};
use serde_json::Value;

use crate::common::{fixture, fixture_dir, greedy, prompt_then_steps, reference, tokio_rt};
use crate::loader_errors::edit_safetensors;

fn load(dir: &ModelDir, weights: WeightFormat) -> Result<Falcon<CpuBackend>, LoadError> {
    let opts = LoadOptions {
        kv_blocks: 64,
        block_size: 4,
        weights,
        ..LoadOptions::default()
    };
    Falcon::load(dir, Arc::new(CpuBackend::new()), &opts)
}

fn bits(rows: &[Vec<f32>]) -> Vec<u32> {
    rows.iter().flatten().map(|v| v.to_bits()).collect()
}

fn tensor_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

#[test]
fn a_saved_checkpoint_loads_as_quantizing_on_load_computes() {
    for (name, format) in [
        ("falcon7b_mqa", WeightFormat::Int8),
        ("new_arch_gqa_sharded", WeightFormat::INT4),
        ("bf16_weights", WeightFormat::Int4 { group: 16 }),
        ("bias_mha", WeightFormat::Int8),
    ] {
        let out = tempfile::tempdir().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let progress = ProgressFn::new(move |p| log.lock().unwrap().push(p));
        let saved = save_quantized(&fixture(name), out.path(), format, Some(&progress)).unwrap();
        // Progress rises to the source's tensor bytes, all of them read.
        let seen = seen.lock().unwrap();
        assert!(
            seen.windows(2).all(|w| w[0].bytes_done <= w[1].bytes_done),
            "{name}"
        );
        let last = seen.last().copied().unwrap();
        assert_eq!(
            (last.bytes_done, last.bytes_total),
            (saved.bytes_in, saved.bytes_in)
        );
        let dir = ModelDir::new(out.path());
        let r = reference(name);
        let on_load = load(&fixture(name), format).unwrap();
        let stored = load(&dir, WeightFormat::Checkpoint).unwrap();
        assert_eq!(stored.weight_format(), format, "{name}");
        assert_eq!(stored.weight_bytes(), on_load.weight_bytes(), "{name}");
        let a = prompt_then_steps(&mut ModelRunner::new(on_load), &r, 4);
        let b = prompt_then_steps(&mut ModelRunner::new(stored), &r, 4);
        assert_eq!(bits(&a), bits(&b), "{name} {format}");
        // Asking for the stored format is the same; asking for another is refused.
        assert!(load(&dir, format).is_ok());
        let other = if format == WeightFormat::Int8 {
            WeightFormat::INT4
        } else {
            WeightFormat::Int8
        };
        match load(&dir, other) {
            Err(LoadError::StoredWeights { stored, asked, .. }) => {
                assert_eq!((stored, asked), (format, other));
            }
            res => panic!("{name}: {:?}", res.map(|_| ())),
        }
        // Shards and index keep the source's layout; the tensors shrink.
        let src = fixture(name).dir;
        let index = src.join("model.safetensors.index.json").is_file();
        assert_eq!(
            out.path().join("model.safetensors.index.json").is_file(),
            index
        );
        assert!(
            out.path().join("tokenizer.json").is_file(),
            "{name}: tokenizer copied"
        );
        assert!(saved.bytes_out < saved.bytes_in, "{name}: {saved:?}");
        // The files hold those bytes plus their headers (a few KiB of JSON each).
        let on_disk = tensor_bytes(out.path());
        assert!(
            on_disk >= saved.bytes_out
                && on_disk < saved.bytes_out + 16 * 1024 * saved.files as u64,
            "{name}: {on_disk} bytes on disk for {saved:?}"
        );
    }
}

#[test]
fn a_runtime_on_a_saved_checkpoint_reports_it_and_speculates_exactly() {
    tokio_rt().block_on(async {
        let out = tempfile::tempdir().unwrap();
        let name = "new_arch_gqa_sharded";
        save_quantized(&fixture(name), out.path(), WeightFormat::Int8, None).unwrap();
        let rt = Runtime::builder()
            .target(out.path())
            .draft(fixture_dir("falcon7b_mqa"))
            .block_size(4)
            .load_progress(None)
            .build()
            .await
            .unwrap();
        assert_eq!(rt.info().weights, WeightFormat::Int8);
        let prompt = &reference(name).prompt_ids;
        let plain = greedy(&rt, prompt, 24, Speculation::Off, None).await;
        for k in [1, 4] {
            let s = greedy(&rt, prompt, 24, Speculation::DraftModel, Some(k)).await;
            assert_eq!(s.ids, plain.ids, "k={k}");
        }
    });
}

/// A saved int4 checkpoint of the single-file fixture, for breaking.
fn saved_int4() -> tempfile::TempDir {
    let out = tempfile::tempdir().unwrap();
    save_quantized(
        &fixture("falcon7b_mqa"),
        out.path(),
        WeightFormat::INT4,
        None,
    )
    .unwrap();
    out
}

const DOWN: &str = "transformer.h.1.mlp.dense_4h_to_h.weight";
const DOWN_SCALE: &str = "transformer.h.1.mlp.dense_4h_to_h.weight_scale";

#[test]
fn broken_saved_checkpoints_are_typed_errors() {
    // A scale that is not finite.
    let out = saved_int4();
    let path = edit_safetensors(out.path(), "model.safetensors", |raw| {
        let t = raw
            .tensors
            .iter_mut()
            .find(|t| t.name == DOWN_SCALE)
            .unwrap();
        t.data[4..8].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    match load(&ModelDir::new(out.path()), WeightFormat::Checkpoint) {
        Err(LoadError::Quantize {
            path: p,
            tensor,
            source: QuantError::BadScale { index: 1, .. },
        }) => assert_eq!((p, tensor.as_str()), (path, DOWN)),
        res => panic!("{:?}", res.map(|_| ())),
    }

    // Missing scales.
    let out = saved_int4();
    edit_safetensors(out.path(), "model.safetensors", |raw| {
        raw.tensors.retain(|t| t.name != DOWN_SCALE);
    });
    match load(&ModelDir::new(out.path()), WeightFormat::Checkpoint) {
        Err(LoadError::MissingTensor { tensor, .. }) => assert_eq!(tensor, DOWN_SCALE),
        res => panic!("{:?}", res.map(|_| ())),
    }

    // Integers of the wrong type (int8 bytes where int4 nibbles belong).
    let out = saved_int4();
    edit_safetensors(out.path(), "model.safetensors", |raw| {
        raw.tensors
            .iter_mut()
            .find(|t| t.name == DOWN)
            .unwrap()
            .dtype = "I8".into();
    });
    match load(&ModelDir::new(out.path()), WeightFormat::Checkpoint) {
        Err(LoadError::TensorDtype { tensor, .. }) => assert_eq!(tensor, DOWN),
        res => panic!("{:?}", res.map(|_| ())),
    }

    // A config that names the wrong format for the stored tensors (their shapes).
    let out = saved_int4();
    set_format(out.path(), Value::from("int8"));
    match load(&ModelDir::new(out.path()), WeightFormat::Checkpoint) {
        Err(LoadError::TensorDtype { .. } | LoadError::TensorShape { .. }) => {}
        res => panic!("{:?}", res.map(|_| ())),
    }

    // A format the config cannot name.
    set_format(out.path(), Value::from("int3"));
    match load(&ModelDir::new(out.path()), WeightFormat::Checkpoint) {
        Err(LoadError::InvalidField { field, .. }) => assert_eq!(field, "falconer_weights"),
        res => panic!("{:?}", res.map(|_| ())),
    }
}

fn set_format(dir: &Path, v: Value) {
    let path = dir.join("config.json");
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["falconer_weights"] = v;
    std::fs::write(&path, cfg.to_string()).unwrap();
}

#[test]
fn saving_refuses_what_it_cannot_do() {
    let out = tempfile::tempdir().unwrap();
    let src = fixture("falcon7b_mqa");
    assert!(matches!(
        save_quantized(&src, out.path(), WeightFormat::Checkpoint, None),
        Err(SaveError::NotQuantized)
    ));
    assert!(matches!(
        save_quantized(&src, out.path(), WeightFormat::Int4 { group: 10 }, None),
        Err(SaveError::Format(QuantError::GroupSize { group: 10 }))
    ));
    save_quantized(&src, out.path(), WeightFormat::Int8, None).unwrap();
    let again = tempfile::tempdir().unwrap();
    assert!(matches!(
        save_quantized(
            &ModelDir::new(out.path()),
            again.path(),
            WeightFormat::INT4,
            None
        ),
        Err(SaveError::AlreadyQuantized {
            stored: WeightFormat::Int8,
            ..
        })
    ));
    let copy = crate::loader_errors::copy_fixture("falcon7b_mqa");
    assert!(matches!(
        save_quantized(
            &ModelDir::new(copy.path()),
            copy.path(),
            WeightFormat::Int8,
            None
        ),
        Err(SaveError::SameDirectory { .. })
    ));
}
