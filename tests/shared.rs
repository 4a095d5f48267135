//! SPEC §7: shared sessions. One runtime connection per session; sockets
//! are viewports; one owner writes; detach, reattach and resume lose and
//! double nothing.

mod support;

use std::time::Duration;

use futures_util::SinkExt;
use support::gateway::{Gateway, config};
use support::http::{self as api, Login, login};
use support::redis::RedisServer;
use support::upstream::{Event, Upstream};
use support::viewports::{NOT_OWNED, shared_route, text};
use support::wait::eventually;
use support::ws::{self, Ws, expect_close};
use tokio_tungstenite::tungstenite::Message;

async fn session(gw: &Gateway) -> Login {
    login(gw.addr, "alice").await
}

/// Opens a viewport; returns it with (role, seq, resume header).
async fn viewport(
    gw: &Gateway,
    s: &Login,
    resume_from: Option<u64>,
) -> (Ws, String, u64, Option<String>) {
    let url = match resume_from {
        Some(n) => gw.url(&format!("/ws/agent?resume_from={n}")),
        None => gw.url("/ws/agent"),
    };
    let (sock, resp) = ws::open(&url, &s.token).await;
    let h = resp.headers();
    let role = h["portcullis-role"].to_str().unwrap().to_string();
    let seq = h["portcullis-seq"].to_str().unwrap().parse().unwrap();
    let resume = h
        .get("portcullis-resume")
        .map(|v| v.to_str().unwrap().to_string());
    (sock, role, seq, resume)
}

async fn state(gw: &Gateway, s: &Login) -> serde_json::Value {
    let r = api::get_session(gw.addr, &s.sid, &s.token).await;
    assert_eq!(r.status, 200);
    r.json()
}

#[tokio::test]
async fn owner_and_reader_both_see_every_frame_and_reader_writes_are_refused() {
    let up = Upstream::start().await;
    let gw = Gateway::start("", &config(None, &shared_route(&up, "")));
    let s = session(&gw).await;
    let (mut owner, role, seq, resume) = viewport(&gw, &s, None).await;
    assert_eq!((role.as_str(), seq, resume), ("owner", 0, None));
    let (mut reader, role, _, _) = viewport(&gw, &s, None).await;
    assert_eq!(role, "reader");

    owner.send(Message::text("from-owner")).await.unwrap();
    assert_eq!(text(&mut owner).await, "from-owner");
    assert_eq!(text(&mut reader).await, "from-owner");

    reader.send(Message::text("from-reader")).await.unwrap();
    assert_eq!(text(&mut reader).await, NOT_OWNED);
    // A sentinel round trip from the owner orders after the reader's attempt.
    owner.send(Message::text("sentinel")).await.unwrap();
    assert_eq!(text(&mut owner).await, "sentinel");
    assert_eq!(
        text(&mut reader).await,
        "sentinel",
        "the reader is still connected"
    );
    assert_eq!(up.received(), vec!["from-owner", "sentinel"]);
    assert_eq!(up.connections(), 1, "one runtime connection per session");
    let st = state(&gw, &s).await;
    assert_eq!(
        (
            st["state"].as_str().unwrap(),
            st["connections"].as_u64().unwrap()
        ),
        ("ACTIVE", 2)
    );
}

#[tokio::test]
async fn when_the_owner_leaves_the_next_writer_becomes_owner() {
    let up = Upstream::start().await;
    let gw = Gateway::start("", &config(None, &shared_route(&up, "")));
    let s = session(&gw).await;
    let (owner, _, _, _) = viewport(&gw, &s, None).await;
    let (reader, _, _, _) = viewport(&gw, &s, None).await;
    drop(owner); // dropped TCP, no close frame
    // The next frame claims ownership and reaches the runtime. The gateway
    // notices the owner's departure asynchronously, so retry until it has.
    let reader = tokio::sync::Mutex::new(reader);
    eventually(
        "ownership released to the next writer",
        Duration::from_secs(5),
        || async {
            let mut reader = reader.lock().await;
            reader.send(Message::text("take-over")).await.unwrap();
            let t = text(&mut reader).await;
            if t == "take-over" {
                return true;
            }
            assert_eq!(t, NOT_OWNED);
            false
        },
    )
    .await;
    assert!(up.received().contains(&"take-over".to_string()));
}

#[tokio::test]
async fn two_readers_racing_to_claim_exactly_one_wins() {
    let up = Upstream::start().await;
    let gw = Gateway::start("", &config(None, &shared_route(&up, "")));
    let s = session(&gw).await;
    let (mut owner, _, _, _) = viewport(&gw, &s, None).await;
    let (mut a, _, _, _) = viewport(&gw, &s, None).await;
    let (mut b, _, _, _) = viewport(&gw, &s, None).await;
    owner.close(None).await.unwrap();
    let _ = expect_close(&mut owner, Duration::from_secs(5)).await;
    let (ra, rb) = tokio::join!(
        a.send(Message::text("claim-a")),
        b.send(Message::text("claim-b"))
    );
    ra.unwrap();
    rb.unwrap();
    // The winner sees its own echo; the loser sees the refusal and then the
    // winner's echo (in either order).
    async fn outcome(sock: &mut Ws) -> Vec<String> {
        let first = text(sock).await;
        if first == NOT_OWNED {
            vec![first, text(sock).await]
        } else {
            let mut v = vec![first];
            // If our own claim lost, the refusal follows the winner's echo.
            if let Ok(Message::Text(t)) =
                tokio::time::timeout(Duration::from_millis(500), ws::next(sock)).await
            {
                v.push(t.to_string());
            }
            v
        }
    }
    let (a_msgs, b_msgs) = tokio::join!(outcome(&mut a), outcome(&mut b));
    let received: Vec<String> = up
        .received()
        .into_iter()
        .filter(|m| m.starts_with("claim-"))
        .collect();
    assert_eq!(
        received.len(),
        1,
        "exactly one claim reaches the runtime: {received:?}"
    );
    let winner = &received[0];
    let refusals = a_msgs
        .iter()
        .chain(b_msgs.iter())
        .filter(|m| *m == NOT_OWNED)
        .count();
    assert_eq!(
        refusals, 1,
        "exactly one reader is refused: a={a_msgs:?} b={b_msgs:?}"
    );
    assert!(
        a_msgs.contains(winner) && b_msgs.contains(winner),
        "both see the winner's frame"
    );
}

#[tokio::test]
async fn reattach_within_grace_reuses_the_upstream_and_after_grace_it_closes_1001() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let gw = Gateway::start(
        "",
        &config(
            Some(&redis.url()),
            &shared_route(&up, "detach_grace_secs = 2"),
        ),
    );
    let s = session(&gw).await;
    let (mut v, _, _, _) = viewport(&gw, &s, None).await;
    v.send(Message::text("one")).await.unwrap();
    assert_eq!(text(&mut v).await, "one");
    v.close(None).await.unwrap();
    let _ = expect_close(&mut v, Duration::from_secs(5)).await;
    // DETACHED once the lease is released (asynchronously: poll briefly).
    eventually("the session DETACHED", Duration::from_secs(3), || async {
        state(&gw, &s).await["state"] == "DETACHED"
    })
    .await;
    let (mut v, role, _, _) = viewport(&gw, &s, None).await;
    assert_eq!(role, "owner");
    assert_eq!(state(&gw, &s).await["state"], "ACTIVE");
    v.send(Message::text("two")).await.unwrap();
    assert_eq!(text(&mut v).await, "two");
    assert_eq!(
        up.connections(),
        1,
        "the same runtime connection was reused"
    );
    drop(v);
    // After the grace the runtime connection is closed going-away...
    assert_eq!(
        up.next_event(Duration::from_secs(6)).await,
        Event::ClosedBy(1001)
    );
    // ...and the session is no longer DETACHED.
    eventually(
        "the session back to CREATED",
        Duration::from_secs(3),
        || async {
            let st = state(&gw, &s).await;
            if st["state"] == "CREATED" {
                Ok(())
            } else {
                Err(st)
            }
        },
    )
    .await;
    // A new viewport gets a new runtime connection; on the Redis store the
    // numbering continues where the old hub left it (SPEC §8: one
    // numbering per session and route, whichever connection serves it).
    let (_v, _, seq, _) = viewport(&gw, &s, None).await;
    assert_eq!(seq, 2, "frames 0 and 1 went to the old runtime connection");
    up.next_arrival().await;
    up.next_arrival().await;
    assert_eq!(up.connections(), 2);
}

#[tokio::test]
async fn a_frame_sent_while_nobody_watches_is_delivered_on_resume() {
    let up = Upstream::start().await;
    let gw = Gateway::start("", &config(None, &shared_route(&up, "")));
    let s = session(&gw).await;
    let (mut v, _, seq, _) = viewport(&gw, &s, None).await;
    v.send(Message::text("later:200:may I run the tool?"))
        .await
        .unwrap();
    drop(v);
    assert_eq!(
        up.next_event(Duration::from_secs(5)).await,
        Event::SentLater
    );
    let (mut v, _, seq2, resume) = viewport(&gw, &s, Some(seq)).await;
    assert_eq!((seq2, resume.as_deref()), (seq, Some("ok")));
    assert_eq!(text(&mut v).await, "may I run the tool?");
}

#[tokio::test]
async fn resume_reports_a_gap_when_the_frame_left_the_ring() {
    let up = Upstream::start().await;
    let gw = Gateway::start("", &config(None, &shared_route(&up, "replay_frames = 8")));
    let s = session(&gw).await;
    let (mut v, _, _, _) = viewport(&gw, &s, None).await;
    // A burst of 100 into a ring of 8: this viewport is not expected to keep
    // up (it may well be closed 1013); only what the ring kept matters.
    v.send(Message::text("stream:100:0")).await.unwrap();
    assert_eq!(up.next_event(Duration::from_secs(5)).await, Event::Streamed);
    drop(v);
    // The hub reads asynchronously: a live viewport's Portcullis-Seq is the
    // hub's next frame number, so it reaching 100 proves all were numbered.
    eventually(
        "the hub numbering all 100 frames",
        Duration::from_secs(5),
        || async {
            let (_probe, _, live, resume) = viewport(&gw, &s, None).await;
            assert_eq!(resume, None, "no resume asked, no resume header");
            if live == 100 { Ok(()) } else { Err(live) }
        },
    )
    .await;
    let (mut v, _, seq, resume) = viewport(&gw, &s, Some(0)).await;
    assert_eq!((seq, resume.as_deref()), (92, Some("gap")));
    for i in 92..100 {
        assert_eq!(text(&mut v).await, i.to_string());
    }
    // Resuming at the live edge is "ok" and sends nothing old.
    drop(v);
    let (_v, _, seq, resume) = viewport(&gw, &s, Some(100)).await;
    assert_eq!((seq, resume.as_deref()), (100, Some("ok")));
}

/// xorshift64*: a seeded, reproducible source of disconnect points.
struct Rng(u64);
impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % below
    }
}

/// Reads `total` frames, dropping the socket at random points and resuming
/// with `resume_from`; returns every frame received, in order.
async fn follow_with_reconnects(
    gw: &Gateway,
    s: &Login,
    mut sock: Ws,
    start: u64,
    total: u64,
    seed: u64,
) -> (Vec<u64>, usize) {
    let mut rng = Rng(seed);
    let mut got = Vec::with_capacity(total as usize);
    let mut next_expected = start;
    let mut reconnects = 0;
    let mut until_drop = 1 + rng.next(800);
    while (got.len() as u64) < total {
        let t = text(&mut sock).await;
        got.push(
            t.parse::<u64>()
                .unwrap_or_else(|_| panic!("not a number: {t}")),
        );
        next_expected += 1;
        until_drop -= 1;
        if until_drop == 0 && (got.len() as u64) < total {
            drop(sock);
            let (s2, _, seq, resume) = viewport(gw, s, Some(next_expected)).await;
            assert_eq!((seq, resume.as_deref()), (next_expected, Some("ok")));
            sock = s2;
            reconnects += 1;
            until_drop = 1 + rng.next(800);
        }
    }
    (got, reconnects)
}

#[tokio::test]
async fn no_loss_no_doubling_across_random_reconnects() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        "",
        &config(None, &shared_route(&up, "replay_frames = 4096")),
    );
    let s = session(&gw).await;
    let (mut v, _, seq, _) = viewport(&gw, &s, None).await;
    assert_eq!(seq, 0);
    // ~10,000 frames over roughly two seconds of wall time.
    v.send(Message::text("stream:10000:5")).await.unwrap();
    let (got, reconnects) = follow_with_reconnects(&gw, &s, v, 0, 10_000, 0x5eed_1234).await;
    assert!(reconnects >= 10, "only {reconnects} reconnects");
    assert_eq!(got, (0..10_000).collect::<Vec<u64>>());
}

#[tokio::test]
async fn no_loss_no_doubling_with_two_viewports_reconnecting() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        "",
        &config(None, &shared_route(&up, "replay_frames = 4096")),
    );
    let s = session(&gw).await;
    let (mut a, _, sa, _) = viewport(&gw, &s, None).await;
    let (b, _, sb, _) = viewport(&gw, &s, None).await;
    a.send(Message::text("stream:10000:5")).await.unwrap();
    let ((ga, ra), (gb, rb)) = tokio::join!(
        follow_with_reconnects(&gw, &s, a, sa, 10_000, 7),
        follow_with_reconnects(&gw, &s, b, sb, 10_000, 11),
    );
    let want: Vec<u64> = (0..10_000).collect();
    assert!(ra >= 10 && rb >= 10, "reconnects: {ra} {rb}");
    assert_eq!(ga, want);
    assert_eq!(gb, want);
}

#[tokio::test]
async fn a_stalled_reader_is_closed_1013_and_the_owner_keeps_full_speed() {
    let up = Upstream::start().await;
    // The ring holds 512 frames (8 MiB); the runtime sends 3,000 x 16 KiB
    // (47 MiB) at a steady ~4 frames/ms, far more than socket buffers hold.
    let gw = Gateway::start(
        "",
        &config(
            None,
            &shared_route(
                &up,
                "replay_frames = 512\nmax_message_bytes = 65536\nreplay_bytes = 8388608",
            ),
        ),
    );
    let s = session(&gw).await;
    let (mut owner, _, _, _) = viewport(&gw, &s, None).await;
    let (mut stalled, _, _, _) = viewport(&gw, &s, None).await;
    owner.send(Message::text("stream16k:3000:4")).await.unwrap();
    for i in 0..3000 {
        match ws::next(&mut owner).await {
            Message::Binary(b) => assert_eq!(b.len(), 16 * 1024, "frame {i}"),
            other => panic!("frame {i}: {other:?}"),
        }
    }
    // The stalled reader now reads: whatever was buffered, then 1013.
    let (code, reason) = expect_close(&mut stalled, Duration::from_secs(10)).await;
    assert_eq!((code, reason.as_str()), (1013, "try_again_later"));
}

#[tokio::test]
async fn logout_closes_all_viewports_and_the_runtime_connection() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let gw = Gateway::start("", &config(Some(&redis.url()), &shared_route(&up, "")));
    let s = session(&gw).await;
    let (mut a, _, _, _) = viewport(&gw, &s, None).await;
    let (mut b, _, _, _) = viewport(&gw, &s, None).await;
    up.next_arrival().await;
    let r = api::logout(gw.addr, &s.token).await;
    assert_eq!(r.status, 204);
    for v in [&mut a, &mut b] {
        let (code, reason) = expect_close(v, Duration::from_secs(1)).await;
        assert_eq!((code, reason.as_str()), (1008, "session_revoked"));
    }
    assert_eq!(
        up.next_event(Duration::from_secs(1)).await,
        Event::ClosedBy(1008)
    );
}

#[tokio::test]
async fn a_hub_created_after_the_runtime_closed_is_still_revoked() {
    let redis = RedisServer::start().await;
    let up = Upstream::start().await;
    let gw = Gateway::start("", &config(Some(&redis.url()), &shared_route(&up, "")));
    let s = session(&gw).await;
    let (mut v, _, _, _) = viewport(&gw, &s, None).await;
    v.send(Message::text("close:4000:restarting"))
        .await
        .unwrap();
    let (code, _) = expect_close(&mut v, Duration::from_secs(5)).await;
    assert_eq!(code, 4000);
    // Straight back in: a new hub and runtime connection, while the old
    // hub may still be tearing down.
    let (mut v2, _, seq, _) = viewport(&gw, &s, None).await;
    assert_eq!(seq, 0);
    up.next_arrival().await;
    up.next_arrival().await;
    let r = api::logout(gw.addr, &s.token).await;
    assert_eq!(r.status, 204);
    let (code, reason) = expect_close(&mut v2, Duration::from_secs(1)).await;
    assert_eq!((code, reason.as_str()), (1008, "session_revoked"));
    // The second runtime connection is closed too, within the second.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if up.next_event(left).await == Event::ClosedBy(1008) {
            break;
        }
    }
}
