//! Token ids.

use super::*;

// ---------------------------------------------------------------------------------------
// Token ids
// ---------------------------------------------------------------------------------------

#[test]
fn eos_token_id_int_or_list() {
    let cfg = ok(&with(json!({"eos_token_id": 11, "bos_token_id": 1})));
    assert_eq!(cfg.eos_token_ids, vec![11]);
    assert_eq!(cfg.bos_token_id, Some(1));
    let cfg = ok(&with(json!({"eos_token_id": [11, 193, 7]})));
    assert_eq!(cfg.eos_token_ids, vec![11, 193, 7]);
    let cfg = ok(&with(json!({"eos_token_id": [], "bos_token_id": null})));
    assert!(cfg.eos_token_ids.is_empty());
    assert_eq!(cfg.bos_token_id, None);
    let cfg = ok(&with(json!({"bos_token_id": [3, 4]})));
    assert_eq!(cfg.bos_token_id, Some(3));
}

#[test]
fn bad_token_ids_are_invalid() {
    for bad in [json!(-1), json!("11"), json!([11, "x"]), json!(1u64 << 40)] {
        let e = err(&with(json!({ "eos_token_id": bad.clone() })));
        assert!(
            matches!(
                &e,
                LoadError::InvalidField {
                    field: "eos_token_id",
                    ..
                }
            ),
            "{bad}: {e:?}"
        );
    }
    let e = err(&with(json!({"bos_token_id": 1.5})));
    assert!(
        matches!(
            &e,
            LoadError::InvalidField {
                field: "bos_token_id",
                ..
            }
        ),
        "{e:?}"
    );
}
