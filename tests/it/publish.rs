//! The publish API and snapshot reads: success paths, every refusal with its
//! status and error body, and proof that a refused request changed nothing.

use serde_json::{Value, json};

use crate::harness::{Server, TOKEN, status_json};

#[tokio::test]
async fn put_patch_get_delete_round_trip() {
    let s = Server::start(&[]).await;
    let ack = s.publish("match-1", &json!({"home": {"score": 0}, "clock": "00:00"})).await;
    assert_eq!(ack["topic"], "match-1");
    assert_eq!(ack["version"], 1);
    let epoch = ack["epoch"].as_str().expect("epoch").to_string();
    assert_eq!(epoch.len(), 16);
    assert!(ack["updated_at"].as_str().expect("updated_at").ends_with('Z'));

    let patch = s
        .http
        .patch(s.url("/v1/topics/match-1"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/merge-patch+json")
        .body(r#"{"home":{"score":1},"clock":null}"#)
        .send()
        .await
        .expect("patch");
    let (status, ack) = status_json(patch).await;
    assert_eq!((status, ack["version"].as_u64()), (200, Some(2)));

    let (status, body) = s.get("match-1").await;
    assert_eq!(status, 200);
    assert_eq!(body["state"], json!({"home": {"score": 1}}));
    assert_eq!((body["epoch"].as_str(), body["version"].as_u64()), (Some(epoch.as_str()), Some(2)));

    let list: Value = s.http.get(s.url("/v1/topics")).send().await.expect("list").json().await.expect("json");
    assert_eq!(list["topics"][0]["topic"], "match-1");
    assert_eq!(list["topics"][0]["version"], 2);

    let del = s.http.delete(s.url("/v1/topics/match-1")).bearer_auth(TOKEN).send().await.expect("delete");
    let (status, ack) = status_json(del).await;
    assert_eq!((status, ack["version"].as_u64()), (200, Some(3)));
    let (status, body) = s.get("match-1").await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    let list: Value = s.http.get(s.url("/v1/topics")).send().await.expect("list").json().await.expect("json");
    assert_eq!(list["topics"], json!([]));

    let ack = s.publish("match-1", &json!({"again": true})).await;
    assert_eq!(ack["version"], 4, "versions keep rising across delete and re-create");
    assert_ne!(ack["epoch"].as_str(), Some(epoch.as_str()), "a re-created topic has a new epoch");
}

#[tokio::test]
async fn etag_and_if_none_match() {
    let s = Server::start(&[]).await;
    let ack = s.publish("t", &json!({"a": 1})).await;
    let r = s.http.get(s.url("/v1/topics/t")).send().await.expect("get");
    let etag = r.headers()["etag"].to_str().expect("etag").to_string();
    assert_eq!(etag, format!("W/\"{}:{}\"", ack["epoch"].as_str().expect("epoch"), 1));
    let r = s.http.get(s.url("/v1/topics/t")).header("if-none-match", &etag).send().await.expect("get");
    assert_eq!(r.status(), 304);
    assert_eq!(r.headers()["etag"], etag.as_str());
    assert!(r.bytes().await.expect("body").is_empty());
    s.publish("t", &json!({"a": 2})).await;
    let r = s.http.get(s.url("/v1/topics/t")).header("if-none-match", &etag).send().await.expect("get");
    assert_eq!(r.status(), 200, "a new version does not match the old tag");
    let head = s.http.head(s.url("/v1/topics/t")).send().await.expect("head");
    assert_eq!(head.status(), 200);
}

#[tokio::test]
async fn if_match_guards_writes() {
    let s = Server::start(&[]).await;
    let ack = s.publish("t", &json!({"a": 1})).await;
    let tag = format!("\"{}:1\"", ack["epoch"].as_str().expect("epoch"));
    let put = |value: Value, if_match: String| {
        s.http
            .put(s.url("/v1/topics/t"))
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .header("if-match", if_match)
            .body(value.to_string())
            .send()
    };
    let (status, _) = status_json(put(json!({"a": 2}), tag.clone()).await.expect("put")).await;
    assert_eq!(status, 200);
    let (status, body) = status_json(put(json!({"a": 3}), tag).await.expect("put")).await;
    assert_eq!((status, body["error"].as_str()), (412, Some("precondition_failed")));
    assert!(body["current"].as_str().expect("current").ends_with(":2"));
    let (_, now) = s.get("t").await;
    assert_eq!(now["state"]["a"], 2, "a failed precondition changes nothing");
    let (status, _) = status_json(put(json!({}), "not-a-tag".into()).await.expect("put")).await;
    assert_eq!(status, 400);
}

/// Every refusal: its status, its error code, and an unchanged state.
#[tokio::test]
async fn bad_input_is_refused_clearly_and_changes_nothing() {
    let s = Server::start(&["--max-body", "1KiB"]).await;
    s.publish("t", &json!({"keep": "me"})).await;
    let before = s.get("t").await.1;

    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "no token",
            s.http.put(s.url("/v1/topics/t")).header("content-type", "application/json").body("{}"),
            401,
            "unauthorized",
        ),
        (
            "wrong token",
            s.http
                .put(s.url("/v1/topics/t"))
                .bearer_auth("wrong-token-xyz")
                .header("content-type", "application/json")
                .body("{}"),
            401,
            "unauthorized",
        ),
        (
            "wrong content type",
            s.http.put(s.url("/v1/topics/t")).bearer_auth(TOKEN).header("content-type", "text/plain").body("{}"),
            415,
            "unsupported_media_type",
        ),
        (
            "patch as plain json",
            s.http
                .patch(s.url("/v1/topics/t"))
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body("{}"),
            415,
            "unsupported_media_type",
        ),
        (
            "not json",
            s.http
                .put(s.url("/v1/topics/t"))
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body("{nope"),
            400,
            "bad_json",
        ),
        (
            "an array",
            s.http
                .put(s.url("/v1/topics/t"))
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body("[1,2]"),
            400,
            "not_an_object",
        ),
        (
            "a string",
            s.http
                .put(s.url("/v1/topics/t"))
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body("\"x\""),
            400,
            "not_an_object",
        ),
        (
            "too large",
            s.http
                .put(s.url("/v1/topics/t"))
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body(json!({"big": "x".repeat(2000)}).to_string()),
            413,
            "payload_too_large",
        ),
        (
            "bad topic name",
            s.http
                .put(s.url("/v1/topics/-bad"))
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body("{}"),
            400,
            "bad_topic",
        ),
        (
            "topic name too long",
            s.http
                .put(s.url(&format!("/v1/topics/{}", "x".repeat(129))))
                .bearer_auth(TOKEN)
                .header("content-type", "application/json")
                .body("{}"),
            400,
            "bad_topic",
        ),
        (
            "patch a missing topic",
            s.http
                .patch(s.url("/v1/topics/missing"))
                .bearer_auth(TOKEN)
                .header("content-type", "application/merge-patch+json")
                .body("{}"),
            404,
            "not_found",
        ),
        ("delete a missing topic", s.http.delete(s.url("/v1/topics/missing")).bearer_auth(TOKEN), 404, "not_found"),
        ("get a bad name", s.http.get(s.url("/v1/topics/a%20b")), 400, "bad_topic"),
        ("unknown route", s.http.get(s.url("/v2/nothing")), 404, "not_found"),
        ("wrong method", s.http.post(s.url("/v1/topics/t")).bearer_auth(TOKEN), 405, "method_not_allowed"),
    ];
    for (what, request, want_status, want_code) in cases {
        let response = request.send().await.expect(what);
        let www = response.headers().get("www-authenticate").cloned();
        let (status, body) = status_json(response).await;
        assert_eq!(status, want_status, "{what}: {body}");
        assert_eq!(body["error"], want_code, "{what}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: a message for people");
        if status == 401 {
            assert!(www.is_some(), "{what}: 401 names the scheme");
        }
    }
    // A body without Content-Length that grows past the limit is cut off too.
    let chunks = futures_util::stream::iter((0..20).map(|_| Ok::<_, std::io::Error>(vec![b' '; 100])));
    // A client of its own: the server closes a connection whose body it
    // refused mid-stream, which must not break the shared pool.
    let response = reqwest::Client::new()
        .put(s.url("/v1/topics/t"))
        .bearer_auth(TOKEN)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("streamed");
    assert_eq!(response.status(), 413);

    assert_eq!(s.get("t").await.1, before, "no refused request changed the state");
    assert_eq!(s.get("missing").await.0, 404, "no refused request created a topic");
    assert_eq!(s.metric("spillway_publishes_total{result=\"ok\"}").await, 1.0);
}

#[tokio::test]
async fn tokens_rotate_and_never_reach_the_log() {
    let s = Server::start(&["--publish-token", "second-token-abcdef"]).await;
    for token in [TOKEN, "second-token-abcdef"] {
        let r = s
            .http
            .put(s.url("/v1/topics/t"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .expect("put");
        assert_eq!(r.status(), 200, "token {token} accepted");
    }
    assert!(!s.logged(TOKEN) && !s.logged("second-token-abcdef"), "a configured token never appears in the log");
}
