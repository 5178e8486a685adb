//! Layer ranges (shards), regression tests of fixed bugs and load progress.

use super::*;

// ---------------------------------------------------------------------------------------
// Layer ranges
// ---------------------------------------------------------------------------------------

fn layers(range: std::ops::Range<usize>) -> LoadOptions {
    LoadOptions {
        layers: Some(range),
        ..LoadOptions::default()
    }
}

#[test]
fn layer_range_outside_the_model() {
    let dir = fixture(SHARDED).dir;
    for (range, (start, end)) in [
        (5..9, (5, 9)),
        (1..3, (1, 3)),
        (1..1, (1, 1)),
        (2..2, (2, 2)),
    ] {
        let e = match load_with(&dir, &layers(range.clone())) {
            Ok(_) => panic!("{range:?} loaded"),
            Err(e) => e,
        };
        assert!(
            matches!(&e, LoadError::LayerRange { start: s, end: en, num_layers: 2 } if *s == start && *en == end),
            "{range:?}: {e:?}"
        );
    }
}

#[test]
fn layer_shards_load_and_chain_to_the_full_model() {
    let dir = fixture(SHARDED).dir;
    let backend = Arc::new(CpuBackend::new());
    let opts = |range| LoadOptions {
        layers: range,
        kv_blocks: 8,
        block_size: 4,
        progress: None,
        weights: Default::default(),
    };
    let md = ModelDir::new(&dir);
    let mut full = Falcon::load(&md, Arc::clone(&backend), &opts(None)).unwrap();
    let mut first = Falcon::load(&md, Arc::clone(&backend), &opts(Some(0..1))).unwrap();
    let mut second = Falcon::load(&md, Arc::clone(&backend), &opts(Some(1..2))).unwrap();
    assert_eq!(full.layer_range(), 0..2);
    assert_eq!(first.layer_range(), 0..1);
    assert_eq!(second.layer_range(), 1..2);
    assert_eq!(first.kv_layout().num_layers, 1);
    assert_eq!(second.kv_layout().num_layers, 1);
    assert_eq!(first.config(), full.config());

    let tokens = [1u32, 5, 9, 2, 7];
    let chunk = SeqChunk {
        tokens: &tokens,
        start_pos: 0,
        block_table: &[0, 1],
        prompt_len: tokens.len(),
        all_logits: true,
    };
    let want = full.forward(&[chunk]).unwrap();

    let step = first.prepare(&[chunk]).unwrap();
    let h = first.embed(&step).unwrap();
    let h = first.run_layers(h, &step).unwrap();
    assert!(matches!(
        first.logits(&h, &step),
        Err(Error::Forward(ForwardError::NotInShard { .. }))
    ));
    // A whole step needs the whole model: the first shard has no output head.
    assert!(matches!(
        first.step_logits(&step),
        Err(Error::Forward(ForwardError::NotInShard {
            part: "output head"
        }))
    ));
    let step2 = second.prepare(&[chunk]).unwrap();
    assert!(matches!(
        second.embed(&step2),
        Err(Error::Forward(ForwardError::NotInShard { .. }))
    ));
    assert!(matches!(
        second.step_logits(&step2),
        Err(Error::Forward(ForwardError::NotInShard {
            part: "embeddings"
        }))
    ));
    let h = second.run_layers(h, &step2).unwrap();
    let got = second.logits(&h, &step2).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].num_rows(), tokens.len());
    for (g, w) in got[0].rows().zip(want[0].rows()) {
        let diff = g
            .iter()
            .zip(w)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff < 1e-5,
            "shard chain differs from the full model by {diff}"
        );
    }
}

#[test]
fn single_file_layer_shards_load() {
    let dir = fixture(SINGLE).dir;
    for range in [0..1, 1..2, 0..2] {
        let m = load_with(&dir, &layers(range.clone())).unwrap();
        assert_eq!(m.layer_range(), range);
    }
}

// ---------------------------------------------------------------------------------------
// Formerly known library bugs (fixed; kept as regression tests)
// ---------------------------------------------------------------------------------------

#[test]
fn empty_weight_map_names_a_file() {
    let tmp = copy_fixture(SHARDED);
    edit_json(tmp.path(), "model.safetensors.index.json", |v| {
        v["weight_map"] = json!({});
    });
    let e = load_err(tmp.path());
    let path = match &e {
        LoadError::MissingTensor { path, .. } => path.clone(),
        LoadError::NoWeights { dir } => dir.clone(),
        LoadError::MissingField { path, .. } | LoadError::InvalidField { path, .. } => path.clone(),
        other => panic!("unexpected {other:?}"),
    };
    assert!(!path.as_os_str().is_empty(), "{e:?}");
}

#[test]
fn load_progress_reports_every_byte_once_in_order() {
    use std::sync::Mutex;

    use falconer_engine::{LoadProgress, ProgressFn};
    for (name, layers) in [
        (SHARDED, None),
        (SHARDED, Some(1..2)),
        ("falcon7b_mqa", None),
    ] {
        let seen = Arc::new(Mutex::new(Vec::<LoadProgress>::new()));
        let sink = Arc::clone(&seen);
        let opts = LoadOptions {
            layers: layers.clone(),
            progress: Some(ProgressFn::new(move |p| sink.lock().unwrap().push(p))),
            ..LoadOptions::default()
        };
        Falcon::load(&fixture(name), Arc::new(CpuBackend::new()), &opts).unwrap();
        let seen = seen.lock().unwrap();
        let last = *seen.last().expect("no progress reported");
        assert!(last.bytes_total > 0);
        assert_eq!(
            last.bytes_done, last.bytes_total,
            "{name} {layers:?}: load did not reach 100%"
        );
        assert!(
            seen.windows(2).all(|w| w[0].bytes_done < w[1].bytes_done),
            "{name}: not increasing"
        );
        assert!(seen.iter().all(|p| p.bytes_total == last.bytes_total));
    }
}
