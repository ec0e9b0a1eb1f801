//! RFC 7396 JSON merge patches: applying one (the store's `PATCH`) and
//! computing one between two states (the `patch` frames of `?delta=merge-patch`).

use serde_json::{Map, Value};

/// Applies a merge patch (an object) to `target`, as RFC 7396 section 2.
pub fn apply_merge_patch(target: &mut Value, patch: &Map<String, Value>) {
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(fields) = target {
        for (key, value) in patch {
            match value {
                Value::Null => {
                    fields.shift_remove(key);
                }
                Value::Object(inner) => apply_merge_patch(fields.entry(key.clone()).or_insert(Value::Null), inner),
                other => {
                    fields.insert(key.clone(), other.clone());
                }
            }
        }
    }
}

/// The merge patch that turns `old` into `new`, or `None` when no merge patch
/// can express the change: RFC 7396 reads `null` as "remove", so a `null`
/// that `new` holds as a member value cannot be written into a patch.
pub fn merge_patch_between(old: &Map<String, Value>, new: &Map<String, Value>) -> Option<Map<String, Value>> {
    let mut patch = Map::new();
    for key in old.keys() {
        if !new.contains_key(key) {
            patch.insert(key.clone(), Value::Null);
        }
    }
    for (key, value) in new {
        match (old.get(key), value) {
            (Some(before), after) if before == after => {}
            (Some(Value::Object(before)), Value::Object(after)) => {
                let inner = merge_patch_between(before, after)?;
                if !inner.is_empty() {
                    patch.insert(key.clone(), Value::Object(inner));
                }
            }
            (_, after) => {
                if holds_member_null(after) {
                    return None;
                }
                patch.insert(key.clone(), after.clone());
            }
        }
    }
    Some(patch)
}

/// Whether `value` is `null` or an object with a `null` member at any depth
/// (outside arrays, which a merge patch copies whole).
fn holds_member_null(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Object(fields) => fields.values().any(holds_member_null),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn apply_matches_the_rfc_examples() {
        // RFC 7396, appendix A, for the cases whose target and patch are objects.
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (json!({"a":"b","b":"c"}), json!({"a":null}), json!({"b":"c"})),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (json!({"a":{"b":"c"}}), json!({"a":{"b":"d","c":null}}), json!({"a":{"b":"d"}})),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!({}), json!({"a":{"bb":{"ccc":null}}}), json!({"a":{"bb":{}}})),
        ];
        for (mut target, patch, want) in cases {
            apply_merge_patch(&mut target, &obj(patch.clone()));
            assert_eq!(target, want, "patch {patch}");
        }
    }

    #[test]
    fn nulls_the_patch_cannot_carry_are_refused() {
        assert_eq!(merge_patch_between(&obj(json!({"a":1})), &obj(json!({"a":null}))), None);
        assert_eq!(merge_patch_between(&obj(json!({})), &obj(json!({"a":{"b":null}}))), None);
        let arrays = merge_patch_between(&obj(json!({})), &obj(json!({"a":[null]})));
        assert_eq!(arrays, Some(obj(json!({"a":[null]}))), "a null inside an array is copied whole");
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            (-1000i64..1000).prop_map(|n| json!(n)),
            "[a-c]{0,3}".prop_map(Value::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                prop::collection::btree_map("[a-d]", inner, 0..4).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn json_object() -> impl Strategy<Value = Map<String, Value>> {
        prop::collection::btree_map("[a-d]", json_value(), 0..5).prop_map(|m| m.into_iter().collect())
    }

    proptest! {
        #[test]
        fn apply_agrees_with_an_independent_implementation(target in json_object(), patch in json_object()) {
            let mut ours = Value::Object(target.clone());
            apply_merge_patch(&mut ours, &patch);
            let mut theirs = Value::Object(target);
            json_patch::merge(&mut theirs, &Value::Object(patch.clone()));
            prop_assert_eq!(&ours, &theirs);
            // Applying the same patch again changes nothing.
            let mut again = ours.clone();
            apply_merge_patch(&mut again, &patch);
            prop_assert_eq!(again, ours);
        }

        #[test]
        fn a_computed_patch_applied_to_its_base_gives_the_new_state(old in json_object(), new in json_object()) {
            match merge_patch_between(&old, &new) {
                Some(patch) => {
                    let mut rebuilt = Value::Object(old);
                    apply_merge_patch(&mut rebuilt, &patch);
                    prop_assert_eq!(rebuilt, Value::Object(new));
                }
                // Refused only when the new state holds a null somewhere.
                None => {
                    let has_null = format!("{new:?}").contains("Null");
                    prop_assert!(has_null);
                }
            }
        }
    }
}
