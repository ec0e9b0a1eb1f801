//! Nothing acknowledged is ever lost: `kill -9` during concurrent publishes,
//! restart on the same data directory, and every acknowledged version is
//! there with the same epoch and state.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;

use crate::harness::{Server, TOKEN};

/// Per topic: the epoch, the highest acknowledged version, and the tag
/// (`writer * 1e6 + n`) of the state that version carried.
type Acked = (String, u64, u64);

#[tokio::test]
async fn every_acknowledged_publish_survives_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut s = Server::start_in(dir.path(), &[]).await;
    let acked: Arc<Mutex<HashMap<String, Acked>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..6u64 {
        let http = s.http.clone();
        let base = s.url("/v1/topics/");
        let acked = Arc::clone(&acked);
        writers.push(tokio::spawn(async move {
            let topic = format!("topic-{}", w % 3);
            for n in 0.. {
                let sent = http
                    .put(format!("{base}{topic}"))
                    .bearer_auth(TOKEN)
                    .header("content-type", "application/json")
                    .body(json!({"writer": w, "n": n}).to_string())
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                let Ok(response) = sent else { break };
                if response.status() != 200 {
                    break;
                }
                let Ok(ack) = response.json::<serde_json::Value>().await else { break };
                let version = ack["version"].as_u64().expect("version");
                let epoch = ack["epoch"].as_str().expect("epoch").to_string();
                let mut acked = acked.lock().expect("lock");
                let entry = acked.entry(topic.clone()).or_insert((epoch.clone(), 0, 0));
                if version > entry.1 {
                    *entry = (epoch, version, w * 1_000_000 + n);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    s.kill9();
    for w in writers {
        let _ = w.await;
    }
    let acked = acked.lock().expect("lock").clone();
    assert_eq!(acked.len(), 3, "every writer got acknowledgements before the kill");

    let s = Server::start_in(dir.path(), &[]).await;
    for (topic, (epoch, version, _)) in &acked {
        let (status, body) = s.get(topic).await;
        assert_eq!(status, 200, "{topic} survived");
        assert_eq!(body["epoch"].as_str(), Some(epoch.as_str()), "{topic}: same epoch");
        let stored = body["version"].as_u64().expect("version");
        // An unacknowledged write may also have committed; never fewer.
        assert!(stored >= *version, "{topic}: acknowledged {version}, found {stored}");
        if stored == *version {
            let (_, _, tagged) = acked[topic];
            let state = &body["state"];
            assert_eq!(state["writer"].as_u64().expect("writer") * 1_000_000 + state["n"].as_u64().expect("n"), tagged);
        }
    }
}
