//! Store tests: merge-patch semantics (property-tested against an independent
//! implementation), version assignment, preconditions and group commit, all on
//! a real SQLite file in a temporary directory.

use std::sync::atomic::Ordering;

use proptest::prelude::*;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

#[test]
fn merge_patch_matches_the_rfc_examples() {
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
    fn merge_patch_agrees_with_an_independent_implementation(target in json_object(), patch in json_object()) {
        let mut ours = Value::Object(target.clone());
        apply_merge_patch(&mut ours, &patch);
        let mut theirs = Value::Object(target);
        json_patch::merge(&mut theirs, &Value::Object(patch.clone()));
        prop_assert_eq!(&ours, &theirs);
        // Applying the same patch again changes nothing (RFC 7396 patches
        // are idempotent).
        let mut again = ours.clone();
        apply_merge_patch(&mut again, &patch);
        prop_assert_eq!(again, ours);
    }
}

async fn open() -> (Store, tempfile::TempDir, CancellationToken, TaskTracker) {
    let dir = tempfile::tempdir().expect("tempdir");
    let tasks = TaskTracker::new();
    let shutdown = CancellationToken::new();
    let store = Store::open_sqlite(dir.path(), &tasks, shutdown.clone()).await.expect("open");
    (store, dir, shutdown, tasks)
}

fn write(topic: &str, change: Change) -> Write {
    Write { topic: TopicName::parse(topic).expect("valid"), change, precondition: None }
}

#[tokio::test]
async fn versions_rise_across_delete_and_recreate() {
    let (store, _dir, _stop, _tasks) = open().await;
    let a = store.write(write("t", Change::Put(obj(json!({"n":1}))))).await.expect("put");
    assert_eq!(a.version, 1);
    let b = store.write(write("t", Change::Patch(obj(json!({"m":2}))))).await.expect("patch");
    assert_eq!((b.version, b.epoch), (2, a.epoch));
    assert_eq!(&b.state[..], br#"{"n":1,"m":2}"#);
    let gone = store.write(write("t", Change::Delete)).await.expect("delete");
    assert!(gone.deleted);
    assert_eq!(gone.version, 3);
    assert!(matches!(store.write(write("t", Change::Patch(Map::new()))).await, Err(WriteError::NotFound)));
    assert!(matches!(store.write(write("t", Change::Delete)).await, Err(WriteError::NotFound)));
    let c = store.write(write("t", Change::Put(Map::new()))).await.expect("recreate");
    assert_eq!(c.version, 4);
    assert_ne!(c.epoch, a.epoch, "a re-created topic is a new incarnation");
    let loaded = store.load_all().await.expect("load");
    assert_eq!(loaded.len(), 1);
    assert_eq!((loaded[0].version, loaded[0].epoch), (4, c.epoch));
}

#[tokio::test]
async fn preconditions_are_checked_against_the_stored_row() {
    let (store, _dir, _stop, _tasks) = open().await;
    let mut w = write("t", Change::Put(Map::new()));
    w.precondition = Some(Precondition::Exists);
    assert!(matches!(store.write(w.clone()).await, Err(WriteError::PreconditionFailed { current: None })));
    let first = store.write(write("t", Change::Put(Map::new()))).await.expect("put");
    store.write(w).await.expect("exists now");
    let mut stale = write("t", Change::Put(Map::new()));
    stale.precondition = Some(Precondition::At(first.position()));
    match store.write(stale).await {
        Err(WriteError::PreconditionFailed { current: Some(p) }) => assert_eq!(p.version, 2),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn concurrent_writers_share_commits() {
    let (store, _dir, _stop, _tasks) = open().await;
    let mut handles = Vec::new();
    for i in 0..200 {
        let store = store.clone();
        handles.push(tokio::spawn(async move {
            store.write(write(&format!("t{}", i % 7), Change::Put(obj(json!({"i": i}))))).await
        }));
    }
    for h in handles {
        h.await.expect("join").expect("write");
    }
    let stats = store.stats();
    assert_eq!(stats.writes.load(Ordering::Relaxed), 200);
    let commits = stats.commits.load(Ordering::Relaxed);
    assert!(commits < 200, "200 concurrent writes took {commits} commits: no batching");
    let single = stats.batch_buckets[0].load(Ordering::Relaxed);
    assert!(single < commits, "some batch held more than one write");
}
