//! SPEC §12 TLS, end to end with the real binary and real rustls on both
//! ends: a CA made in the test (`rcgen`), HTTPS login and a `wss://`
//! client through the whole gate, the serving certificate swapped by
//! `SIGHUP` under an open socket (and a bad one refused), and `wss://`
//! runtimes verified against a route's `ca_file`, with SNI from the URL and
//! `502` for a certificate the route does not trust.

mod support;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use support::gateway::{Gateway, TempDir, config, echo_route, route};
use support::http::{login, sample};
use support::tls::{self as tls, Leaf, TestCa, TlsRuntime};
use support::upstream::Upstream;
use support::wait::eventually;
use support::ws;
use tokio_tungstenite::tungstenite::Error;

const TEST_BUDGET: Duration = Duration::from_secs(90);

async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_BUDGET, test)
        .await
        .expect("test exceeded its time budget")
}

/// Writes `text` to `path` whole (temporary file, then rename), as a
/// deployment tool would, so a reload never reads half a file.
fn put(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// `[server.tls]` naming `cert.pem` and `key.pem` in `dir`, holding `leaf`.
fn serve_tls(dir: &TempDir, leaf: &Leaf) -> String {
    let (cert, key) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
    put(&cert, &leaf.cert_pem);
    put(&key, &leaf.key_pem);
    format!(
        "[server.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert.display(),
        key.display()
    )
}

fn write_ca(dir: &TempDir, name: &str, ca: &TestCa) -> PathBuf {
    let path = dir.0.join(name);
    put(&path, &ca.pem());
    path
}

/// Waits until the gateway (over HTTPS) counts `n` reloads with `result`.
async fn reloads(gw: &Gateway, client: &Arc<ClientConfig>, result: &str, n: f64) {
    let series = format!("portcullis_config_reloads_total{{result=\"{result}\"}}");
    eventually(
        &format!("{n} reload(s) {result}"),
        Duration::from_secs(10),
        || async {
            let r = tls::request(gw.addr, client, "GET", "/metrics", None).await;
            let seen = sample(&String::from_utf8_lossy(&r.body), &series);
            if seen == Some(n) { Ok(()) } else { Err(seen) }
        },
    )
    .await;
}

#[tokio::test]
async fn wss_through_the_whole_gate_and_a_certificate_swapped_by_sighup_under_an_open_socket() {
    bounded(async {
        let dir = TempDir::new();
        let ca = TestCa::new("Portcullis test CA");
        let first = ca.leaf(&["localhost", "127.0.0.1"]);
        let up = Upstream::start().await;
        // A wss:// runtime too, so both sides of one connection are TLS.
        let runtime_ca = TestCa::new("runtime CA");
        let rt = TlsRuntime::start(&runtime_ca.leaf(&["localhost"])).await;
        let ca_file = write_ca(&dir, "runtime-ca.pem", &runtime_ca);
        let routes = format!(
            "{}{}",
            echo_route(&up.url("/"), ""),
            route(
                "secure",
                "/ws/secure",
                &[&rt.url("/")],
                &format!("ca_file = \"{}\"", ca_file.display())
            )
        );
        let gw = Gateway::start(&serve_tls(&dir, &first), &config(None, &routes));
        let client = ca.client();

        // Login over HTTPS, then wss:// through every check of the gate.
        let token = tls::login(gw.addr, &client, "alice").await;
        let mut kept = tls::open(gw.addr, "/ws/echo", &token, &client)
            .await
            .expect("wss upgrade");
        tls::echoes(&mut kept, "over TLS").await;
        let mut both = tls::open(gw.addr, "/ws/secure", &token, &client)
            .await
            .expect("wss upgrade to a wss runtime");
        tls::echoes(&mut both, "TLS on both sides").await;
        // A refusal over TLS is the same JSON refusal.
        match tls::open(gw.addr, "/ws/echo", "not-a-token", &client).await {
            Err(Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), 403);
                let body: serde_json::Value =
                    serde_json::from_slice(resp.body().as_deref().unwrap()).unwrap();
                assert_eq!(body["error"], "invalid_token");
            }
            other => panic!("expected 403, got {:?}", other.map(|_| ())),
        }
        // A fresh client each time: a resumed TLS session reports the
        // certificate of the session it resumes, not the one now served.
        let conn = tls::connect(gw.addr, "localhost", &ca.client()).await;
        assert_eq!(tls::peer_leaf(&conn), first.der);
        assert_eq!(conn.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        assert_eq!(
            conn.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_3)
        );
        drop(conn);
        // TLS 1.2 is still served (the floor), with ALPN too.
        let conn = tls::connect(gw.addr, "localhost", &ca.client_tls12()).await;
        assert_eq!(
            conn.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        assert_eq!(conn.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
        drop(conn);

        // A new certificate (same CA) on disk, then SIGHUP.
        let second = ca.leaf(&["localhost", "127.0.0.1"]);
        serve_tls(&dir, &second);
        gw.signal("HUP");
        reloads(&gw, &client, "ok", 1.0).await;
        // A fresh client each time: a resumed TLS session reports the
        // certificate of the session it resumes, not the one now served.
        let conn = tls::connect(gw.addr, "localhost", &ca.client()).await;
        assert_eq!(
            tls::peer_leaf(&conn),
            second.der,
            "new handshakes get the new certificate"
        );
        drop(conn);
        tls::echoes(&mut kept, "still open").await;
        tls::echoes(&mut both, "still open too").await;

        // A broken certificate, then one that does not match its key: both
        // refused, the second certificate kept, the sockets untouched.
        put(&dir.0.join("cert.pem"), "not a certificate\n");
        gw.signal("HUP");
        reloads(&gw, &client, "invalid", 1.0).await;
        put(&dir.0.join("cert.pem"), &ca.leaf(&["localhost"]).cert_pem);
        gw.signal("HUP");
        reloads(&gw, &client, "invalid", 2.0).await;
        // A fresh client each time: a resumed TLS session reports the
        // certificate of the session it resumes, not the one now served.
        let conn = tls::connect(gw.addr, "localhost", &ca.client()).await;
        assert_eq!(tls::peer_leaf(&conn), second.der);
        drop(conn);
        tls::echoes(&mut kept, "after the refusals").await;
        let fresh_token = tls::login(gw.addr, &client, "bob").await;
        let mut fresh = tls::open(gw.addr, "/ws/echo", &fresh_token, &client)
            .await
            .expect("still serving");
        tls::echoes(&mut fresh, "fresh").await;

        let log = gw.log();
        assert!(log.contains("server.tls.cert_file"), "{log}");
        assert!(
            log.contains("does not match the certificate's public key"),
            "{log}"
        );
        assert!(!log.contains("PRIVATE KEY"), "key material reached the log");
    })
    .await;
}

#[tokio::test]
async fn a_wss_runtime_is_verified_by_the_routes_ca_file_with_sni_from_the_url() {
    bounded(async {
        let dir = TempDir::new();
        let runtime_ca = TestCa::new("runtime CA");
        let rt = TlsRuntime::start(&runtime_ca.leaf(&["localhost"])).await;
        let ca_file = write_ca(&dir, "ca.pem", &runtime_ca);
        let gw = Gateway::start(
            "",
            &config(
                None,
                &echo_route(
                    &rt.url("/"),
                    &format!("ca_file = \"{}\"", ca_file.display()),
                ),
            ),
        );
        let token = login(gw.addr, "alice").await.token;
        let (mut s, _) = ws::open(&gw.url("/ws/echo"), &token).await;
        tls::echoes(&mut s, "to a wss runtime").await;
        let big = "x".repeat(200_000);
        tls::echoes(&mut s, &big).await;
        assert_eq!(
            rt.sni.lock().unwrap().clone(),
            vec![Some("localhost".to_string())]
        );
    })
    .await;
}

#[tokio::test]
async fn a_runtime_whose_certificate_the_route_does_not_trust_is_refused_502() {
    bounded(async {
        let dir = TempDir::new();
        let trusted = TestCa::new("trusted CA");
        let stranger = TestCa::new("someone else's CA");
        // Signed by a CA the route does not name; signed by the right CA
        // but for another host than the URL's.
        let untrusted = TlsRuntime::start(&stranger.leaf(&["localhost"])).await;
        let misnamed = TlsRuntime::start(&trusted.leaf(&["runtime.example"])).await;
        let ca_file = write_ca(&dir, "ca.pem", &trusted);
        let ca = format!("ca_file = \"{}\"", ca_file.display());
        let routes = format!(
            "{}{}",
            route("untrusted", "/ws/untrusted", &[&untrusted.url("/")], &ca),
            route("misnamed", "/ws/misnamed", &[&misnamed.url("/")], &ca)
        );
        let gw = Gateway::start("", &config(None, &routes));
        let token = login(gw.addr, "alice").await.token;
        for path in ["/ws/untrusted", "/ws/misnamed"] {
            let (status, body, _) = ws::refusal(ws::connect_bearer(&gw.url(path), &token).await);
            assert_eq!(status, 502, "{path}");
            assert_eq!(body["error"], "upstream_unavailable", "{path}");
        }
        let log = gw.log();
        assert!(
            log.contains("upstream dial failed") && log.contains("tls:"),
            "{log}"
        );
    })
    .await;
}
