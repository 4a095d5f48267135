//! One behaviour for every `SessionStore`: each case is written once, generic
//! over the store, and run against `MemoryStore` and `RedisStore` (a fresh
//! `redis-server` per test). Redis-only properties (TTLs on the keys, outages,
//! several instances) follow in `redis_only`.

mod support;

use std::time::Duration;

use portcullis::session::{LeaseRequest, RedisStore, SessionStore};
use tokio::time::timeout;

use support::redis::RedisServer;

/// Upper bound on waiting for anything that should happen promptly.
const WAIT: Duration = Duration::from_secs(5);
const PREFIX: &str = "pc-test";

fn lease<'a>(session_id: &'a str, conn_id: &'a str) -> LeaseRequest<'a> {
    LeaseRequest {
        session_id,
        conn_id,
        max_per_session: 8,
        session_ttl: Duration::from_secs(60),
    }
}

async fn connect_redis(server: &RedisServer) -> RedisStore {
    let store = RedisStore::connect(&server.url(), PREFIX)
        .await
        .expect("connect to redis");
    wait_subscribed(&store, true).await;
    store
}

async fn wait_subscribed(store: &RedisStore, want: bool) {
    let mut state = store.subscription();
    timeout(WAIT, state.wait_for(|s| *s == want))
        .await
        .unwrap_or_else(|_| panic!("subscription state {want} not reached within {WAIT:?}"))
        .expect("subscription task alive");
}

/// The cases every store must pass.
mod cases {
    use std::time::Duration;

    use portcullis::ids::{looks_like_id, random_id};
    use portcullis::session::{
        Attach, EndReason, LeaseRequest, Liveness, Release, Revocation, SessionRecord,
        SessionState, SessionStore, UserAttach, UserLease,
    };
    use portcullis::time::now_unix;
    use tokio::time::timeout;

    use crate::support::wait::eventually;

    use super::{WAIT, lease};

    const MINUTE: Duration = Duration::from_secs(60);

    async fn attached<S: SessionStore>(store: &S, req: LeaseRequest<'_>) -> SessionRecord {
        match store.attach(req).await.expect("attach") {
            Attach::Attached(record) => record,
            other => panic!("expected Attached, got {other:?}"),
        }
    }

    async fn get<S: SessionStore>(store: &S, id: &str) -> SessionRecord {
        store.get(id).await.expect("get").expect("session exists")
    }

    pub async fn create_then_get<S: SessionStore>(store: &S) {
        let before = now_unix();
        let created = store.create("alice", MINUTE).await.expect("create");
        let after = now_unix();

        assert_eq!(created.user, "alice");
        assert_eq!(created.state, SessionState::Created);
        assert_eq!(created.connections, 0);
        assert!(
            (before..=after).contains(&created.created_at),
            "{created:?}"
        );
        assert!(
            (before + 59..=after + 60).contains(&created.expires_at),
            "{created:?}"
        );
        assert_eq!(get(store, &created.id).await, created);
    }

    pub async fn ids_are_distinct_and_well_formed<S: SessionStore>(store: &S) {
        let mut ids = std::collections::HashSet::new();
        for _ in 0..20 {
            let id = store.create("alice", MINUTE).await.expect("create").id;
            assert_eq!(id.len(), 22, "{id}");
            assert!(looks_like_id(&id), "{id}");
            assert!(ids.insert(id), "duplicate id");
        }
    }

    pub async fn touch_slides_expiry<S: SessionStore>(store: &S) {
        let created = store
            .create("alice", Duration::from_secs(10))
            .await
            .expect("create");
        let touched = store
            .touch(&created.id, Duration::from_secs(100))
            .await
            .expect("touch")
            .expect("session exists");
        assert!(
            touched.expires_at >= created.expires_at + 89,
            "{created:?} -> {touched:?}"
        );
        assert_eq!(touched.created_at, created.created_at);
        assert_eq!(touched.state, SessionState::Created);
        assert_eq!(get(store, &created.id).await, touched);
    }

    pub async fn touch_unknown_is_none<S: SessionStore>(store: &S) {
        assert_eq!(
            store.touch(&random_id(), MINUTE).await.expect("touch"),
            None
        );
    }

    pub async fn delete_ends_session_and_announces_it<S: SessionStore>(store: &S) {
        let mut revocations = store.revocations();
        let first = store.create("alice", MINUTE).await.expect("create");
        let second = store.create("alice", MINUTE).await.expect("create");

        assert!(store.delete(&first.id).await.expect("delete"));
        let heard = timeout(WAIT, revocations.recv())
            .await
            .expect("revocation within the deadline")
            .expect("revocation channel open");
        assert_eq!(
            heard,
            Revocation {
                session_id: first.id.clone(),
                reason: EndReason::Revoked
            }
        );

        assert!(!store.delete(&first.id).await.expect("delete again"));
        assert_eq!(store.get(&first.id).await.expect("get"), None);

        // A failed delete announces nothing: the next announcement is the
        // next real delete.
        assert!(store.delete(&second.id).await.expect("delete"));
        let heard = timeout(WAIT, revocations.recv())
            .await
            .expect("revocation within the deadline")
            .expect("revocation channel open");
        assert_eq!(heard.session_id, second.id);
    }

    pub async fn attach_makes_session_active<S: SessionStore>(store: &S) {
        let created = store
            .create("alice", Duration::from_secs(10))
            .await
            .expect("create");
        let record = attached(
            store,
            LeaseRequest {
                session_ttl: Duration::from_secs(100),
                ..lease(&created.id, "c1")
            },
        )
        .await;
        assert_eq!(record.state, SessionState::Active);
        assert_eq!(record.connections, 1);
        assert!(
            record.expires_at >= created.expires_at + 89,
            "TTL slid: {record:?}"
        );
        assert_eq!(get(store, &created.id).await, record);
    }

    pub async fn attach_beyond_limit_is_full<S: SessionStore>(store: &S) {
        let created = store.create("alice", MINUTE).await.expect("create");
        let limited = |conn| LeaseRequest {
            max_per_session: 2,
            ..lease(&created.id, conn)
        };
        attached(store, limited("c1")).await;
        attached(store, limited("c2")).await;
        assert_eq!(
            store.attach(limited("c3")).await.expect("attach"),
            Attach::Full
        );
        assert_eq!(get(store, &created.id).await.connections, 2);

        // Releasing a lease makes room again.
        store.detach(&created.id, "c1").await.expect("detach");
        assert_eq!(attached(store, limited("c3")).await.connections, 2);
    }

    pub async fn detach_leaves_session_detached<S: SessionStore>(store: &S) {
        let created = store.create("alice", MINUTE).await.expect("create");
        attached(store, lease(&created.id, "c1")).await;
        store.detach(&created.id, "c1").await.expect("detach");
        let record = get(store, &created.id).await;
        assert_eq!(record.state, SessionState::Detached);
        assert_eq!(record.connections, 0);
    }

    pub async fn detach_many_releases_exactly_those_leases<S: SessionStore>(store: &S) {
        let a = store.create("alice", MINUTE).await.expect("create");
        let b = store.create("bob", MINUTE).await.expect("create");
        for conn in ["a1", "a2", "a3"] {
            attached(store, lease(&a.id, conn)).await;
        }
        attached(store, lease(&b.id, "b1")).await;
        let unknown = portcullis::ids::random_id();
        let batch = [
            (a.id.clone(), "a1".to_string()),
            (a.id.clone(), "a3".to_string()),
            (b.id.clone(), "b1".to_string()),
            // Already released, or never held: harmless.
            (a.id.clone(), "a1".to_string()),
            (unknown.clone(), "x".to_string()),
        ];
        store.detach_many(&batch).await.expect("detach_many");
        assert_eq!(get(store, &a.id).await.connections, 1);
        let b_now = get(store, &b.id).await;
        assert_eq!(b_now.connections, 0);
        assert_eq!(b_now.state, SessionState::Detached);
        assert!(
            store.get(&unknown).await.expect("get").is_none(),
            "nothing was created"
        );
        store
            .detach_many(&[])
            .await
            .expect("an empty batch is a no-op");
    }

    /// `server.max_connections_per_user = 0` (the default): no socket of a
    /// user is ever refused for it.
    pub async fn without_a_user_socket_limit_every_socket_fits<S: SessionStore>(store: &S) {
        let created = store.create("alice", MINUTE).await.expect("create");
        for n in 0..20 {
            let conn = format!("c{n}");
            let req = UserLease {
                user: "alice",
                conn_id: &conn,
                session_ttl: MINUTE,
            };
            assert_eq!(
                store.attach_user(req).await.expect("attach_user"),
                UserAttach::Attached
            );
        }
        // Releases naming a user are harmless without a limit too.
        let batch = [Release {
            session_id: created.id.clone(),
            conn_id: "c0".to_string(),
            user: Some("alice".to_string()),
        }];
        store.release(&batch).await.expect("release");
    }

    pub async fn a_heartbeating_instance_keeps_its_leases<S: SessionStore>(store: &S) {
        let created = store.create("alice", MINUTE).await.expect("create");
        let lease_for = Duration::from_millis(1000);
        store.heartbeat(lease_for).await.expect("heartbeat");
        attached(store, lease(&created.id, "c1")).await;
        attached(store, lease(&created.id, "c2")).await;
        // The sleeps pace the heartbeats, they do not synchronise anything:
        // each leaves 850 ms of slack, and the run outlasts the lease.
        let started = tokio::time::Instant::now();
        while started.elapsed() < Duration::from_millis(1500) {
            tokio::time::sleep(Duration::from_millis(150)).await;
            store.heartbeat(lease_for).await.expect("heartbeat");
        }
        let record = get(store, &created.id).await;
        assert_eq!(record.connections, 2, "both leases held: {record:?}");
        assert_eq!(record.state, SessionState::Active);
        // One heartbeat holds every lease of the instance: releasing one
        // leaves the other counted.
        store.detach(&created.id, "c2").await.expect("detach");
        assert_eq!(get(store, &created.id).await.connections, 1);
    }

    pub async fn mark_idle_returns_to_created<S: SessionStore>(store: &S) {
        let created = store.create("alice", MINUTE).await.expect("create");
        attached(store, lease(&created.id, "c1")).await;

        store.mark_idle(&created.id).await.expect("mark_idle");
        assert_eq!(
            get(store, &created.id).await.state,
            SessionState::Active,
            "a live lease keeps it active"
        );

        store.detach(&created.id, "c1").await.expect("detach");
        assert_eq!(get(store, &created.id).await.state, SessionState::Detached);
        store.mark_idle(&created.id).await.expect("mark_idle");
        let record = get(store, &created.id).await;
        assert_eq!(record.state, SessionState::Created);
        assert_eq!(record.connections, 0);
    }

    pub async fn attach_unknown_is_not_found<S: SessionStore>(store: &S) {
        let unknown = random_id();
        assert_eq!(
            store.attach(lease(&unknown, "c1")).await.expect("attach"),
            Attach::NotFound
        );
        assert_eq!(store.get(&unknown).await.expect("get"), None);
    }

    pub async fn calls_on_unknown_sessions_are_harmless<S: SessionStore>(store: &S) {
        let unknown = random_id();
        store.detach(&unknown, "c1").await.expect("detach unknown");
        store.mark_idle(&unknown).await.expect("mark_idle unknown");
        store.heartbeat(MINUTE).await.expect("heartbeat");
        assert_eq!(store.count_live(&[]).await.expect("count nothing"), 0);
        assert_eq!(
            store
                .count_live(std::slice::from_ref(&unknown))
                .await
                .expect("count unknown"),
            0
        );
        assert!(!store.delete(&unknown).await.expect("delete unknown"));
        assert_eq!(store.get(&unknown).await.expect("get"), None);
    }

    pub async fn session_expires_after_its_ttl<S: SessionStore>(store: &S) {
        let created = store
            .create("alice", Duration::from_secs(1))
            .await
            .expect("create");
        assert!(store.get(&created.id).await.expect("get").is_some());
        eventually("the session expires", WAIT, || async {
            store.get(&created.id).await.expect("get").is_none()
        })
        .await;
        let id = [created.id.clone()];
        assert_eq!(
            store.liveness(&id).await.expect("liveness"),
            vec![Liveness::Gone(EndReason::Expired)]
        );
        assert_eq!(
            store
                .attach(lease(&created.id, "c1"))
                .await
                .expect("attach"),
            Attach::NotFound
        );
        assert_eq!(store.touch(&created.id, MINUTE).await.expect("touch"), None);
        assert!(!store.delete(&created.id).await.expect("delete"));
    }

    pub async fn liveness_after_delete_is_revoked<S: SessionStore>(store: &S) {
        let created = store.create("alice", MINUTE).await.expect("create");
        assert!(store.delete(&created.id).await.expect("delete"));
        assert_eq!(
            store
                .liveness(std::slice::from_ref(&created.id))
                .await
                .expect("liveness"),
            vec![Liveness::Gone(EndReason::Revoked)]
        );
    }

    pub async fn liveness_of_many_in_one_call<S: SessionStore>(store: &S) {
        let alive = store.create("alice", MINUTE).await.expect("create");
        let deleted = store.create("alice", MINUTE).await.expect("create");
        let later = store
            .create("bob", Duration::from_secs(120))
            .await
            .expect("create");
        assert!(store.delete(&deleted.id).await.expect("delete"));

        let mut ids = vec![
            alive.id.clone(),
            deleted.id.clone(),
            random_id(),
            later.id.clone(),
        ];
        let mut expected = vec![
            Liveness::Alive {
                expires_at: alive.expires_at,
            },
            Liveness::Gone(EndReason::Revoked),
            Liveness::Gone(EndReason::Expired),
            Liveness::Alive {
                expires_at: later.expires_at,
            },
        ];
        // Enough ids that answering them one by one would show.
        for _ in 0..200 {
            ids.push(random_id());
            expected.push(Liveness::Gone(EndReason::Expired));
        }
        assert_eq!(store.liveness(&ids).await.expect("liveness"), expected);
        assert_eq!(store.liveness(&[]).await.expect("liveness"), vec![]);
    }

    pub async fn count_live_counts_existing_sessions<S: SessionStore>(store: &S) {
        let kept = store.create("alice", MINUTE).await.expect("create");
        let ended = store.create("alice", MINUTE).await.expect("create");
        assert!(store.delete(&ended.id).await.expect("delete"));
        let ids = [kept.id.clone(), ended.id.clone(), random_id(), kept.id];
        assert_eq!(store.count_live(&ids).await.expect("count_live"), 2);
    }
}

/// Generates `memory_store::<case>` and `redis_store::<case>` for each case.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod memory_store {
            $(
                #[tokio::test]
                async fn $case() {
                    let store = portcullis::session::MemoryStore::new();
                    crate::cases::$case(&store).await;
                }
            )*
        }

        mod redis_store {
            $(
                #[tokio::test]
                async fn $case() {
                    let server = crate::support::redis::RedisServer::start().await;
                    let store = crate::connect_redis(&server).await;
                    crate::cases::$case(&store).await;
                }
            )*
        }
    };
}

conformance!(
    create_then_get,
    ids_are_distinct_and_well_formed,
    touch_slides_expiry,
    touch_unknown_is_none,
    delete_ends_session_and_announces_it,
    attach_makes_session_active,
    attach_beyond_limit_is_full,
    detach_leaves_session_detached,
    detach_many_releases_exactly_those_leases,
    without_a_user_socket_limit_every_socket_fits,
    a_heartbeating_instance_keeps_its_leases,
    count_live_counts_existing_sessions,
    mark_idle_returns_to_created,
    attach_unknown_is_not_found,
    calls_on_unknown_sessions_are_harmless,
    session_expires_after_its_ttl,
    liveness_after_delete_is_revoked,
    liveness_of_many_in_one_call,
);

mod redis_only {
    use std::time::Duration;

    use portcullis::session::{
        Attach, EndReason, LeaseRequest, RedisStore, Revocation, SessionStore,
    };
    use portcullis::time::now_unix_ms;
    use redis::aio::MultiplexedConnection;
    use tokio::sync::broadcast::error::RecvError;
    use tokio::time::{Instant, timeout};

    use crate::support::redis::RedisServer;
    use crate::support::wait::eventually;
    use crate::{PREFIX, WAIT, connect_redis, lease, wait_subscribed};

    const MINUTE: Duration = Duration::from_secs(60);

    pub(crate) async fn pttl(conn: &mut MultiplexedConnection, key: &str) -> i64 {
        redis::cmd("PTTL")
            .arg(key)
            .query_async(conn)
            .await
            .expect("PTTL")
    }

    async fn exists(conn: &mut MultiplexedConnection, key: &str) -> bool {
        redis::cmd("EXISTS")
            .arg(key)
            .query_async(conn)
            .await
            .expect("EXISTS")
    }

    fn key(kind: &str, sid: &str) -> String {
        format!("{PREFIX}:{kind}:{{{sid}}}")
    }

    /// A call against a dead Redis must fail, and fail fast.
    async fn fails_fast<T: std::fmt::Debug, E: std::fmt::Debug>(
        what: &str,
        call: impl std::future::Future<Output = Result<T, E>>,
    ) {
        let started = Instant::now();
        let result = timeout(Duration::from_secs(3), call)
            .await
            .unwrap_or_else(|_| panic!("{what} hung with Redis down"));
        assert!(
            result.is_err(),
            "{what} succeeded with Redis down: {result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[tokio::test]
    async fn keys_use_the_hash_tag_and_always_carry_a_ttl() {
        let server = RedisServer::start().await;
        let store = connect_redis(&server).await;
        let mut raw = server.client().await;

        let created = store.create("alice", MINUTE).await.expect("create");
        let session = key("session", &created.id);
        let conns = key("conns", &created.id);
        assert!(session.contains(&format!("{{{}}}", created.id)));
        let ttl = pttl(&mut raw, &session).await;
        assert!(ttl > 0 && ttl <= 60_000, "session PTTL {ttl}");
        let stored: (String, i64, i64) = redis::cmd("HMGET")
            .arg(&session)
            .arg(&["user", "created_at", "expires_at"])
            .query_async(&mut raw)
            .await
            .expect("HMGET");
        assert_eq!(stored.0, "alice");
        assert_eq!(stored.1 / 1000, created.created_at, "created_at in ms");
        assert_eq!(stored.2 - stored.1, 60_000, "expires_at in ms");

        store
            .attach(lease(&created.id, "c1"))
            .await
            .expect("attach");
        let ttl = pttl(&mut raw, &session).await;
        assert!(ttl > 0 && ttl <= 60_000, "session PTTL after attach {ttl}");
        let ttl = pttl(&mut raw, &conns).await;
        assert!(
            ttl > 0 && ttl <= 60_000,
            "lease set PTTL after attach {ttl}"
        );
        // The entry names its instance (whose heartbeat holds it) and is
        // scored with its attach time.
        let attached_at: i64 = redis::cmd("ZSCORE")
            .arg(&conns)
            .arg(format!("{}:c1", store.instance_id()))
            .query_async(&mut raw)
            .await
            .expect("ZSCORE");
        let now = now_unix_ms();
        assert!(
            (now - 5_000..=now).contains(&attached_at),
            "entry scored {attached_at}, now {now}"
        );

        // Touch slides both keys, so leases never outlive or undercut the
        // session.
        store
            .touch(&created.id, Duration::from_secs(120))
            .await
            .expect("touch");
        assert!(pttl(&mut raw, &session).await > 60_000);
        assert!(pttl(&mut raw, &conns).await > 60_000);

        store.delete(&created.id).await.expect("delete");
        assert!(!exists(&mut raw, &session).await);
        assert!(!exists(&mut raw, &conns).await);
        let ttl = pttl(&mut raw, &key("revoked", &created.id)).await;
        assert!(ttl > 0 && ttl <= 600_000, "tombstone PTTL {ttl}");
    }

    #[tokio::test]
    async fn no_key_is_ever_left_without_expiry() {
        let server = RedisServer::start().await;
        let store = connect_redis(&server).await;
        let mut raw = server.client().await;

        for n in 0..5 {
            let s = store.create("alice", MINUTE).await.expect("create");
            store.attach(lease(&s.id, "c1")).await.expect("attach");
            store.attach(lease(&s.id, "c2")).await.expect("attach");
            store.heartbeat(MINUTE).await.expect("heartbeat");
            store.detach(&s.id, "c2").await.expect("detach");
            store.touch(&s.id, MINUTE).await.expect("touch");
            store.mark_idle(&s.id).await.expect("mark_idle");
            if n % 2 == 0 {
                store.delete(&s.id).await.expect("delete");
            }
        }
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{PREFIX}:*"))
            .query_async(&mut raw)
            .await
            .expect("KEYS");
        assert!(!keys.is_empty());
        for k in keys {
            let ttl = pttl(&mut raw, &k).await;
            assert!(ttl > 0, "{k} has PTTL {ttl}");
        }
    }

    #[tokio::test]
    async fn leases_count_across_instances() {
        let server = RedisServer::start().await;
        let a = connect_redis(&server).await;
        let b = connect_redis(&server).await;
        let created = a.create("alice", MINUTE).await.expect("create");
        let limited = |conn| LeaseRequest {
            max_per_session: 2,
            ..lease(&created.id, conn)
        };
        assert!(matches!(
            a.attach(limited("a1")).await,
            Ok(Attach::Attached(_))
        ));
        assert!(matches!(
            b.attach(limited("b1")).await,
            Ok(Attach::Attached(_))
        ));
        assert_eq!(a.attach(limited("a2")).await.expect("attach"), Attach::Full);
        let seen = b.get(&created.id).await.expect("get").expect("exists");
        assert_eq!(seen.connections, 2);
    }

    #[tokio::test]
    async fn an_instance_whose_heartbeat_lapses_stops_counting() {
        let server = RedisServer::start().await;
        let a = connect_redis(&server).await;
        let b = connect_redis(&server).await;
        let short = Duration::from_millis(300);
        a.heartbeat(short).await.expect("heartbeat a");
        b.heartbeat(short).await.expect("heartbeat b");
        let created = a.create("alice", MINUTE).await.expect("create");
        let one = |conn| LeaseRequest {
            max_per_session: 1,
            ..lease(&created.id, conn)
        };
        assert!(matches!(b.attach(one("b1")).await, Ok(Attach::Attached(_))));
        assert_eq!(a.attach(one("a1")).await.expect("attach"), Attach::Full);
        // B dies (stops its heartbeat); A keeps beating and stops counting
        // B's socket once B's heartbeat and the freshness window lapse.
        eventually("B's socket stops counting", WAIT, || async {
            a.heartbeat(short).await.expect("heartbeat a");
            a.get(&created.id)
                .await
                .expect("get")
                .expect("exists")
                .connections
                == 0
        })
        .await;
        // The next writer cleans the dead entry: A's socket fits the limit.
        let record = match a.attach(one("a1")).await.expect("attach") {
            Attach::Attached(r) => r,
            other => panic!("expected Attached, got {other:?}"),
        };
        assert_eq!(record.connections, 1);
        let mut raw = server.client().await;
        let entries: Vec<String> = redis::cmd("ZRANGE")
            .arg(key("conns", &created.id))
            .arg(0)
            .arg(-1)
            .query_async(&mut raw)
            .await
            .expect("ZRANGE");
        assert_eq!(entries, vec![format!("{}:a1", a.instance_id())]);
    }

    #[tokio::test]
    async fn a_new_instance_counts_before_others_have_seen_its_heartbeat() {
        let server = RedisServer::start().await;
        let a = connect_redis(&server).await;
        a.heartbeat(MINUTE).await.expect("heartbeat a");
        // B starts after A's last look at the instance set.
        let b = connect_redis(&server).await;
        b.heartbeat(MINUTE).await.expect("heartbeat b");
        let created = a.create("alice", MINUTE).await.expect("create");
        let one = |conn| LeaseRequest {
            max_per_session: 1,
            ..lease(&created.id, conn)
        };
        assert!(matches!(b.attach(one("b1")).await, Ok(Attach::Attached(_))));
        assert_eq!(
            a.get(&created.id)
                .await
                .expect("get")
                .expect("exists")
                .connections,
            1
        );
        assert_eq!(
            a.attach(one("a1")).await.expect("attach"),
            Attach::Full,
            "B's fresh entry is not cleaned as dead"
        );
    }

    #[tokio::test]
    async fn fails_fast_while_redis_is_down_and_recovers_without_a_new_store() {
        let mut server = RedisServer::start().await;
        let store = connect_redis(&server).await;
        let created = store.create("alice", MINUTE).await.expect("create");

        server.stop().await;
        fails_fast("get", store.get(&created.id)).await;
        fails_fast("create", store.create("alice", MINUTE)).await;
        fails_fast("touch", store.touch(&created.id, MINUTE)).await;
        fails_fast("attach", store.attach(lease(&created.id, "c1"))).await;
        fails_fast(
            "liveness",
            store.liveness(std::slice::from_ref(&created.id)),
        )
        .await;
        fails_fast("delete", store.delete(&created.id)).await;
        fails_fast("ping", store.ping()).await;

        server.start_again().await;
        // The first call after the restart already works: the dead
        // connection is replaced and the call retried.
        let again = timeout(WAIT, store.create("alice", MINUTE))
            .await
            .expect("bounded")
            .expect("create works again after Redis restarted");
        let got = store.get(&again.id).await.expect("get").expect("exists");
        assert_eq!(got, again);
        store.ping().await.expect("ping");
        // Nothing was persisted across the restart.
        assert_eq!(store.get(&created.id).await.expect("get"), None);
    }

    #[tokio::test]
    async fn recovers_after_an_idle_restart() {
        let mut server = RedisServer::start().await;
        let store = connect_redis(&server).await;
        store.ping().await.expect("ping");
        // No call while Redis is away: the first call after it is back finds
        // a dead connection.
        server.stop().await;
        server.start_again().await;
        let created = timeout(WAIT, store.create("alice", MINUTE))
            .await
            .expect("bounded")
            .expect("create after an idle restart");
        assert!(store.get(&created.id).await.expect("get").is_some());
    }

    #[tokio::test]
    async fn a_hung_redis_gives_errors_not_hangs() {
        let server = RedisServer::start().await;
        let store = connect_redis(&server).await;
        let created = store.create("alice", MINUTE).await.expect("create");

        server.pause();
        fails_fast("get", store.get(&created.id)).await;
        fails_fast("ping", store.ping()).await;
        fails_fast("create", store.create("alice", MINUTE)).await;

        server.resume();
        // The timed-out connection is replaced by a fresh one; a late reply
        // on the old one must not be mistaken for an answer.
        let got = timeout(WAIT, store.get(&created.id))
            .await
            .expect("bounded")
            .expect("get after Redis resumed");
        assert_eq!(got, Some(created));
    }

    #[tokio::test]
    async fn a_hung_redis_is_noticed_by_the_subscription() {
        let server = RedisServer::start().await;
        let a = connect_redis(&server).await;
        let b = connect_redis(&server).await;
        let mut heard_by_a = a.revocations();

        // A frozen server closes nothing; only the heartbeat can notice.
        server.pause();
        let mut state = a.subscription();
        timeout(Duration::from_secs(10), state.wait_for(|s| !*s))
            .await
            .expect("the heartbeat notices a hung Redis")
            .expect("subscription task alive");

        server.resume();
        wait_subscribed(&a, true).await;
        let created = timeout(WAIT, b.create("alice", MINUTE))
            .await
            .expect("bounded")
            .expect("create after Redis resumed");
        assert!(b.delete(&created.id).await.expect("delete"));
        let heard = timeout(WAIT, heard_by_a.recv())
            .await
            .expect("revocation after resubscribing")
            .expect("channel open");
        assert_eq!(heard.session_id, created.id);
    }

    #[tokio::test]
    async fn starts_while_redis_is_down() {
        let mut server = RedisServer::start().await;
        server.stop().await;

        let started = Instant::now();
        let store = timeout(
            Duration::from_secs(3),
            RedisStore::connect(&server.url(), PREFIX),
        )
        .await
        .expect("connect is bounded")
        .expect("connect succeeds without Redis");
        assert!(started.elapsed() < Duration::from_secs(3));
        fails_fast("ping", store.ping()).await;
        assert!(!*store.subscription().borrow());

        server.start_again().await;
        store.ping().await.expect("ping once Redis is up");
        let created = store.create("alice", MINUTE).await.expect("create");
        assert!(store.get(&created.id).await.expect("get").is_some());
        wait_subscribed(&store, true).await;
    }

    #[tokio::test]
    async fn revocations_reach_other_instances() {
        let server = RedisServer::start().await;
        let a = connect_redis(&server).await;
        let b = connect_redis(&server).await;
        let mut heard_by_a = a.revocations();

        let created = b.create("alice", MINUTE).await.expect("create");
        assert!(b.delete(&created.id).await.expect("delete"));
        let heard = timeout(WAIT, heard_by_a.recv())
            .await
            .expect("revocation within the deadline")
            .expect("channel open");
        assert_eq!(
            heard,
            Revocation {
                session_id: created.id,
                reason: EndReason::Revoked
            }
        );
    }

    #[tokio::test]
    async fn revocations_resume_after_a_redis_restart() {
        let mut server = RedisServer::start().await;
        let a = connect_redis(&server).await;
        let b = connect_redis(&server).await;
        let mut heard_by_a = a.revocations();

        server.stop().await;
        wait_subscribed(&a, false).await;
        server.start_again().await;
        wait_subscribed(&a, true).await;

        let created = timeout(WAIT, b.create("alice", MINUTE))
            .await
            .expect("bounded")
            .expect("create after restart");
        assert!(b.delete(&created.id).await.expect("delete"));
        let heard = timeout(WAIT, heard_by_a.recv())
            .await
            .expect("revocation after resubscribing")
            .expect("channel open");
        assert_eq!(heard.session_id, created.id);
    }

    #[tokio::test]
    async fn subscription_ends_with_the_store() {
        let server = RedisServer::start().await;
        let store = connect_redis(&server).await;
        let mut raw = server.client().await;
        let mut revocations = store.revocations();
        let channel = format!("{PREFIX}:revocations");
        let subscribers = |raw: &mut MultiplexedConnection| {
            let mut raw = raw.clone();
            let channel = channel.clone();
            async move {
                let (_, n): (String, i64) = redis::cmd("PUBSUB")
                    .arg("NUMSUB")
                    .arg(&channel)
                    .query_async(&mut raw)
                    .await
                    .expect("PUBSUB NUMSUB");
                n
            }
        };
        assert_eq!(subscribers(&mut raw).await, 1);

        drop(store);
        let end = timeout(WAIT, revocations.recv())
            .await
            .expect("receiver sees the end");
        assert_eq!(end, Err(RecvError::Closed));
        eventually("the subscriber connection closes", WAIT, || {
            let count = subscribers(&mut raw);
            async move { count.await == 0 }
        })
        .await;
    }
}

/// `auth.max_sessions_per_user` as both stores apply it (limit 3, no slack,
/// so an expired session stops counting at once in either store), and
/// `server.max_connections_per_user` (limit 2).
mod user_limit_cases {
    use std::time::Duration;

    use portcullis::session::{
        Attach, CreateError, Release, SessionStore, UserAttach, UserLease, UserLimit,
    };

    use crate::support::wait::eventually;

    pub const LIMIT: UserLimit = UserLimit {
        max_sessions: 3,
        max_connections: 2,
        slack: Duration::ZERO,
    };
    const MINUTE: Duration = Duration::from_secs(60);

    #[track_caller]
    fn assert_too_many<T: std::fmt::Debug>(outcome: Result<T, CreateError>) {
        match outcome {
            Err(CreateError::TooManySessions { max: 3 }) => {}
            other => panic!("expected TooManySessions {{ max: 3 }}, got {other:?}"),
        }
    }

    pub async fn the_limit_refuses_one_more_session_of_that_user<S: SessionStore>(store: &S) {
        for _ in 0..3 {
            store
                .create("alice", MINUTE)
                .await
                .expect("within the limit");
        }
        assert_too_many(store.create("alice", MINUTE).await);
        assert_too_many(store.create("alice", MINUTE).await);
        // Another user has slots of their own.
        store.create("bob", MINUTE).await.expect("bob's first");
    }

    pub async fn ending_a_session_frees_its_slot<S: SessionStore>(store: &S) {
        let first = store.create("alice", MINUTE).await.expect("create");
        for _ in 0..2 {
            store.create("alice", MINUTE).await.expect("create");
        }
        assert_too_many(store.create("alice", MINUTE).await);
        assert!(store.delete(&first.id).await.expect("delete"));
        let again = store.create("alice", MINUTE).await.expect("the freed slot");
        assert_too_many(store.create("alice", MINUTE).await);
        // Deleting twice frees nothing twice.
        assert!(!store.delete(&first.id).await.expect("delete again"));
        assert_too_many(store.create("alice", MINUTE).await);
        assert!(store.get(&again.id).await.expect("get").is_some());
    }

    /// What the gate does for a socket: the session's lease, then the
    /// user's slot.
    async fn open<S: SessionStore>(store: &S, sid: &str, user: &str, conn: &str) -> UserAttach {
        let lease = crate::lease(sid, conn);
        assert!(matches!(
            store.attach(lease).await.expect("attach"),
            Attach::Attached(_)
        ));
        let slot = UserLease {
            user,
            conn_id: conn,
            session_ttl: MINUTE,
        };
        store.attach_user(slot).await.expect("attach_user")
    }

    fn closed(sid: &str, conn: &str, user: Option<&str>) -> Release {
        Release {
            session_id: sid.to_string(),
            conn_id: conn.to_string(),
            user: user.map(str::to_string),
        }
    }

    pub async fn the_socket_limit_counts_every_session_of_the_user<S: SessionStore>(store: &S) {
        let one = store.create("alice", MINUTE).await.expect("create").id;
        let two = store.create("alice", MINUTE).await.expect("create").id;
        assert_eq!(open(store, &one, "alice", "c1").await, UserAttach::Attached);
        assert_eq!(open(store, &two, "alice", "c2").await, UserAttach::Attached);
        // A third socket, on either session: full.
        assert_eq!(open(store, &one, "alice", "c3").await, UserAttach::Full);
        assert_eq!(open(store, &two, "alice", "c4").await, UserAttach::Full);
        // A retry of a socket that holds a slot is not counted twice.
        assert_eq!(open(store, &two, "alice", "c2").await, UserAttach::Attached);
        // Another user has slots of their own.
        let bobs = store.create("bob", MINUTE).await.expect("create").id;
        assert_eq!(open(store, &bobs, "bob", "b1").await, UserAttach::Attached);

        // Releasing only session leases (the refused sockets') frees no
        // user slot; a socket's release that names its user does, in the
        // same batch as its session lease.
        let batch = [
            closed(&one, "c3", None),
            closed(&two, "c4", None),
            closed(&one, "c1", Some("alice")),
        ];
        store.release(&batch).await.expect("release");
        assert_eq!(
            store
                .get(&one)
                .await
                .expect("get")
                .expect("alive")
                .connections,
            0,
            "the session leases went with the batch"
        );
        assert_eq!(open(store, &one, "alice", "c5").await, UserAttach::Attached);
        assert_eq!(open(store, &one, "alice", "c6").await, UserAttach::Full);
        // Released twice, or never held: frees nothing more.
        let again = [
            closed(&one, "c1", Some("alice")),
            closed(&one, "c6", Some("alice")),
        ];
        store.release(&again).await.expect("release");
        assert_eq!(open(store, &one, "alice", "c7").await, UserAttach::Full);
    }

    pub async fn an_expired_session_frees_its_slot<S: SessionStore>(store: &S) {
        for _ in 0..3 {
            store
                .create("alice", Duration::from_secs(1))
                .await
                .expect("create");
        }
        assert_too_many(store.create("alice", MINUTE).await);
        eventually("a slot freed by expiry", Duration::from_secs(5), || async {
            store.create("alice", MINUTE).await
        })
        .await;
    }
}

macro_rules! user_limit {
    ($($case:ident),* $(,)?) => {
        mod memory_store_limited {
            $(
                #[tokio::test]
                async fn $case() {
                    let store = portcullis::session::MemoryStore::new()
                        .with_user_limit(crate::user_limit_cases::LIMIT);
                    crate::user_limit_cases::$case(&store).await;
                }
            )*
        }

        mod redis_store_limited {
            $(
                #[tokio::test]
                async fn $case() {
                    let server = crate::support::redis::RedisServer::start().await;
                    let store = crate::connect_redis(&server)
                        .await
                        .with_user_limit(crate::user_limit_cases::LIMIT);
                    crate::user_limit_cases::$case(&store).await;
                }
            )*
        }
    };
}

user_limit!(
    the_limit_refuses_one_more_session_of_that_user,
    the_socket_limit_counts_every_session_of_the_user,
    ending_a_session_frees_its_slot,
    an_expired_session_frees_its_slot,
);

/// The Redis store's user index across instances, and creates that time
/// out while Redis is frozen.
mod redis_user_index {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use portcullis::session::{CreateError, RedisStore, SessionStore, UserLimit};
    use redis::aio::MultiplexedConnection;
    use tokio::time::timeout;

    use crate::support::redis::RedisServer;
    use crate::support::wait::eventually;
    use crate::{PREFIX, WAIT, connect_redis};

    const MINUTE: Duration = Duration::from_secs(60);
    const LIMIT: UserLimit = UserLimit {
        max_sessions: 3,
        max_connections: 0,
        slack: Duration::from_secs(900),
    };

    async fn keys(conn: &mut MultiplexedConnection, kind: &str) -> BTreeSet<String> {
        let pattern = format!("{PREFIX}:{kind}:*");
        let found: Vec<String> = redis::cmd("KEYS")
            .arg(&pattern)
            .query_async(conn)
            .await
            .expect("KEYS");
        found
            .into_iter()
            .map(|k| {
                let tagged = k.strip_prefix(&format!("{PREFIX}:{kind}:")).unwrap();
                tagged.trim_matches(|c| c == '{' || c == '}').to_string()
            })
            .collect()
    }

    async fn index(conn: &mut MultiplexedConnection, user: &str) -> BTreeSet<String> {
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(format!("{PREFIX}:user:{{{user}}}"))
            .arg(0)
            .arg(-1)
            .query_async(conn)
            .await
            .expect("ZRANGE");
        members.into_iter().collect()
    }

    #[tokio::test]
    async fn the_limit_counts_sessions_of_every_instance() {
        let server = RedisServer::start().await;
        let a = connect_redis(&server).await.with_user_limit(LIMIT);
        let b = connect_redis(&server).await.with_user_limit(LIMIT);
        let mut raw = server.client().await;

        let on_a = a.create("alice", MINUTE).await.expect("create on a");
        b.create("alice", MINUTE).await.expect("create on b");
        a.create("alice", MINUTE).await.expect("create on a");
        for store in [&a, &b] {
            assert!(matches!(
                store.create("alice", MINUTE).await,
                Err(CreateError::TooManySessions { max: 3 })
            ));
        }
        // Ended on b, freed for a.
        assert!(b.delete(&on_a.id).await.expect("delete on b"));
        assert!(!index(&mut raw, "alice").await.contains(&on_a.id));
        a.create("alice", MINUTE).await.expect("the freed slot");

        // The index carries a TTL covering its members: the session's plus
        // the token lifetime (the slack).
        let pttl: i64 = redis::cmd("PTTL")
            .arg(format!("{PREFIX}:user:{{alice}}"))
            .query_async(&mut raw)
            .await
            .expect("PTTL");
        assert!((60_000..=960_000).contains(&pttl), "index PTTL {pttl}");
    }

    #[tokio::test]
    async fn a_refresh_keeps_a_session_counted_as_long_as_it_lives() {
        let server = RedisServer::start().await;
        let store = connect_redis(&server).await.with_user_limit(LIMIT);
        let mut raw = server.client().await;
        let s = store.create("alice", MINUTE).await.expect("create");
        let touched = store
            .touch(&s.id, Duration::from_secs(3600))
            .await
            .expect("touch")
            .expect("alive");
        let score: f64 = redis::cmd("ZSCORE")
            .arg(format!("{PREFIX}:user:{{alice}}"))
            .arg(&s.id)
            .query_async(&mut raw)
            .await
            .expect("ZSCORE");
        let counted_until_s = (score / 1000.0) as i64;
        assert!(
            counted_until_s >= touched.expires_at + 899,
            "counted until {counted_until_s}, session expires {}",
            touched.expires_at
        );
    }

    /// Three creates for `user`, each of which must fail (bounded) while
    /// Redis is frozen; answers how many were tried.
    async fn fail_while_frozen(store: &RedisStore, user: &str) -> usize {
        for _ in 0..3 {
            let r = timeout(Duration::from_secs(3), store.create(user, MINUTE)).await;
            assert!(matches!(r, Ok(Err(CreateError::Store(_)))), "{r:?}");
        }
        3
    }

    /// Creates sent while Redis is frozen fail on our side but reach Redis
    /// (the command is already in its socket buffer): once it is back, none
    /// of them may have left a session, or a reservation in the user index.
    #[tokio::test]
    async fn creates_that_failed_while_redis_was_frozen_leave_nothing_behind() {
        let server = RedisServer::start().await;
        let unlimited = connect_redis(&server).await;
        let limited = connect_redis(&server).await.with_user_limit(LIMIT);
        let mut raw = server.client().await;
        let kept = unlimited.create("bob", MINUTE).await.expect("create");
        let kept_limited = limited.create("alice", MINUTE).await.expect("create");

        server.pause();
        let (u, l) = tokio::join!(
            fail_while_frozen(&unlimited, "bob"),
            fail_while_frozen(&limited, "alice")
        );
        server.resume();

        // Each failed create is marked abandoned by the repair queue; once
        // every marker is written no late create can make a session.
        let failed = u + l;
        eventually("every failed create marked abandoned", WAIT * 3, || {
            let mut raw = raw.clone();
            async move {
                let marked = keys(&mut raw, "abandoned").await.len();
                if marked == failed {
                    Ok(())
                } else {
                    Err(marked)
                }
            }
        })
        .await;
        let sessions = keys(&mut raw, "session").await;
        let expected: BTreeSet<String> = [kept.id.clone(), kept_limited.id.clone()].into();
        assert_eq!(sessions, expected);
        assert_eq!(
            index(&mut raw, "alice").await,
            [kept_limited.id.clone()].into()
        );
        // No phantom reservation holds alice's slots: two more fit.
        limited.create("alice", MINUTE).await.expect("slot 2");
        limited.create("alice", MINUTE).await.expect("slot 3");
        assert!(matches!(
            limited.create("alice", MINUTE).await,
            Err(CreateError::TooManySessions { .. })
        ));
        assert!(unlimited.get(&kept.id).await.expect("get").is_some());
        // The markers and the abandoned set expire like every other key.
        for k in [
            format!("{PREFIX}:user-abandoned:{{alice}}"),
            format!(
                "{PREFIX}:abandoned:{{{}}}",
                keys(&mut raw, "abandoned").await.first().unwrap()
            ),
        ] {
            let pttl: i64 = redis::cmd("PTTL")
                .arg(&k)
                .query_async(&mut raw)
                .await
                .expect("PTTL");
            assert!(pttl > 0, "{k} PTTL {pttl}");
        }
    }
}

/// The Redis store's per-user socket count across instances
/// (`server.max_connections_per_user`).
mod redis_user_sockets {
    use std::time::Duration;

    use portcullis::session::{
        RedisStore, Release, SessionStore, UserAttach, UserLease, UserLimit,
    };
    use redis::aio::MultiplexedConnection;

    use crate::redis_only::pttl;
    use crate::support::redis::RedisServer;
    use crate::support::wait::eventually;
    use crate::{PREFIX, WAIT, connect_redis};

    const MINUTE: Duration = Duration::from_secs(60);

    fn limit(max_connections: u32) -> UserLimit {
        UserLimit {
            max_connections,
            ..UserLimit::NONE
        }
    }

    fn user_key(user: &str) -> String {
        format!("{PREFIX}:user-conns:{{{user}}}")
    }

    async fn slot(store: &RedisStore, user: &str, conn: &str) -> UserAttach {
        let req = UserLease {
            user,
            conn_id: conn,
            session_ttl: MINUTE,
        };
        store.attach_user(req).await.expect("attach_user")
    }

    async fn entries(raw: &mut MultiplexedConnection, user: &str) -> Vec<String> {
        redis::cmd("ZRANGE")
            .arg(user_key(user))
            .arg(0)
            .arg(-1)
            .query_async(raw)
            .await
            .expect("ZRANGE")
    }

    /// Many sockets of one user on two instances ask for the last slot at
    /// once: exactly one gets it.
    #[tokio::test]
    async fn instances_racing_for_the_last_slot_cannot_both_win() {
        let server = RedisServer::start().await;
        let a = connect_redis(&server).await.with_user_limit(limit(3));
        let b = connect_redis(&server).await.with_user_limit(limit(3));
        let mut raw = server.client().await;
        assert_eq!(slot(&a, "alice", "a0").await, UserAttach::Attached);
        assert_eq!(slot(&b, "alice", "b0").await, UserAttach::Attached);
        let racers = (0..10).map(|n| {
            let store = if n % 2 == 0 { &a } else { &b };
            let conn = format!("r{n}");
            async move { slot(store, "alice", &conn).await }
        });
        let outcomes = futures_util::future::join_all(racers).await;
        let won = outcomes
            .iter()
            .filter(|o| **o == UserAttach::Attached)
            .count();
        assert_eq!(won, 1, "{outcomes:?}");
        assert_eq!(entries(&mut raw, "alice").await.len(), 3);
        // Each entry names the instance whose heartbeat holds it.
        for e in entries(&mut raw, "alice").await {
            assert!(
                e.starts_with(&format!("{}:", a.instance_id()))
                    || e.starts_with(&format!("{}:", b.instance_id())),
                "{e}"
            );
        }
    }

    /// B dies (its heartbeat stops): its sockets stop counting for the
    /// user once its heartbeat lapses, and the next slot taken at the
    /// limit removes its dead entries.
    #[tokio::test]
    async fn a_dead_instances_sockets_stop_counting_for_the_user() {
        let server = RedisServer::start().await;
        let a = connect_redis(&server).await.with_user_limit(limit(2));
        let b = connect_redis(&server).await.with_user_limit(limit(2));
        let mut raw = server.client().await;
        let short = Duration::from_millis(300);
        a.heartbeat(short).await.expect("heartbeat a");
        b.heartbeat(short).await.expect("heartbeat b");
        assert_eq!(slot(&b, "alice", "b1").await, UserAttach::Attached);
        assert_eq!(slot(&b, "alice", "b2").await, UserAttach::Attached);
        assert_eq!(slot(&a, "alice", "a1").await, UserAttach::Full);
        // Only A beats from now on.
        eventually("B's sockets stop counting", WAIT, || async {
            a.heartbeat(short).await.expect("heartbeat a");
            slot(&a, "alice", "a1").await == UserAttach::Attached
        })
        .await;
        assert_eq!(
            entries(&mut raw, "alice").await,
            vec![format!("{}:a1", a.instance_id())],
            "the dead entries were removed"
        );
        assert_eq!(slot(&a, "alice", "a2").await, UserAttach::Attached);
        assert_eq!(slot(&a, "alice", "a3").await, UserAttach::Full);
    }

    /// A new instance's sockets count before the others have seen its
    /// heartbeat: they are not taken for a dead instance's.
    #[tokio::test]
    async fn a_new_instances_sockets_count_before_others_see_it() {
        let server = RedisServer::start().await;
        let a = connect_redis(&server).await.with_user_limit(limit(1));
        a.heartbeat(MINUTE).await.expect("heartbeat a");
        let b = connect_redis(&server).await.with_user_limit(limit(1));
        b.heartbeat(MINUTE).await.expect("heartbeat b");
        assert_eq!(slot(&b, "alice", "b1").await, UserAttach::Attached);
        assert_eq!(slot(&a, "alice", "a1").await, UserAttach::Full);
    }

    /// The key is in the user's hash tag and always has a TTL, at least
    /// the session's; a refresh of a session prolongs it; a release
    /// removes the entry. Without the limit nothing is written.
    #[tokio::test]
    async fn the_user_key_is_hash_tagged_and_lives_as_long_as_the_sessions() {
        let server = RedisServer::start().await;
        let limited = connect_redis(&server).await.with_user_limit(limit(2));
        let unlimited = connect_redis(&server).await;
        let mut raw = server.client().await;

        let s = limited.create("alice", MINUTE).await.expect("create");
        assert_eq!(slot(&limited, "alice", "c1").await, UserAttach::Attached);
        assert!(user_key("alice").contains("{alice}"));
        let ttl = pttl(&mut raw, &user_key("alice")).await;
        assert!((50_000..=60_000).contains(&ttl), "PTTL {ttl}");
        limited
            .touch(&s.id, Duration::from_secs(3600))
            .await
            .expect("touch")
            .expect("alive");
        let ttl = pttl(&mut raw, &user_key("alice")).await;
        assert!(ttl > 3_500_000, "PTTL after a refresh {ttl}");
        // A later, shorter attach does not shorten it.
        assert_eq!(slot(&limited, "alice", "c2").await, UserAttach::Attached);
        assert!(pttl(&mut raw, &user_key("alice")).await > 3_500_000);

        let batch = [Release {
            session_id: s.id.clone(),
            conn_id: "c1".to_string(),
            user: Some("alice".to_string()),
        }];
        limited.release(&batch).await.expect("release");
        assert_eq!(
            entries(&mut raw, "alice").await,
            vec![format!("{}:c2", limited.instance_id())]
        );

        // No limit: no key, whatever is asked.
        let b = unlimited.create("bob", MINUTE).await.expect("create");
        assert_eq!(slot(&unlimited, "bob", "c1").await, UserAttach::Attached);
        unlimited
            .touch(&b.id, MINUTE)
            .await
            .expect("touch")
            .expect("alive");
        let exists: bool = redis::cmd("EXISTS")
            .arg(user_key("bob"))
            .query_async(&mut raw)
            .await
            .expect("EXISTS");
        assert!(!exists, "a store without the limit wrote the user's count");
    }
}
