//! Session tokens (SPEC §5), as pure logic: sign, verify, rotate, publish.
//!
//! Keys come from `tests/fixtures/keys` (throwaway PKCS#8 PEMs). Tokens the
//! service must refuse are built by hand with `jsonwebtoken`, each next to a
//! control built the same way that the service accepts, so a refusal is known
//! to come from the property under test and not from a bad test token.

mod support;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{DecodingKey, EncodingKey, Header, Validation};
use portcullis::config::{Algorithm, Config, KeyMaterial, Secret, TokensConfig, ValidatedKeys};
use portcullis::time::now_unix;
use portcullis::token::{Claims, TokenError, TokenService};
use serde_json::{Value, json};
use support::key_fixture;

const HS_KEY_A: &[u8] = b"hs256-key-a-0123456789abcdefghijklmnopqrstuv";
const HS_KEY_B: &[u8] = b"hs256-key-b-0123456789abcdefghijklmnopqrstuv";
const ISSUER: &str = "portcullis";
const AUDIENCE: &str = "runtimes";

const ASYMMETRIC: [Algorithm; 3] = [Algorithm::EdDSA, Algorithm::ES256, Algorithm::RS256];
const ALL: [Algorithm; 4] = [
    Algorithm::HS256,
    Algorithm::EdDSA,
    Algorithm::ES256,
    Algorithm::RS256,
];

/// Key `a` or `b` of the kind `alg` needs.
fn key(alg: Algorithm, which: char) -> Vec<u8> {
    let stem = match alg {
        Algorithm::HS256 => return if which == 'a' { HS_KEY_A } else { HS_KEY_B }.to_vec(),
        Algorithm::EdDSA => "ed25519",
        Algorithm::ES256 => "p256",
        Algorithm::RS256 => "rsa",
    };
    key_fixture(&format!("{stem}_{which}.pem"))
}

fn jwt_alg(alg: Algorithm) -> jsonwebtoken::Algorithm {
    match alg {
        Algorithm::HS256 => jsonwebtoken::Algorithm::HS256,
        Algorithm::EdDSA => jsonwebtoken::Algorithm::EdDSA,
        Algorithm::ES256 => jsonwebtoken::Algorithm::ES256,
        Algorithm::RS256 => jsonwebtoken::Algorithm::RS256,
    }
}

fn encoding_key(alg: Algorithm, key: &[u8]) -> EncodingKey {
    match alg {
        Algorithm::HS256 => EncodingKey::from_secret(key),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(key).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(key).unwrap(),
        Algorithm::RS256 => EncodingKey::from_rsa_pem(key).unwrap(),
    }
}

/// A `[tokens]` table as the config parser builds it (so defaults apply).
fn tokens_config(alg: Algorithm, kid: &str) -> TokensConfig {
    let text = format!("[tokens]\nalgorithm = \"{alg:?}\"\nkid = \"{kid}\"\n");
    let mut config = Config::parse("tokens.toml", &text).unwrap().tokens;
    assert_eq!(
        (config.issuer.as_str(), config.audience.as_str()),
        (ISSUER, AUDIENCE)
    );
    config.ttl_secs = 900;
    config
}

fn material(kid: &str, secret: &[u8]) -> KeyMaterial {
    KeyMaterial {
        kid: kid.to_string(),
        secret: Secret::new(secret),
    }
}

/// A service signing with `signing` under `kid` that also accepts `previous`.
fn service_with(cfg: &TokensConfig, signing: &[u8], previous: &[(&str, &[u8])]) -> TokenService {
    let keys = ValidatedKeys {
        signing: material(&cfg.kid, signing),
        previous: previous.iter().map(|(kid, k)| material(kid, k)).collect(),
    };
    TokenService::new(cfg, &keys).expect("the service accepts the fixture keys")
}

fn service(alg: Algorithm, kid: &str, signing: &[u8], previous: &[(&str, &[u8])]) -> TokenService {
    service_with(&tokens_config(alg, kid), signing, previous)
}

/// Claims as the service would write them, `exp` seconds from now.
fn claims(exp_in: i64) -> Claims {
    let now = now_unix();
    Claims {
        sub: "alice".into(),
        sid: "session-1".into(),
        iat: now - 10,
        exp: now + exp_in,
        iss: ISSUER.into(),
        aud: AUDIENCE.into(),
        jti: "jti-1".into(),
    }
}

fn sign(alg: Algorithm, kid: Option<&str>, claims: &Claims, key: &[u8]) -> String {
    let mut header = Header::new(jwt_alg(alg));
    header.kid = kid.map(String::from);
    jsonwebtoken::encode(&header, claims, &encoding_key(alg, key)).unwrap()
}

fn b64_json(value: &Value) -> String {
    B64.encode(serde_json::to_vec(value).unwrap())
}

fn payload(token: &str) -> Value {
    let part = token.split('.').nth(1).expect("a payload segment");
    serde_json::from_slice(&B64.decode(part).unwrap()).unwrap()
}

#[test]
fn issue_then_verify_round_trips_for_every_algorithm() {
    for alg in ALL {
        let svc = service(alg, "k1", &key(alg, 'a'), &[]);
        let before = now_unix();
        let issued = svc.issue("alice", "session-1");
        let after = now_unix();

        let header = jsonwebtoken::decode_header(&issued.token).unwrap();
        assert_eq!(header.alg, jwt_alg(alg));
        assert_eq!(header.kid.as_deref(), Some("k1"), "{alg:?}");

        let raw = payload(&issued.token);
        for claim in ["sub", "sid", "iss", "aud", "iat", "exp", "jti"] {
            assert!(raw.get(claim).is_some(), "{alg:?}: no {claim} in {raw}");
        }

        let c = svc
            .verify(&issued.token)
            .unwrap_or_else(|e| panic!("{alg:?}: {e:?}"));
        assert_eq!((c.sub.as_str(), c.sid.as_str()), ("alice", "session-1"));
        assert_eq!((c.iss.as_str(), c.aud.as_str()), (ISSUER, AUDIENCE));
        assert!((before..=after).contains(&c.iat), "{alg:?}: iat {}", c.iat);
        assert_eq!(c.exp, c.iat + 900);
        assert_eq!(issued.expires_at, c.exp);
        assert!(!c.jti.is_empty());
        let again = svc.verify(&svc.issue("alice", "session-1").token).unwrap();
        assert_ne!(again.jti, c.jti, "{alg:?}: every token gets its own jti");
    }
}

#[test]
fn empty_token_is_missing() {
    for alg in ALL {
        let svc = service(alg, "k1", &key(alg, 'a'), &[]);
        assert_eq!(svc.verify(""), Err(TokenError::Missing));
    }
    assert_eq!(TokenError::Missing.code(), "missing_token");
    assert_eq!(TokenError::Invalid.code(), "invalid_token");
    assert_eq!(TokenError::Expired.code(), "token_expired");
}

#[test]
fn token_signed_with_another_key_is_invalid() {
    for alg in ALL {
        let svc = service(alg, "k1", &key(alg, 'a'), &[]);
        let other = service(alg, "k1", &key(alg, 'b'), &[]);
        assert_eq!(
            svc.verify(&other.issue("alice", "s").token),
            Err(TokenError::Invalid),
            "{alg:?}"
        );
    }
}

#[test]
fn alg_none_is_invalid() {
    for alg in [Algorithm::HS256, Algorithm::RS256] {
        let svc = service(alg, "k1", &key(alg, 'a'), &[]);
        let body = b64_json(&serde_json::to_value(claims(600)).unwrap());
        for none in ["none", "None", "NONE", "nOnE"] {
            let head = b64_json(&json!({"alg": none, "typ": "JWT", "kid": "k1"}));
            for token in [format!("{head}.{body}."), format!("{head}.{body}")] {
                assert_eq!(
                    svc.verify(&token),
                    Err(TokenError::Invalid),
                    "{alg:?} {token}"
                );
            }
        }
        // The service's own algorithm with the signature stripped.
        let stripped = svc.issue("alice", "s").token;
        let stripped = &stripped[..=stripped.rfind('.').unwrap()];
        assert_eq!(svc.verify(stripped), Err(TokenError::Invalid), "{alg:?}");
    }
}

#[test]
fn algorithm_is_pinned_by_config_not_by_the_token() {
    let rsa = service(Algorithm::RS256, "k1", &key(Algorithm::RS256, 'a'), &[]);
    let hs = service(Algorithm::HS256, "k1", HS_KEY_A, &[]);

    // HS256 forged with the RS256 service's *public* key as the HMAC secret.
    let spki_pem = key_fixture("rsa_a_public.pem");
    let pkcs1_pem = key_fixture("rsa_a_public_pkcs1.pem");
    let spki_der = pem::parse(&spki_pem).unwrap().into_contents();
    let pkcs1_der = pem::parse(&pkcs1_pem).unwrap().into_contents();
    for public in [&spki_pem, &pkcs1_pem, &spki_der, &pkcs1_der] {
        let forged = sign(Algorithm::HS256, Some("k1"), &claims(600), public);
        assert_eq!(rsa.verify(&forged), Err(TokenError::Invalid));
        // Same forgery relabelled RS256: the HMAC is no RSA signature.
        let (_, rest) = forged.split_once('.').unwrap();
        let head = b64_json(&json!({"alg": "RS256", "typ": "JWT", "kid": "k1"}));
        assert_eq!(
            rsa.verify(&format!("{head}.{rest}")),
            Err(TokenError::Invalid)
        );
    }

    // An RS256 token, signed correctly, shown to an HS256 service.
    assert!(rsa.verify(&rsa.issue("alice", "s").token).is_ok());
    assert_eq!(
        hs.verify(&rsa.issue("alice", "s").token),
        Err(TokenError::Invalid)
    );

    // Other algorithm pairs, and HS384 with the right secret.
    let ed = service(Algorithm::EdDSA, "k1", &key(Algorithm::EdDSA, 'a'), &[]);
    let es = service(Algorithm::ES256, "k1", &key(Algorithm::ES256, 'a'), &[]);
    assert_eq!(
        es.verify(&ed.issue("alice", "s").token),
        Err(TokenError::Invalid)
    );
    assert_eq!(
        ed.verify(&es.issue("alice", "s").token),
        Err(TokenError::Invalid)
    );
    assert_eq!(
        rsa.verify(&hs.issue("alice", "s").token),
        Err(TokenError::Invalid)
    );
    let mut header = Header::new(jsonwebtoken::Algorithm::HS384);
    header.kid = Some("k1".into());
    let hs384 =
        jsonwebtoken::encode(&header, &claims(600), &EncodingKey::from_secret(HS_KEY_A)).unwrap();
    assert_eq!(hs.verify(&hs384), Err(TokenError::Invalid));
}

#[test]
fn expired_token_is_expired() {
    for alg in ALL {
        let k = key(alg, 'a');
        let svc = service(alg, "k1", &k, &[]);
        // Control: the same hand-built token, still valid, is accepted.
        let fresh = sign(alg, Some("k1"), &claims(600), &k);
        assert_eq!(
            svc.verify(&fresh).map(|c| c.jti),
            Ok("jti-1".to_string()),
            "{alg:?}"
        );
        for exp_in in [-1, -60, -86_400] {
            let expired = sign(alg, Some("k1"), &claims(exp_in), &k);
            assert_eq!(
                svc.verify(&expired),
                Err(TokenError::Expired),
                "{alg:?} exp {exp_in}"
            );
            // Expiry is reported only for a token whose signature holds.
            let forged = sign(alg, Some("k1"), &claims(exp_in), &key(alg, 'b'));
            assert_eq!(svc.verify(&forged), Err(TokenError::Invalid), "{alg:?}");
        }
    }
}

#[test]
fn wrong_audience_or_issuer_is_invalid() {
    for alg in ALL {
        let k = key(alg, 'a');
        let svc = service(alg, "k1", &k, &[]);
        let wrong_aud = Claims {
            aud: "someone-else".into(),
            ..claims(600)
        };
        let wrong_iss = Claims {
            iss: "evil-gateway".into(),
            ..claims(600)
        };
        for c in [wrong_aud, wrong_iss] {
            assert_eq!(
                svc.verify(&sign(alg, Some("k1"), &c, &k)),
                Err(TokenError::Invalid),
                "{alg:?}"
            );
        }

        // Two gateways sharing a key but configured for different audiences / issuers.
        let mut other = tokens_config(alg, "k1");
        other.audience = "billing".into();
        let billing = service_with(&other, &k, &[]);
        assert!(billing.verify(&billing.issue("alice", "s").token).is_ok());
        assert_eq!(
            svc.verify(&billing.issue("alice", "s").token),
            Err(TokenError::Invalid)
        );
        assert_eq!(
            billing.verify(&svc.issue("alice", "s").token),
            Err(TokenError::Invalid)
        );
        let mut other = tokens_config(alg, "k1");
        other.issuer = "other-gateway".into();
        let foreign = service_with(&other, &k, &[]);
        assert_eq!(
            svc.verify(&foreign.issue("alice", "s").token),
            Err(TokenError::Invalid)
        );
    }
}

#[test]
fn missing_claims_are_invalid() {
    let svc = service(Algorithm::HS256, "k1", HS_KEY_A, &[]);
    let full = serde_json::to_value(claims(600)).unwrap();
    for claim in ["sub", "sid", "iat", "exp", "iss", "aud", "jti"] {
        let mut partial = full.clone();
        partial.as_object_mut().unwrap().remove(claim);
        let mut header = Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some("k1".into());
        let token =
            jsonwebtoken::encode(&header, &partial, &EncodingKey::from_secret(HS_KEY_A)).unwrap();
        assert_eq!(
            svc.verify(&token),
            Err(TokenError::Invalid),
            "without {claim}"
        );
    }
}

#[test]
fn unknown_or_missing_kid_is_invalid() {
    for alg in ALL {
        let k = key(alg, 'a');
        let svc = service(alg, "k1", &k, &[]);
        assert!(svc.verify(&sign(alg, Some("k1"), &claims(600), &k)).is_ok());
        for kid in [Some("k9"), Some(""), Some("K1"), None] {
            let token = sign(alg, kid, &claims(600), &k);
            assert_eq!(
                svc.verify(&token),
                Err(TokenError::Invalid),
                "{alg:?} kid {kid:?}"
            );
        }
        // A token from a gateway with the same key but another kid.
        let k2 = service(alg, "k2", &k, &[]);
        assert_eq!(
            svc.verify(&k2.issue("alice", "s").token),
            Err(TokenError::Invalid)
        );
    }
}

#[test]
fn malformed_tokens_are_invalid() {
    let svc = service(Algorithm::HS256, "k1", HS_KEY_A, &[]);
    let good = svc.issue("alice", "s").token;
    let (head, rest) = good.split_once('.').unwrap();
    let (body, sig) = rest.split_once('.').unwrap();
    let mut tampered = payload(&good);
    tampered["sub"] = json!("mallory");
    let tampered_body = b64_json(&tampered);
    let garbage = [
        "garbage".to_string(),
        " ".into(),
        ".".into(),
        "..".into(),
        "a.b.c".into(),
        "a.b.c.d".into(),
        "eyJhbGciOiJIUzI1NiJ9".into(),
        "eyJhbGciOiJIUzI1NiJ9.e30".into(),
        "eyJhbGciOiJIUzI1NiJ9.e30.".into(),
        format!("{head}.{body}"),
        format!("{head}.{body}.{sig}.{sig}"),
        format!("{head}.{tampered_body}.{sig}"),
        format!("{head}.{body}.{}", &sig[..sig.len() - 2]),
        format!("{head}.{body}.{}", sig.chars().rev().collect::<String>()),
        format!("{head}.{body}.!!!!"),
        format!(" {good}"),
        format!("{good} "),
        format!("Bearer {good}"),
        good.replace('.', ".."),
        "\u{0}".into(),
        "é.é.é".into(),
    ];
    for token in &garbage {
        assert_eq!(svc.verify(token), Err(TokenError::Invalid), "{token:?}");
    }
    assert!(svc.verify(&good).is_ok());
}

#[test]
fn previous_keys_verify_until_they_are_removed() {
    for alg in ALL {
        let (a, b) = (key(alg, 'a'), key(alg, 'b'));
        let old = service(alg, "k0", &a, &[]);
        let rotated = service(alg, "k1", &b, &[("k0", &a)]);
        let retired = service(alg, "k1", &b, &[]);

        let before_rotation = old.issue("alice", "session-1").token;
        let verified = rotated
            .verify(&before_rotation)
            .unwrap_or_else(|e| panic!("{alg:?}: {e:?}"));
        assert_eq!(verified.sid, "session-1");
        assert_eq!(
            retired.verify(&before_rotation),
            Err(TokenError::Invalid),
            "{alg:?}"
        );

        // New tokens carry the new kid and verify on both new services.
        let after_rotation = rotated.issue("alice", "session-1").token;
        let header = jsonwebtoken::decode_header(&after_rotation).unwrap();
        assert_eq!(header.kid.as_deref(), Some("k1"));
        assert!(rotated.verify(&after_rotation).is_ok());
        assert!(retired.verify(&after_rotation).is_ok());
        assert_eq!(old.verify(&after_rotation), Err(TokenError::Invalid));

        // A kid names one key: the new key presented under the old kid fails.
        let relabelled = sign(alg, Some("k0"), &claims(600), &b);
        assert_eq!(
            rotated.verify(&relabelled),
            Err(TokenError::Invalid),
            "{alg:?}"
        );
    }
}

#[test]
fn jwks_publishes_every_public_key_and_it_verifies_tokens() {
    for alg in ASYMMETRIC {
        let (a, b) = (key(alg, 'a'), key(alg, 'b'));
        let old = service(alg, "k0", &a, &[]);
        let svc = service(alg, "k1", &b, &[("k0", &a)]);
        let jwks = svc
            .jwks()
            .unwrap_or_else(|| panic!("{alg:?} publishes a JWKS"));
        let keys = jwks["keys"].as_array().expect("a keys array");
        let kids: Vec<&str> = keys.iter().map(|k| k["kid"].as_str().unwrap()).collect();
        assert_eq!(kids, ["k1", "k0"], "{alg:?}");

        let (kty, crv) = match alg {
            Algorithm::EdDSA => ("OKP", Some("Ed25519")),
            Algorithm::ES256 => ("EC", Some("P-256")),
            Algorithm::RS256 => ("RSA", None),
            Algorithm::HS256 => unreachable!(),
        };
        let tokens = [svc.issue("alice", "s").token, old.issue("alice", "s").token];
        let mut validation = Validation::new(jwt_alg(alg));
        validation.set_audience(&[AUDIENCE]);
        validation.set_issuer(&[ISSUER]);
        for (jwk, token) in keys.iter().zip(&tokens) {
            assert_eq!(jwk["alg"], json!(format!("{alg:?}")), "{jwk}");
            assert_eq!(jwk["kty"], json!(kty), "{jwk}");
            assert_eq!(jwk["crv"].as_str(), crv, "{jwk}");
            assert_eq!(jwk["use"], json!("sig"), "{jwk}");
            for private in ["d", "p", "q", "dp", "dq", "qi", "k"] {
                assert!(
                    jwk.get(private).is_none(),
                    "{alg:?}: JWKS leaks {private}: {jwk}"
                );
            }
            let field = |name: &str| {
                jwk[name]
                    .as_str()
                    .unwrap_or_else(|| panic!("{name} in {jwk}"))
            };
            let decoding = match alg {
                Algorithm::EdDSA => DecodingKey::from_ed_components(field("x")),
                Algorithm::ES256 => DecodingKey::from_ec_components(field("x"), field("y")),
                Algorithm::RS256 => DecodingKey::from_rsa_components(field("n"), field("e")),
                Algorithm::HS256 => unreachable!(),
            }
            .unwrap();
            let data = jsonwebtoken::decode::<Claims>(token, &decoding, &validation)
                .unwrap_or_else(|e| panic!("{alg:?} {}: {e}", jwk["kid"]));
            assert_eq!(data.header.kid.as_deref(), jwk["kid"].as_str());
            assert_eq!(data.claims.sub, "alice");
        }
        // And each published key verifies only its own kid's tokens.
        let k0 = &keys[1];
        let decoding = match alg {
            Algorithm::EdDSA => DecodingKey::from_ed_components(k0["x"].as_str().unwrap()),
            Algorithm::ES256 => DecodingKey::from_ec_components(
                k0["x"].as_str().unwrap(),
                k0["y"].as_str().unwrap(),
            ),
            Algorithm::RS256 => DecodingKey::from_rsa_components(
                k0["n"].as_str().unwrap(),
                k0["e"].as_str().unwrap(),
            ),
            Algorithm::HS256 => unreachable!(),
        }
        .unwrap();
        assert!(jsonwebtoken::decode::<Claims>(&tokens[0], &decoding, &validation).is_err());
    }
}

#[test]
fn hs256_has_no_jwks() {
    let svc = service(Algorithm::HS256, "k1", HS_KEY_A, &[("k0", HS_KEY_B)]);
    assert!(svc.jwks().is_none());
}

#[test]
fn debug_never_shows_keys() {
    for alg in ALL {
        let svc = service(alg, "k1", &key(alg, 'a'), &[("k0", &key(alg, 'b'))]);
        let shown = format!("{svc:?} {svc:#?}");
        assert!(shown.contains("MASKED"), "{shown}");
        for k in [key(alg, 'a'), key(alg, 'b')] {
            let text = String::from_utf8(k).unwrap();
            for line in text.lines().filter(|l| !l.starts_with("-----")) {
                assert!(!shown.contains(line), "{alg:?}: Debug shows key material");
            }
        }
    }
}
