//! Loads in an integer weight format that cannot be done: a weight that is not finite
//! (a corrupt checkpoint) and a format with impossible parameters.

use falconer_engine::error::{LoadError, QuantError};
use falconer_engine::{LoadOptions, WeightFormat};

use super::{copy_fixture, edit_safetensors, load_with, SINGLE};

fn opts(weights: WeightFormat) -> LoadOptions {
    LoadOptions {
        weights,
        ..LoadOptions::default()
    }
}

#[test]
fn a_nan_weight_is_refused_naming_the_tensor_when_quantizing() {
    let tmp = copy_fixture(SINGLE);
    let name = "transformer.h.1.mlp.dense_4h_to_h.weight";
    let path = edit_safetensors(tmp.path(), "model.safetensors", |raw| {
        let t = raw.tensors.iter_mut().find(|t| t.name == name).unwrap();
        assert_eq!(t.dtype, "F32");
        let cols = t.shape[1];
        let at = 4 * (2 * cols + 5);
        t.data[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    for weights in [WeightFormat::Int8, WeightFormat::INT4] {
        match load_with(tmp.path(), &opts(weights)) {
            Err(LoadError::Quantize {
                path: p,
                tensor,
                source: QuantError::NonFinite { row: 2, col: 5, .. },
            }) => {
                assert_eq!((p, tensor.as_str()), (path.clone(), name));
            }
            other => panic!("{weights}: {other:?}"),
        }
    }
    // Unquantized, the values are the checkpoint's business: it loads.
    assert!(load_with(tmp.path(), &opts(WeightFormat::Checkpoint)).is_ok());
}

#[test]
fn an_impossible_int4_group_is_refused_before_reading_weights() {
    let tmp = copy_fixture(SINGLE);
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    match load_with(tmp.path(), &opts(WeightFormat::Int4 { group: 10 })) {
        Err(LoadError::WeightFormat {
            format: WeightFormat::Int4 { group: 10 },
            source: QuantError::GroupSize { group: 10 },
        }) => {}
        other => panic!("{other:?}"),
    }
}
