//! Runtime subscriptions through the admin API, end to end: `PUT`/`DELETE
//! /subscriptions/user/{user}[/client/{client}]/channel/{channel}` against the real binary, with real clients
//! receiving (or not) what is published to the channel afterwards.

mod common;

use common::*;

fn put(server: &Server, path: &str) -> serde_json::Value {
    let r = server.request("PUT", path, b"", &[]);
    assert_eq!(r.status, 200, "PUT {path}: {}", r.text());
    r.json()
}

fn delete(server: &Server, path: &str) -> serde_json::Value {
    let r = server.request("DELETE", path, b"", &[]);
    assert_eq!(r.status, 200, "DELETE {path}: {}", r.text());
    r.json()
}

/// An envelope's `(offset, payload)`; panics on anything else.
fn envelope(ws: &mut Ws) -> (u64, String) {
    let v: serde_json::Value = serde_json::from_str(&recv_text(ws)).unwrap();
    assert!(v.get("type").is_none(), "expected an envelope, got {v}");
    (
        v["o"].as_u64().unwrap(),
        v["d"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn put_subscribes_every_open_connection_of_the_user_and_answers_how_many() {
    let server = Server::start(&[("server.reactors", "2")]);
    let mut phone = server.connect("user=alice&client=phone");
    let mut web = server.connect("user=alice&client=web");
    let mut bob = server.connect("user=bob");

    let answer = put(&server, "/subscriptions/user/alice/channel/news");
    assert_eq!(answer["connections"], 2);
    assert_eq!(answer["at_limit"], 0);
    assert!(answer.get("cluster").is_none());

    server.publish("/publish/channel/news", "breaking");
    assert_eq!(recv_text(&mut phone), "breaking");
    assert_eq!(recv_text(&mut web), "breaking");
    assert_next_is_marker(&server, &mut [&mut phone, &mut web, &mut bob], "m");
    assert_eq!(
        server.metric(
            "densepush_subscription_requests_total",
            &[("op", "subscribe")]
        ),
        1
    );
}

#[test]
fn subscribing_twice_changes_nothing_and_delete_unsubscribes_idempotently() {
    let server = Server::start(&[]);
    let mut ws = server.connect("user=alice");
    assert_eq!(
        put(&server, "/subscriptions/user/alice/channel/news")["connections"],
        1
    );
    assert_eq!(
        put(&server, "/subscriptions/user/alice/channel/news")["connections"],
        0,
        "already a member"
    );
    server.publish("/publish/channel/news", "once");
    assert_eq!(recv_text(&mut ws), "once");
    assert_next_is_marker(&server, &mut [&mut ws], "m1");

    let answer = delete(&server, "/subscriptions/user/alice/channel/news");
    assert_eq!(answer["connections"], 1);
    assert!(answer.get("at_limit").is_none());
    assert_eq!(
        delete(&server, "/subscriptions/user/alice/channel/news")["connections"],
        0
    );
    server.publish("/publish/channel/news", "not for alice");
    assert_next_is_marker(&server, &mut [&mut ws], "m2");
    // The index forgets a channel with its last member (the gauge is refreshed every timer tick).
    assert!(wait_until(std::time::Duration::from_secs(5), || server
        .metric("densepush_index_channels", &[])
        == 0));
}

#[test]
fn the_client_route_changes_only_that_tokens_connections() {
    let server = Server::start(&[]);
    let mut phone = server.connect("user=alice&client=phone");
    let mut web = server.connect("user=alice&client=web");
    let mut bob_phone = server.connect("user=bob&client=phone");
    let answer = put(
        &server,
        "/subscriptions/user/alice/client/phone/channel/news",
    );
    assert_eq!(answer["connections"], 1);
    server.publish("/publish/channel/news", "to phones of alice");
    assert_eq!(recv_text(&mut phone), "to phones of alice");
    assert_next_is_marker(&server, &mut [&mut phone, &mut web, &mut bob_phone], "m");

    put(&server, "/subscriptions/user/alice/channel/news");
    let answer = delete(&server, "/subscriptions/user/alice/client/web/channel/news");
    assert_eq!(answer["connections"], 1, "only web left");
    server.publish("/publish/channel/news", "phone only again");
    assert_eq!(recv_text(&mut phone), "phone only again");
    assert_next_is_marker(&server, &mut [&mut phone, &mut web], "m2");
}

#[test]
fn a_tokens_channel_can_be_left_and_joined_again() {
    let server = Server::start(&[]);
    let mut ws = server.connect("user=alice&channels=news,sport");
    assert_eq!(
        delete(&server, "/subscriptions/user/alice/channel/news")["connections"],
        1
    );
    server.publish("/publish/channel/news", "gone");
    server.publish("/publish/channel/sport", "still here");
    assert_eq!(recv_text(&mut ws), "still here");
    assert_eq!(
        put(&server, "/subscriptions/user/alice/channel/news")["connections"],
        1
    );
    server.publish("/publish/channel/news", "back");
    assert_eq!(recv_text(&mut ws), "back");
}

#[test]
fn max_channels_holds_and_the_answer_counts_the_connections_at_the_limit() {
    let server = Server::start(&[("auth.max_channels", "2"), ("server.reactors", "2")]);
    let mut full = server.connect("user=alice&channels=a,b");
    let mut half = server.connect("user=alice&channels=a");
    let mut empty = server.connect("user=alice");
    let answer = put(&server, "/subscriptions/user/alice/channel/c");
    assert_eq!(
        (answer["connections"].as_u64(), answer["at_limit"].as_u64()),
        (Some(2), Some(1))
    );
    let answer = put(&server, "/subscriptions/user/alice/channel/d");
    assert_eq!(
        (answer["connections"].as_u64(), answer["at_limit"].as_u64()),
        (Some(1), Some(2)),
        "half and full are at the limit now"
    );
    server.publish("/publish/channel/c", "c");
    assert_eq!(recv_text(&mut half), "c");
    assert_eq!(recv_text(&mut empty), "c");
    server.publish("/publish/channel/d", "d");
    assert_eq!(recv_text(&mut empty), "d");
    assert_next_is_marker(&server, &mut [&mut full, &mut half, &mut empty], "m");
}

#[test]
fn a_reconnection_has_its_tokens_channels_only() {
    let server = Server::start(&[]);
    let ws = server.connect("user=alice&channels=sport");
    put(&server, "/subscriptions/user/alice/channel/news");
    close_ws(ws);
    // Nobody is connected: the change reaches no connection, and nothing is remembered for later ones.
    assert_eq!(
        put(&server, "/subscriptions/user/alice/channel/extra")["connections"],
        0
    );
    let mut again = server.connect("user=alice&channels=sport");
    server.publish("/publish/channel/news", "runtime channel");
    server.publish("/publish/channel/extra", "subscribed while away");
    server.publish("/publish/channel/sport", "token channel");
    assert_eq!(recv_text(&mut again), "token channel");
    assert_next_is_marker(&server, &mut [&mut again], "m");
}

#[test]
fn since_replays_what_the_joining_connection_missed_then_live_ones_once() {
    let server = Server::start(&[("history.channel", "true"), ("server.reactors", "2")]);
    for i in 1..=5 {
        server.publish("/publish/channel/news", &format!("old {i}"));
    }
    let mut enveloped = server.connect("user=alice&client=a&recover=1");
    let mut bare = server.connect("user=alice&client=b");
    let answer = put(&server, "/subscriptions/user/alice/channel/news?since=3");
    assert_eq!(answer["connections"], 2);
    server.publish("/publish/channel/news", "live");
    for want in [(4, "old 4"), (5, "old 5"), (6, "live")] {
        assert_eq!(envelope(&mut enveloped), (want.0, want.1.to_string()));
    }
    for want in ["old 4", "old 5", "live"] {
        assert_eq!(
            recv_text(&mut bare),
            want,
            "a bare connection gets bare replays"
        );
    }
    // Already a member: nothing is replayed again.
    assert_eq!(
        put(&server, "/subscriptions/user/alice/channel/news?since=0")["connections"],
        0
    );
    server.publish("/publish/channel/news", "next");
    assert_eq!(envelope(&mut enveloped), (7, "next".to_string()));
    assert_eq!(recv_text(&mut bare), "next");
}

#[test]
fn since_in_another_epoch_or_past_what_history_holds_sends_a_resync() {
    let server = Server::start(&[("history.channel", "true"), ("history.size", "2")]);
    for i in 1..=5 {
        server.publish("/publish/channel/news", &format!("{i}"));
    }
    let epoch = server
        .request("GET", "/history/channel:news", b"", &[])
        .json()["epoch"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut ws = server.connect("user=alice&recover=1");
    // Offset 1 was evicted (size 2 keeps 4 and 5): 2 and 3 cannot be replayed.
    put(&server, "/subscriptions/user/alice/channel/news?since=1");
    let v: serde_json::Value = serde_json::from_str(&recv_text(&mut ws)).unwrap();
    assert_eq!(
        (v["type"].as_str(), v["s"].as_str(), v["o"].as_u64()),
        (Some("resync"), Some("channel:news"), Some(5))
    );
    assert_eq!(v["e"], epoch.as_str());
    delete(&server, "/subscriptions/user/alice/channel/news");
    put(
        &server,
        "/subscriptions/user/alice/channel/news?since=OTHEREPO:4",
    );
    let v: serde_json::Value = serde_json::from_str(&recv_text(&mut ws)).unwrap();
    assert_eq!(v["type"], "resync", "{v}");
    delete(&server, "/subscriptions/user/alice/channel/news");
    put(
        &server,
        &format!("/subscriptions/user/alice/channel/news?since={epoch}:4"),
    );
    assert_eq!(envelope(&mut ws), (5, "5".to_string()));
}

#[test]
fn malformed_subscription_requests_are_refused_and_change_nothing() {
    let server = Server::start(&[("auth.max_id_bytes", "8")]);
    let mut ws = server.connect("user=alice");
    for (method, path, status, why) in [
        (
            "PUT",
            "/subscriptions/user/alice/channel/news?since=3",
            400,
            "history for channels",
        ),
        (
            "DELETE",
            "/subscriptions/user/alice/channel/news?since=3",
            400,
            "PUT",
        ),
        (
            "PUT",
            "/subscriptions/user/alice/channel/123456789",
            400,
            "auth.max_id_bytes",
        ),
        (
            "PUT",
            "/subscriptions/user/alice/channel/a%0Ab",
            400,
            "control",
        ),
        ("PUT", "/subscriptions/user//channel/news", 400, "empty"),
    ] {
        let r = server.request(method, path, b"", &[]);
        assert_eq!(r.status, status, "{method} {path}: {}", r.text());
        assert!(r.text().contains(why), "{method} {path}: {}", r.text());
    }
    let r = server.request("POST", "/subscriptions/user/alice/channel/news", b"", &[]);
    assert_eq!((r.status, r.header("Allow")), (405, Some("PUT, DELETE")));
    server.publish("/publish/channel/news", "nobody");
    assert_next_is_marker(&server, &mut [&mut ws], "m");
}

#[test]
fn since_with_history_on_takes_an_offset_in_the_current_epoch() {
    let server = Server::start(&[("history.channel", "true")]);
    let r = server.request(
        "PUT",
        "/subscriptions/user/alice/channel/news?since=x",
        b"",
        &[],
    );
    assert_eq!(r.status, 400, "{}", r.text());
    let r = server.request(
        "PUT",
        "/subscriptions/user/alice/channel/news?since=E:-1",
        b"",
        &[],
    );
    assert_eq!(r.status, 400, "{}", r.text());
}
