//! Broken safetensors files: truncated, garbage headers, overlapping offsets.

use super::*;

// ---------------------------------------------------------------------------------------
// Broken files
// ---------------------------------------------------------------------------------------

#[test]
fn truncated_shard() {
    let tmp = copy_fixture(SHARDED);
    let path = tmp.path().join("model-00003-of-00004.safetensors");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let e = weights_err(tmp.path());
    assert!(
        matches!(&e, LoadError::Safetensors { path: p, .. } if *p == path),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("model-00003-of-00004.safetensors"),
        "{e}"
    );
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::Safetensors { path: p, .. } if *p == path),
        "{e:?}"
    );
}

#[test]
fn truncated_inside_header() {
    let tmp = copy_fixture(SINGLE);
    let path = tmp.path().join("model.safetensors");
    let bytes = fs::read(&path).unwrap();
    fs::write(&path, &bytes[..100]).unwrap();
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::Safetensors { path: p, .. } if *p == path),
        "{e:?}"
    );
}

#[test]
fn padded_file() {
    let tmp = copy_fixture(SINGLE);
    let path = tmp.path().join("model.safetensors");
    let mut bytes = fs::read(&path).unwrap();
    bytes.extend_from_slice(&[0; 16]);
    fs::write(&path, bytes).unwrap();
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::Safetensors { path: p, .. } if *p == path),
        "{e:?}"
    );
}

#[test]
fn garbage_header() {
    let tmp = copy_fixture(SINGLE);
    let path = tmp.path().join("model.safetensors");
    let text = b"this is not a safetensors header";
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(text);
    bytes.extend_from_slice(&[0; 64]);
    fs::write(&path, bytes).unwrap();
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::Safetensors { path: p, .. } if *p == path),
        "{e:?}"
    );
}

#[test]
fn header_length_beyond_the_file() {
    let tmp = copy_fixture(SHARDED);
    let path = tmp.path().join("model-00001-of-00004.safetensors");
    let mut bytes = fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&(1u64 << 20).to_le_bytes());
    fs::write(&path, bytes).unwrap();
    let e = weights_err(tmp.path());
    assert!(
        matches!(&e, LoadError::Safetensors { path: p, .. } if *p == path),
        "{e:?}"
    );
    // An absurd length must not make the loader allocate or panic either.
    let mut bytes = fs::read(&path).unwrap();
    bytes[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    fs::write(&path, bytes).unwrap();
    let e = weights_err(tmp.path());
    assert!(
        matches!(&e, LoadError::Safetensors { path: p, .. } if *p == path),
        "{e:?}"
    );
}

#[test]
fn file_shorter_than_the_length_prefix() {
    let tmp = copy_fixture(SINGLE);
    let path = tmp.path().join("model.safetensors");
    fs::write(&path, [1u8, 2, 3]).unwrap();
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::Safetensors { path: p, .. } if *p == path),
        "{e:?}"
    );
}

#[test]
fn empty_weight_file() {
    let tmp = copy_fixture(SINGLE);
    let path = tmp.path().join("model.safetensors");
    fs::write(&path, b"").unwrap();
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::Safetensors { path: p, .. } if *p == path),
        "{e:?}"
    );
}

#[test]
fn overlapping_offsets() {
    let tmp = copy_fixture(SINGLE);
    let path = tmp.path().join("model.safetensors");
    let raw = RawFile::read(&path);
    // Header claims the second tensor starts at 0 as well.
    let mut header = Map::new();
    let mut offset = 0;
    for (i, t) in raw.tensors.iter().enumerate() {
        let start = if i == 1 { 0 } else { offset };
        header.insert(
            t.name.clone(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [start, start + t.data.len()]}),
        );
        offset += t.data.len();
    }
    let text = serde_json::to_vec(&header).unwrap();
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&text);
    for t in &raw.tensors {
        bytes.extend_from_slice(&t.data);
    }
    fs::write(&path, bytes).unwrap();
    let e = load_err(tmp.path());
    assert!(
        matches!(&e, LoadError::Safetensors { path: p, .. } if *p == path),
        "{e:?}"
    );
}
