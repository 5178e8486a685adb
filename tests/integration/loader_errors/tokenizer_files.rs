//! tokenizer.json and generation_config.json.

use super::*;

// ---------------------------------------------------------------------------------------
// tokenizer.json and generation_config.json
// ---------------------------------------------------------------------------------------

#[test]
fn corrupt_tokenizer() {
    let tmp = copy_fixture(SINGLE);
    let dir = ModelDir::new(tmp.path());
    let path = dir.tokenizer_path();
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, &text[..text.len() / 2]).unwrap();
    let e = Tokenizer::from_file(&path).unwrap_err();
    assert!(
        matches!(&e, LoadError::Tokenizer { path: p, .. } if *p == path),
        "{e:?}"
    );
    assert!(e.to_string().contains("tokenizer.json"), "{e}");

    // Valid JSON that is not a tokenizer.
    fs::write(&path, "{\"model\": 3}").unwrap();
    let e = Tokenizer::from_file(&path).unwrap_err();
    assert!(
        matches!(&e, LoadError::Tokenizer { path: p, .. } if *p == path),
        "{e:?}"
    );
}

#[test]
fn missing_tokenizer() {
    let tmp = copy_fixture(SINGLE);
    let dir = ModelDir::new(tmp.path());
    let path = dir.tokenizer_path();
    fs::remove_file(&path).unwrap();
    let e = Tokenizer::from_file(&path).unwrap_err();
    assert!(
        matches!(&e, LoadError::Io { path: p, source } if *p == path && source.kind() == ErrorKind::NotFound),
        "{e:?}"
    );
}

#[test]
fn bad_generation_config_field() {
    let cases = [
        ("temperature", json!("hot")),
        ("top_k", json!(-1)),
        ("top_p", json!([0.9])),
        ("do_sample", json!("yes")),
        ("eos_token_id", json!([11, "x"])),
        ("eos_token_id", json!(-1)),
        ("bos_token_id", json!(1.5)),
        ("max_new_tokens", json!(2.5)),
        ("repetition_penalty", json!(true)),
    ];
    for (field, bad) in cases {
        let tmp = copy_fixture(SINGLE);
        let path = edit_json(tmp.path(), "generation_config.json", |v| {
            v[field] = bad.clone();
        });
        let e = ModelDir::new(tmp.path()).generation_defaults().unwrap_err();
        assert!(
            matches!(&e, LoadError::InvalidField { path: p, field: f, .. } if *p == path && *f == field),
            "{field} = {bad}: {e:?}"
        );
        assert!(e.to_string().contains("generation_config.json"), "{e}");
    }
}

#[test]
fn generation_config_is_not_json() {
    let tmp = copy_fixture(SINGLE);
    let path = tmp.path().join("generation_config.json");
    fs::write(&path, "{\"eos_token_id\": }").unwrap();
    let e = GenerationDefaults::from_dir(tmp.path()).unwrap_err();
    assert!(
        matches!(&e, LoadError::Json { path: p, .. } if *p == path),
        "{e:?}"
    );
}

#[test]
fn generation_config_values_and_absence() {
    let tmp = copy_fixture(SINGLE);
    edit_json(tmp.path(), "generation_config.json", |v| {
        v["eos_token_id"] = json!([0, 11]);
        v["temperature"] = json!(0.7);
        v["top_k"] = json!(50);
        v["top_p"] = json!(null);
        v["do_sample"] = json!(true);
    });
    let g = GenerationDefaults::from_dir(tmp.path()).unwrap();
    assert_eq!(g.eos_token_ids, vec![0, 11]);
    assert_eq!(g.bos_token_id, Some(0));
    assert_eq!(g.temperature, Some(0.7));
    assert_eq!(g.top_k, Some(50));
    assert_eq!(g.top_p, None);
    assert_eq!(g.do_sample, Some(true));

    fs::remove_file(tmp.path().join("generation_config.json")).unwrap();
    assert_eq!(
        GenerationDefaults::from_dir(tmp.path()).unwrap(),
        GenerationDefaults::default()
    );
}
