//! Store tests: version assignment, preconditions and group commit, all on a
//! real SQLite file in a temporary directory. Merge-patch semantics are tested
//! in `protocol::delta`.

use std::sync::atomic::Ordering;

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

async fn open() -> (Store, tempfile::TempDir, CancellationToken, TaskTracker) {
    let dir = tempfile::tempdir().expect("tempdir");
    let tasks = TaskTracker::new();
    let shutdown = CancellationToken::new();
    let store = Store::open_sqlite(dir.path(), &tasks, shutdown.clone()).await.expect("open");
    (store, dir, shutdown, tasks)
}

fn write(topic: &str, change: Change) -> Write {
    Write::new(TopicName::parse(topic).expect("valid"), change)
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
