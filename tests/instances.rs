//! SPEC §8: many gateways on one Redis act as one. For a shared session
//! there is one runtime connection, one owner and one numbering of frames
//! in the whole deployment; an instance's death loses no session.
//!
//! Every test runs two or three real gateway processes on one real
//! `redis-server` and a real runtime on port 0.

mod support;

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use support::gateway::{Gateway, config};
use support::http::{self as api, Login, login};
use support::redis::RedisServer;
use support::upstream::{Event, Upstream};
use support::viewports::{NOT_OWNED, shared_route, text};
use support::wait::eventually;
use support::ws::{self, Ws, expect_close};
use tokio_tungstenite::tungstenite::Message;

/// `n` gateways on `redis`, all with the same shared route.
fn gateways(n: usize, redis: &RedisServer, up: &Upstream, extra: &str) -> Vec<Gateway> {
    (0..n)
        .map(|_| Gateway::start("", &config(Some(&redis.url()), &shared_route(up, extra))))
        .collect()
}

struct View {
    ws: Ws,
    role: String,
    seq: u64,
    resume: Option<String>,
}

async fn viewport(gw: &Gateway, s: &Login, resume_from: Option<u64>) -> View {
    let url = match resume_from {
        Some(n) => gw.url(&format!("/ws/agent?resume_from={n}")),
        None => gw.url("/ws/agent"),
    };
    let (ws, resp) = match ws::connect_bearer(&url, &s.token).await {
        Ok(x) => x,
        Err(e) => panic!(
            "upgrade refused: {}; gateway log:\n{}",
            ws::describe(&e),
            gw.log()
        ),
    };
    let h = resp.headers();
    View {
        ws,
        role: h["portcullis-role"].to_str().unwrap().to_string(),
        seq: h["portcullis-seq"].to_str().unwrap().parse().unwrap(),
        resume: h
            .get("portcullis-resume")
            .map(|v| v.to_str().unwrap().to_string()),
    }
}

/// Waits until no viewport of `s` owns it (the owner's departure reached
/// the store), by looking at the owner key README documents.
async fn ownership_free(redis: &RedisServer, s: &Login) {
    let conn = redis.client().await;
    let key = format!("pt:owner:{{{}}}:agent", s.sid);
    eventually("ownership released", Duration::from_secs(5), || {
        let mut conn = conn.clone();
        let key = key.clone();
        async move {
            let n: i64 = redis::cmd("EXISTS")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .unwrap();
            n == 0
        }
    })
    .await;
}

#[tokio::test]
async fn one_runtime_connection_one_owner_one_numbering_across_instances() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let gws = gateways(2, &redis, &up, "");
    let (a, b) = (&gws[0], &gws[1]);
    let s = login(a.addr, "alice").await;

    let mut va = viewport(a, &s, None).await;
    assert_eq!((va.role.as_str(), va.seq), ("owner", 0));
    va.ws.send(Message::text("first")).await.unwrap();
    assert_eq!(text(&mut va.ws).await, "first");

    let mut vb = viewport(b, &s, None).await;
    assert_eq!(vb.role, "reader", "A's viewport owns the session");
    assert_eq!(vb.seq, 1, "B counts on from A's numbering");
    assert_eq!(up.connections(), 1, "one runtime connection for both");

    va.ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(text(&mut va.ws).await, "hello");
    assert_eq!(text(&mut vb.ws).await, "hello", "frame 1 on B too");

    vb.ws.send(Message::text("from-b")).await.unwrap();
    assert_eq!(text(&mut vb.ws).await, NOT_OWNED);
    va.ws.send(Message::text("sentinel")).await.unwrap();
    assert_eq!(text(&mut va.ws).await, "sentinel");
    assert_eq!(text(&mut vb.ws).await, "sentinel");
    assert_eq!(up.received(), vec!["first", "hello", "sentinel"]);
    assert_eq!(up.connections(), 1);

    // Both instances count both sockets.
    for gw in [a, b] {
        let r = api::get_session(gw.addr, &s.sid, &s.token).await;
        assert_eq!(r.json()["connections"], 2);
    }
}

#[tokio::test]
async fn the_owner_leaves_and_a_reader_on_another_instance_takes_over() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let gws = gateways(2, &redis, &up, "");
    let (a, b) = (&gws[0], &gws[1]);
    let s = login(a.addr, "alice").await;
    let mut owner = viewport(a, &s, None).await;
    let mut reader = viewport(b, &s, None).await;
    assert_eq!(
        (owner.role.as_str(), reader.role.as_str()),
        ("owner", "reader")
    );
    owner.ws.close(None).await.unwrap();
    let _ = expect_close(&mut owner.ws, Duration::from_secs(5)).await;
    // The owner's close completes only after its ownership was given up.
    reader.ws.send(Message::text("take-over")).await.unwrap();
    assert_eq!(text(&mut reader.ws).await, "take-over");
    assert_eq!(up.received(), vec!["take-over"]);
}

#[tokio::test]
async fn two_readers_on_two_instances_race_for_ownership_and_exactly_one_wins() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let gws = gateways(3, &redis, &up, "");
    let s = login(gws[0].addr, "alice").await;
    for round in 0..5 {
        let mut owner = viewport(&gws[0], &s, None).await;
        let mut ra = viewport(&gws[1], &s, None).await;
        let mut rb = viewport(&gws[2], &s, None).await;
        assert_eq!(owner.role, "owner", "round {round}");
        assert_eq!((ra.role.as_str(), rb.role.as_str()), ("reader", "reader"));
        drop(owner.ws.close(None).await);
        let _ = expect_close(&mut owner.ws, Duration::from_secs(5)).await;
        ownership_free(&redis, &s).await;
        let (a_claim, b_claim) = (format!("claim-a-{round}"), format!("claim-b-{round}"));
        let (x, y) = tokio::join!(
            ra.ws.send(Message::text(a_claim.clone())),
            rb.ws.send(Message::text(b_claim.clone()))
        );
        x.unwrap();
        y.unwrap();
        let winner = eventually("one claim at the runtime", Duration::from_secs(5), || {
            let got: Vec<String> = up
                .received()
                .into_iter()
                .filter(|m| *m == a_claim || *m == b_claim)
                .collect();
            async move { if got.is_empty() { Err(got) } else { Ok(got) } }
        })
        .await;
        // Each loser's refusal comes before the winner's echo it sees.
        let (mut a_msgs, mut b_msgs) = (vec![text(&mut ra.ws).await], vec![text(&mut rb.ws).await]);
        if a_msgs[0] == NOT_OWNED {
            a_msgs.push(text(&mut ra.ws).await);
        }
        if b_msgs[0] == NOT_OWNED {
            b_msgs.push(text(&mut rb.ws).await);
        }
        assert_eq!(winner.len(), 1, "round {round}: {winner:?}");
        let refusals = a_msgs
            .iter()
            .chain(&b_msgs)
            .filter(|m| *m == NOT_OWNED)
            .count();
        assert_eq!(refusals, 1, "round {round}: a={a_msgs:?} b={b_msgs:?}");
        assert!(a_msgs.contains(&winner[0]) && b_msgs.contains(&winner[0]));
        drop(ra);
        drop(rb);
        ownership_free(&redis, &s).await;
    }
    assert_eq!(up.connections(), 1, "one runtime connection throughout");
}

#[tokio::test]
async fn frames_read_on_a_resume_on_b_with_nothing_lost_or_doubled() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let gws = gateways(2, &redis, &up, "");
    let (a, b) = (&gws[0], &gws[1]);
    let s = login(a.addr, "alice").await;
    let mut va = viewport(a, &s, None).await;
    va.ws.send(Message::text("stream:5")).await.unwrap();
    for i in 0..5 {
        assert_eq!(text(&mut va.ws).await, i.to_string());
    }
    // Frames 5-9 leave the runtime after A's viewport is gone.
    for i in 5..10 {
        va.ws
            .send(Message::text(format!("later:{}:{i}", 300 + 20 * i)))
            .await
            .unwrap();
    }
    va.ws.close(None).await.unwrap();
    let _ = expect_close(&mut va.ws, Duration::from_secs(5)).await;
    assert_eq!(up.next_event(Duration::from_secs(5)).await, Event::Streamed);
    for _ in 5..10 {
        assert_eq!(
            up.next_event(Duration::from_secs(5)).await,
            Event::SentLater
        );
    }
    let mut vb = viewport(b, &s, Some(5)).await;
    assert_eq!((vb.seq, vb.resume.as_deref()), (5, Some("ok")));
    for i in 5..10 {
        assert_eq!(text(&mut vb.ws).await, i.to_string());
    }
    vb.ws.send(Message::text("live")).await.unwrap();
    assert_eq!(text(&mut vb.ws).await, "live", "frame 10, nothing doubled");
    assert_eq!(up.connections(), 1);
}

/// xorshift64*: seeded, reproducible choices.
struct Rng(u64);
impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % below
    }
}

#[tokio::test]
async fn ten_thousand_frames_across_random_reconnects_to_three_instances() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let gws = gateways(3, &redis, &up, "replay_frames = 4096");
    let s = login(gws[0].addr, "alice").await;
    let mut rng = Rng(0x5eed_0011);
    let mut v = viewport(&gws[0], &s, None).await;
    v.ws.send(Message::text("stream:10000:5")).await.unwrap();
    let mut got: Vec<u64> = Vec::with_capacity(10_000);
    let mut reconnects = [0usize; 3];
    let mut until_drop = 1 + rng.next(800);
    while got.len() < 10_000 {
        let t = text(&mut v.ws).await;
        got.push(t.parse().unwrap_or_else(|_| panic!("not a number: {t}")));
        until_drop -= 1;
        if until_drop == 0 && got.len() < 10_000 {
            let next = got.len() as u64;
            let which = rng.next(3) as usize;
            v = viewport(&gws[which], &s, Some(next)).await;
            assert_eq!((v.seq, v.resume.as_deref()), (next, Some("ok")));
            reconnects[which] += 1;
            until_drop = 1 + rng.next(800);
        }
    }
    assert!(
        reconnects.iter().all(|n| *n >= 2),
        "reconnects per instance: {reconnects:?}"
    );
    assert_eq!(got, (0..10_000).collect::<Vec<u64>>());
    assert_eq!(up.connections(), 1);
}

#[tokio::test]
async fn the_hub_instance_is_killed_and_another_takes_over_within_five_seconds() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let gws = gateways(2, &redis, &up, "replay_frames = 5");
    let s = login(gws[1].addr, "alice").await;
    let mut va = viewport(&gws[0], &s, None).await;
    let mut vb = viewport(&gws[1], &s, None).await;
    // One frame at a time: a burst longer than the ring would lag B out.
    for i in 0..8 {
        va.ws.send(Message::text(format!("f{i}"))).await.unwrap();
        assert_eq!(text(&mut va.ws).await, format!("f{i}"));
        assert_eq!(text(&mut vb.ws).await, format!("f{i}"));
    }
    gws[0].signal("KILL");
    let killed = Instant::now();
    let (code, reason) = expect_close(&mut vb.ws, Duration::from_secs(6)).await;
    assert_eq!((code, reason.as_str()), (1012, "service_restart"));
    let b = &gws[1];
    // Within five seconds of the death a viewport on B works again, on a
    // new runtime connection, with what the stream kept replayed.
    let mut again = eventually(
        "a working viewport on B",
        Duration::from_secs(5),
        || async {
            let url = b.url("/ws/agent?resume_from=2");
            match ws::connect_bearer(&url, &s.token).await {
                Ok((ws, resp)) => {
                    let h = resp.headers();
                    Ok(View {
                        ws,
                        role: h["portcullis-role"].to_str().unwrap().to_string(),
                        seq: h["portcullis-seq"].to_str().unwrap().parse().unwrap(),
                        resume: h
                            .get("portcullis-resume")
                            .map(|v| v.to_str().unwrap().to_string()),
                    })
                }
                Err(e) => Err(ws::describe(&e)),
            }
        },
    )
    .await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(6), "took {took:?}");
    assert_eq!(again.role, "owner", "the dead owner's hold went with it");
    assert_eq!(
        (again.seq, again.resume.as_deref()),
        (3, Some("gap")),
        "frames 3-7 are kept (replay_frames = 5), 2 is gone"
    );
    for i in 3..8 {
        assert_eq!(text(&mut again.ws).await, format!("f{i}"));
    }
    let mut tail = viewport(b, &s, Some(6)).await;
    assert_eq!((tail.seq, tail.resume.as_deref()), (6, Some("ok")));
    assert_eq!(text(&mut tail.ws).await, "f6");
    assert_eq!(text(&mut tail.ws).await, "f7");
    again.ws.send(Message::text("after")).await.unwrap();
    assert_eq!(text(&mut again.ws).await, "after");
    assert_eq!(
        text(&mut tail.ws).await,
        "after",
        "numbering continues at 8"
    );
    eventually(
        "a second runtime connection",
        Duration::from_secs(5),
        || async { up.connections() == 2 },
    )
    .await;
    println!("hub instance SIGKILL to a working viewport on B: {took:?}");
}

#[tokio::test]
async fn a_revocation_on_c_closes_viewports_on_a_and_b_within_a_second() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let gws = gateways(3, &redis, &up, "");
    let s = login(gws[2].addr, "alice").await;
    let mut va = viewport(&gws[0], &s, None).await;
    let mut vb = viewport(&gws[1], &s, None).await;
    assert_eq!(vb.role, "reader");
    let r = api::logout(gws[2].addr, &s.token).await;
    assert_eq!(r.status, 204);
    let t = Instant::now();
    let (ca, cb) = tokio::join!(
        expect_close(&mut va.ws, Duration::from_secs(1)),
        expect_close(&mut vb.ws, Duration::from_secs(1)),
    );
    assert_eq!((ca.0, ca.1.as_str()), (1008, "session_revoked"));
    assert_eq!((cb.0, cb.1.as_str()), (1008, "session_revoked"));
    assert!(t.elapsed() < Duration::from_secs(1));
    assert_eq!(
        up.next_event(Duration::from_secs(2)).await,
        Event::ClosedBy(1008)
    );
}

#[tokio::test]
async fn a_stalled_remote_reader_is_closed_1013_and_the_owner_gets_everything() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let gws = gateways(
        2,
        &redis,
        &up,
        "replay_frames = 512\nmax_message_bytes = 65536\nreplay_bytes = 8388608",
    );
    let s = login(gws[0].addr, "alice").await;
    let mut owner = viewport(&gws[0], &s, None).await;
    let mut stalled = viewport(&gws[1], &s, None).await;
    owner
        .ws
        .send(Message::text("stream16k:3000:4"))
        .await
        .unwrap();
    for i in 0..3000 {
        match ws::next(&mut owner.ws).await {
            Message::Binary(b) => assert_eq!(b.len(), 16 * 1024, "frame {i}"),
            other => panic!("frame {i}: {other:?}"),
        }
    }
    let (code, reason) = expect_close(&mut stalled.ws, Duration::from_secs(20)).await;
    assert_eq!((code, reason.as_str()), (1013, "try_again_later"));
}

#[tokio::test]
async fn a_remote_owner_writes_in_order_with_backpressure_and_loses_nothing() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let gws = gateways(2, &redis, &up, "replay_frames = 4096");
    let s = login(gws[0].addr, "alice").await;
    // The hub lives on A; its first viewport leaves at once.
    let mut first = viewport(&gws[0], &s, None).await;
    let mut remote = viewport(&gws[1], &s, None).await;
    first.ws.close(None).await.unwrap();
    let _ = expect_close(&mut first.ws, Duration::from_secs(5)).await;
    // 2,000 frames from B, far more than the 16 B may have in flight: each
    // waits for the hub's acknowledgements, none is lost or reordered.
    let sent: Vec<String> = (0..2000).map(|i| format!("m{i}")).collect();
    let writer = async {
        for m in &sent {
            remote.ws.feed(Message::text(m.clone())).await.unwrap();
        }
        remote.ws.flush().await.unwrap();
    };
    let mut echoed = Vec::new();
    let (_, ()) = tokio::join!(writer, async {});
    while echoed.len() < sent.len() {
        echoed.push(text(&mut remote.ws).await);
    }
    assert_eq!(echoed, sent, "B reads the runtime's echoes in order");
    assert_eq!(
        up.received(),
        sent,
        "the runtime got every frame once, in order"
    );
    assert_eq!(up.connections(), 1);
}
