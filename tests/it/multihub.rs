//! Several hubs as separate processes on one PostgreSQL database and one
//! Redis bus: publishes reach every hub, versions agree, and the hubs ride
//! out Redis and PostgreSQL outages (simulated through a proxy each test
//! owns) without a version ever going backwards.

use std::collections::HashMap;
use std::time::Duration;

use redis::AsyncCommands;
use serde_json::{Value, json};

use crate::harness::{Server, TOKEN, Ws, next_json, next_json_within};
use crate::services::{Database, POSTGRES, Proxy, REDIS, available, unique};

async fn hub(db_url: &str, redis_url: &str, prefix: &str, id: &str) -> Server {
    Server::start(&[
        "--database-url",
        db_url,
        "--redis-url",
        redis_url,
        "--redis-prefix",
        prefix,
        "--hub-id",
        id,
        "--reconcile-interval",
        "1s",
    ])
    .await
}

/// A fresh database and Redis prefix (both named `name`) with three hubs on
/// them; the database lives as long as the returned guard.
async fn three_hubs(test: &str) -> (String, Database, [Server; 3]) {
    let name = unique(test);
    let db = Database::create(&name).await;
    let url = db.url_via(POSTGRES);
    let redis_url = format!("redis://{REDIS}");
    let hubs = [
        hub(&url, &redis_url, &name, "h1").await,
        hub(&url, &redis_url, &name, "h2").await,
        hub(&url, &redis_url, &name, "h3").await,
    ];
    (name, db, hubs)
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://{REDIS}"))
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("redis")
}

/// Reads until a frame with `state.n == n` arrives, checking that versions
/// only rise; returns the frames seen.
async fn read_until(ws: &mut Ws, n: u64, limit: Duration) -> Vec<Value> {
    let mut seen: Vec<Value> = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let frame = next_json_within(ws, left).await.unwrap_or_else(|| panic!("n={n} not seen; saw {seen:?}"));
        if let Some(last) = seen.last() {
            assert!(
                frame["version"].as_u64() > last["version"].as_u64(),
                "version went backwards: {last} then {frame}"
            );
        }
        let done = frame["state"]["n"] == n;
        seen.push(frame);
        if done {
            return seen;
        }
    }
}

#[tokio::test]
async fn a_publish_on_one_hub_reaches_readers_on_the_others() {
    if !available("multihub::reach").await {
        return;
    }
    let (_, _db, hubs) = three_hubs("reach").await;
    let mut readers = Vec::new();
    for h in &hubs[1..] {
        readers.push(h.ws("/v1/topics/match/ws").await);
    }
    let ack = hubs[0].publish("match", &json!({"n": 1})).await;
    for ws in &mut readers {
        let frame = next_json(ws).await;
        assert_eq!((frame["version"].as_u64(), frame["epoch"].as_str()), (Some(1), ack["epoch"].as_str()));
    }
    assert_eq!(hubs[2].get("match").await.1["state"]["n"], 1);
    let health: Value =
        hubs[1].http.get(hubs[1].url("/healthz")).send().await.expect("healthz").json().await.expect("json");
    assert_eq!((health["store"].as_str(), health["bus"].as_str()), (Some("postgres"), Some("up")));
}

#[tokio::test]
async fn concurrent_publishes_on_two_hubs_agree_on_versions() {
    if !available("multihub::concurrent").await {
        return;
    }
    let (_, _db, hubs) = three_hubs("concurrent").await;
    hubs[0].publish("t", &json!({"n": 0})).await;
    let mut readers = Vec::new();
    for h in &hubs {
        readers.push(h.ws("/v1/topics/t/ws").await);
    }
    let mut writers = Vec::new();
    for (i, h) in hubs[..2].iter().enumerate() {
        let http = h.http.clone();
        let url = h.url("/v1/topics/t");
        writers.push(tokio::spawn(async move {
            let mut versions = Vec::new();
            for k in 0..100u64 {
                let r = http
                    .put(&url)
                    .bearer_auth(TOKEN)
                    .header("content-type", "application/json")
                    .body(json!({"n": 1 + k * 2 + i as u64, "writer": i}).to_string())
                    .send()
                    .await
                    .expect("put");
                assert_eq!(r.status(), 200);
                versions.push(r.json::<Value>().await.expect("ack")["version"].as_u64().expect("version"));
            }
            versions
        }));
    }
    let mut all_versions = Vec::new();
    for w in writers {
        all_versions.extend(w.await.expect("writer"));
    }
    all_versions.sort_unstable();
    all_versions.dedup();
    assert_eq!(all_versions.len(), 200, "every acknowledged publish got its own version");
    let final_version = *all_versions.last().expect("versions");
    assert_eq!(final_version, 201);
    // The last acknowledged write may have been made on the other hub: wait
    // for it to arrive here before taking its state as the reference.
    let mut final_state = hubs[0].get("t").await.1;
    for _ in 0..100 {
        if final_state["version"] == final_version {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        final_state = hubs[0].get("t").await.1;
    }
    assert_eq!(final_state["version"], final_version);
    for ws in &mut readers {
        let mut last = 0;
        loop {
            let frame = next_json(ws).await;
            let v = frame["version"].as_u64().expect("version");
            assert!(v > last, "a reader saw version {v} after {last}");
            last = v;
            if v == final_version {
                assert_eq!(frame["state"], final_state["state"], "every hub ends on the same state");
                break;
            }
        }
    }
}

#[tokio::test]
async fn a_hub_killed_mid_stream_restarts_on_the_latest_version() {
    if !available("multihub::kill").await {
        return;
    }
    let name = unique("kill");
    let db = Database::create(&name).await;
    let url = db.url_via(POSTGRES);
    let redis_url = format!("redis://{REDIS}");
    let h1 = hub(&url, &redis_url, &name, "h1").await;
    let mut h2 = hub(&url, &redis_url, &name, "h2").await;
    for n in 1..=20 {
        h1.publish("t", &json!({"n": n})).await;
    }
    h2.kill9();
    for n in 21..=30 {
        h1.publish("t", &json!({"n": n})).await;
    }
    let h2 = hub(&url, &redis_url, &name, "h2").await;
    let (status, body) = h2.get("t").await;
    assert_eq!((status, body["version"].as_u64(), body["state"]["n"].as_u64()), (200, Some(30), Some(30)));
}

#[tokio::test]
async fn hubs_reconnect_to_redis_and_converge_after_an_outage() {
    if !available("multihub::redis-outage").await {
        return;
    }
    let name = unique("redis_outage");
    let db = Database::create(&name).await;
    let url = db.url_via(POSTGRES);
    let proxy = Proxy::start(REDIS).await;
    let via_proxy = format!("redis://{}", proxy.addr);
    // A long reconcile interval, so convergence must come from the bus.
    let slow = |id: &'static str| {
        let (url, via_proxy, name) = (url.clone(), via_proxy.clone(), name.clone());
        async move {
            Server::start(&[
                "--database-url",
                &url,
                "--redis-url",
                &via_proxy,
                "--redis-prefix",
                &name,
                "--hub-id",
                id,
                "--reconcile-interval",
                "300s",
            ])
            .await
        }
    };
    let h1 = slow("h1").await;
    let h2 = slow("h2").await;
    let mut reader = h2.ws("/v1/topics/t/ws").await;
    h1.publish("t", &json!({"n": 1})).await;
    read_until(&mut reader, 1, Duration::from_secs(10)).await;

    // Redis goes away: a publish still reaches the publishing hub's readers.
    proxy.cut();
    let mut local = h1.ws("/v1/topics/t/ws").await;
    next_json(&mut local).await;
    h1.publish("t", &json!({"n": 2})).await;
    assert_eq!(next_json(&mut local).await["state"]["n"], 2);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(h2.get("t").await.1["state"]["n"], 1, "h2 cannot know yet (the bus is down, reconcile is slow)");
    let ready: Value = h2.http.get(h2.url("/healthz")).send().await.expect("healthz").json().await.expect("json");
    assert_eq!(ready["bus"], "reconnecting");

    // Redis returns: h2 resubscribes, resyncs from the store, and its reader
    // moves on without going backwards.
    proxy.restore();
    read_until(&mut reader, 2, Duration::from_secs(15)).await;

    // The hubs' Redis connections are killed on the server side.
    let mut admin = redis().await;
    // Wait until both hubs are back on Redis (h1 reconnects with backoff
    // after the cut), so there is something to kill.
    let mut clients = String::new();
    for _ in 0..100 {
        clients = redis::cmd("CLIENT").arg("LIST").query_async(&mut admin).await.expect("client list");
        if clients.lines().filter(|l| l.contains(&format!("name={name}:")) && l.contains(":bus-sub")).count() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut killed = 0;
    for line in clients.lines().filter(|l| l.contains(&format!("name={name}:"))) {
        if let Some(id) = line.split(' ').find_map(|f| f.strip_prefix("id=")) {
            let _: redis::RedisResult<()> =
                redis::cmd("CLIENT").arg("KILL").arg("ID").arg(id).query_async(&mut admin).await;
            killed += 1;
        }
    }
    assert!(killed >= 2, "the hubs name their connections: {clients}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    h1.publish("t", &json!({"n": 3})).await;
    read_until(&mut reader, 3, Duration::from_secs(15)).await;
    assert!(h2.metric("spillway_bus_reconnects_total").await >= 1.0);
}

#[tokio::test]
async fn a_lost_announcement_is_covered_by_reconciliation() {
    if !available("multihub::lost").await {
        return;
    }
    let name = unique("lost");
    let db = Database::create(&name).await;
    let url = db.url_via(POSTGRES);
    let proxy = Proxy::start(REDIS).await;
    // h1 announces through a proxy that will be cut: its announcements are
    // lost, as if it died between commit and publish. h2 is on Redis directly.
    let h1 = hub(&url, &format!("redis://{}", proxy.addr), &name, "h1").await;
    let h2 = hub(&url, &format!("redis://{REDIS}"), &name, "h2").await;
    let mut reader = h2.ws("/v1/topics/t/ws").await;
    proxy.cut();
    h1.publish("t", &json!({"n": 1})).await;
    let started = std::time::Instant::now();
    read_until(&mut reader, 1, Duration::from_secs(10)).await;
    assert!(started.elapsed() < Duration::from_secs(5), "converged within the 1 s reconcile interval (plus slack)");
    assert!(h2.metric("spillway_store_resync_applied_total").await >= 1.0);
}

#[tokio::test]
async fn publishes_fail_with_503_while_postgres_is_unreachable_and_nothing_acknowledged_is_lost() {
    if !available("multihub::pg-outage").await {
        return;
    }
    let name = unique("pg_outage");
    let db = Database::create(&name).await;
    let proxy = Proxy::start(POSTGRES).await;
    let h1 = hub(&db.url_via(&proxy.addr.to_string()), &format!("redis://{REDIS}"), &name, "h1").await;
    let mut acked: HashMap<u64, u64> = HashMap::new();
    for n in 1..=5 {
        let ack = h1.publish("t", &json!({"n": n})).await;
        acked.insert(n, ack["version"].as_u64().expect("version"));
    }
    proxy.cut();
    let (status, body) = h1.put("t", &json!({"n": 99})).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("unavailable")));
    assert!(body["retry_after_ms"].as_u64().is_some());
    proxy.restore();
    let mut recovered = false;
    for _ in 0..50 {
        let (status, _) = h1.put("t", &json!({"n": 6})).await;
        if status == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(recovered, "publishes work again once PostgreSQL is back");
    let h2 = hub(&db.url_via(POSTGRES), &format!("redis://{REDIS}"), &name, "h2").await;
    let body = h2.get("t").await.1;
    assert_eq!(body["state"]["n"], 6);
    assert!(body["version"].as_u64().expect("version") >= 6, "every acknowledged version is there");
}

#[tokio::test]
async fn stream_entries_are_ingested_once_in_order_by_three_hubs() {
    if !available("multihub::ingest").await {
        return;
    }
    let (name, _db, hubs) = three_hubs("ingest").await;
    let topics = 5u64;
    let per_topic = 2000u64;
    let mut readers = Vec::new();
    for (i, h) in hubs.iter().enumerate() {
        let t = i as u64 % topics;
        readers.push((t, h.ws(&format!("/v1/topics/s{t}/ws")).await));
    }
    // The writer: XADD entries, topic by topic interleaved, as the seed's
    // score-ingest service would.
    let mut writer = redis().await;
    let key = format!("{name}:ingest");
    for n in 1..=per_topic {
        let mut pipe = redis::pipe();
        for t in 0..topics {
            let state = json!({"n": n, "topic": t}).to_string();
            pipe.cmd("XADD").arg(&key).arg("*").arg("topic").arg(format!("s{t}")).arg("state").arg(state).ignore();
        }
        pipe.query_async::<()>(&mut writer).await.expect("xadd");
    }
    // Every reader ends on its topic's last entry, with states only moving forward.
    for (_, ws) in &mut readers {
        let seen = read_until(ws, per_topic, Duration::from_secs(60)).await;
        let ns: Vec<u64> = seen.iter().map(|f| f["state"]["n"].as_u64().expect("n")).collect();
        assert!(ns.windows(2).all(|w| w[0] < w[1]), "entries applied in order, never twice: {ns:?}");
    }
    // The final state is identical on every hub, and no entry is pending.
    for t in 0..topics {
        let mut states = Vec::new();
        for h in &hubs {
            let body = h.get(&format!("s{t}")).await.1;
            states.push((body["version"].clone(), body["state"].clone()));
        }
        assert!(states.windows(2).all(|w| w[0] == w[1]), "hubs disagree on s{t}: {states:?}");
        assert_eq!(states[0].1["n"], per_topic);
        let version = states[0].0.as_u64().expect("version");
        assert!(version <= per_topic, "no entry applied twice: version {version} for {per_topic} entries");
    }
    let pending: redis::Value =
        redis::cmd("XPENDING").arg(&key).arg(format!("{name}:hubs")).query_async(&mut writer).await.expect("xpending");
    if let redis::Value::Array(parts) = pending {
        assert_eq!(parts.first(), Some(&redis::Value::Int(0)), "every entry acknowledged");
    }
    let _: redis::RedisResult<()> = writer.del(&key).await;
}

#[tokio::test]
async fn stream_ingest_respects_the_topic_limit_and_counts_what_it_drops() {
    if !available("multihub::ingest_limit").await {
        return;
    }
    let name = unique("ingestlimit");
    let db = Database::create(&name).await;
    let h = Server::start(&[
        "--database-url",
        &db.url_via(POSTGRES),
        "--redis-url",
        &format!("redis://{REDIS}"),
        "--redis-prefix",
        &name,
        "--hub-id",
        "h1",
        "--max-topics",
        "2",
    ])
    .await;
    let mut writer = redis().await;
    let key = format!("{name}:ingest");
    for (topic, state) in [("a", r#"{"n":1}"#), ("b", r#"{"n":1}"#), ("c", r#"{"n":1}"#), ("a", "not json")] {
        let _: String = redis::cmd("XADD")
            .arg(&key)
            .arg("*")
            .arg("topic")
            .arg(topic)
            .arg("state")
            .arg(state)
            .query_async(&mut writer)
            .await
            .expect("xadd");
    }
    let committed = "spillway_ingest_entries_total{result=\"committed\"}";
    let over = "spillway_ingest_entries_total{result=\"dropped\",reason=\"topic_limit\"}";
    let malformed = "spillway_ingest_entries_total{result=\"dropped\",reason=\"malformed\"}";
    let mut settled = false;
    for _ in 0..100 {
        if h.metric(committed).await + h.metric(over).await + h.metric(malformed).await >= 4.0 {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(settled, "every entry settled");
    assert_eq!((h.metric(committed).await, h.metric(over).await, h.metric(malformed).await), (2.0, 1.0, 1.0));
    assert_eq!(h.get("a").await.0, 200);
    assert_eq!(h.get("c").await.0, 404, "the third topic was not created");
    let _: redis::RedisResult<()> = writer.del(&key).await;
}
