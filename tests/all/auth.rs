//! API keys, teams and roles on the control plane and the native API, over a real socket:
//! every route with no key, a wrong key, a revoked key, a viewer, a member, an admin and
//! another team's admin — the exact status, and nothing changed by a refused call.

use serde_json::{Value, json};
use soulbox_host::auth::{DEFAULT_TEAM, Role};
use std::net::IpAddr;

use soulbox_tests::{TEST_API_KEY, http_request_from, http_request_with, serve_app};

/// One call with `key` (none when `None`); the status and the JSON body.
async fn call(
    base: &str,
    key: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    call_from(None, base, key, method, path, body).await
}

/// [`call`] from a chosen local address.
async fn call_from(
    source: Option<IpAddr>,
    base: &str,
    key: Option<&str>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(key) = key {
        headers.push(("x-api-key", key));
    }
    let body = body.map(|b| serde_json::to_vec(&b).expect("json"));
    let url = format!("{base}{path}");
    let (status, _, bytes) = http_request_from(source, method, &url, &headers, body).await;
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test]
async fn every_route_checks_the_key_the_role_and_the_team() {
    let (base, _data, app) = serve_app().await;
    let keys = app.keys().expect("keys");
    let (viewer, _) = keys.create(DEFAULT_TEAM, Role::Viewer, "viewer").expect("a key");
    let (member, _) = keys.create(DEFAULT_TEAM, Role::Member, "member").expect("a key");
    let (outsider, _) = keys.create("other", Role::Admin, "other team").expect("a key");
    let (revoked, revoked_info) = keys.create(DEFAULT_TEAM, Role::Admin, "revoked").expect("a key");
    assert!(keys.revoke(&revoked_info.id, DEFAULT_TEAM).expect("revoke"));
    let wrong = "e2b_ffffffffffffffffffffffffffffffffffffffff";

    let (status, created) = call(
        &base,
        Some(&member),
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": "base", "timeout": 300})),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["sandboxID"].as_str().expect("an id").to_owned();

    // (method, path, body, viewer, member, admin, other team): the statuses expected.
    let sandbox = |suffix: &str| format!("/sandboxes/{id}{suffix}");
    let routes: Vec<(&str, String, Option<Value>, [u16; 4])> = vec![
        ("GET", "/v2/sandboxes".into(), None, [200, 200, 200, 200]),
        ("GET", "/sandboxes".into(), None, [200, 200, 200, 200]),
        ("GET", sandbox(""), None, [200, 200, 200, 404]),
        ("GET", sandbox("/metrics"), None, [200, 200, 200, 404]),
        ("POST", sandbox("/timeout"), Some(json!({"timeout": 300})), [403, 204, 204, 404]),
        (
            "POST",
            format!("/v2/sandboxes/{id}/connect"),
            Some(json!({"timeout": 300})),
            [403, 200, 200, 404],
        ),
        ("POST", sandbox("/resume"), Some(json!({})), [403, 409, 409, 404]),
        ("POST", "/v2/sandboxes".into(), Some(json!({"templateID": "nope"})), [403, 404, 404, 404]),
        (
            "POST",
            "/v1/run".into(),
            Some(json!({"language": "python", "code": "1"})),
            [403, 200, 200, 200],
        ),
        ("GET", "/v1/keys".into(), None, [403, 403, 200, 200]),
        ("POST", "/v1/keys".into(), Some(json!({"role": "bogus"})), [403, 403, 400, 400]),
        ("DELETE", "/v1/keys/000000000000".into(), None, [403, 403, 204, 404]),
        ("GET", format!("/v1/sandboxes/{id}/logs"), None, [200, 200, 200, 404]),
        ("GET", "/metrics".into(), None, [200, 200, 200, 200]),
        (
            "POST",
            format!("/v1/sandboxes/{id}/terminal/token"),
            Some(json!({"ttl_secs": 60})),
            [403, 201, 201, 404],
        ),
        ("POST", "/v1/tokens".into(), Some(json!({"ttl_secs": 60})), [201, 201, 201, 201]),
        ("GET", "/v1/audit".into(), None, [403, 403, 200, 200]),
        ("GET", "/v1/usage".into(), None, [403, 403, 200, 200]),
        ("GET", "/v1/quotas/default".into(), None, [403, 403, 200, 403]),
        ("PUT", "/v1/quotas/default".into(), Some(json!({})), [403, 403, 204, 403]),
        ("POST", sandbox("/pause"), Some(json!({})), [403, 204, 409, 404]),
        ("DELETE", sandbox(""), None, [403, 204, 404, 404]),
    ];
    let refused =
        [(None, "no key"), (Some(wrong), "a wrong key"), (Some(revoked.as_str()), "a revoked key")];
    for (route, (method, path, body, expected)) in routes.iter().enumerate() {
        let (_, before) =
            call(&base, Some(TEST_API_KEY), "GET", &format!("/sandboxes/{id}"), None).await;
        // Each route's refusals from an address of their own, under the failure limit.
        let source = Some(IpAddr::from([127, 0, 0, 10 + u8::try_from(route).expect("few")]));
        for (key, what) in &refused {
            let (status, answer) = call_from(source, &base, *key, method, path, body.clone()).await;
            assert_eq!(status, 401, "{method} {path} with {what}: {answer}");
            let message = if path.starts_with("/v1/") {
                &answer["error"]["message"]
            } else {
                &answer["message"]
            };
            assert!(message.is_string(), "{method} {path}: the API's error shape: {answer}");
        }
        // The outsider first, so that a refused call is seen to change nothing.
        let order = [(3, outsider.as_str()), (0, viewer.as_str())];
        for (index, key) in order {
            let (status, answer) = call(&base, Some(key), method, path, body.clone()).await;
            assert_eq!(status, expected[index], "{method} {path} as key #{index}: {answer}");
            if path.starts_with("/sandboxes") || path.starts_with("/v2/sandboxes/") {
                let (_, now) =
                    call(&base, Some(TEST_API_KEY), "GET", &format!("/sandboxes/{id}"), None).await;
                if (status == 403 || status == 404) && now["state"].is_string() {
                    assert_eq!(
                        now["endAt"], before["endAt"],
                        "a refused {method} {path} changed the deadline"
                    );
                    assert_eq!(
                        now["state"], before["state"],
                        "a refused {method} {path} changed the state"
                    );
                }
            }
        }
        let (status, answer) = call(&base, Some(&member), method, path, body.clone()).await;
        assert_eq!(status, expected[1], "{method} {path} as a member: {answer}");
        let admin_path = if path == "/v1/keys/000000000000" {
            format!("/v1/keys/{}", revoked_info.id)
        } else {
            path.clone()
        };
        let (status, answer) =
            call(&base, Some(TEST_API_KEY), method, &admin_path, body.clone()).await;
        assert_eq!(status, expected[2], "{method} {admin_path} as an admin: {answer}");
    }

    // The other team's list never shows the default team's sandboxes.
    call(&base, Some(&member), "POST", "/v2/sandboxes", Some(json!({"templateID": "base"}))).await;
    let (_, theirs) = call(&base, Some(&outsider), "GET", "/v2/sandboxes", None).await;
    assert_eq!(theirs, json!([]), "another team sees nothing");
    let (_, ours) = call(&base, Some(&viewer), "GET", "/v2/sandboxes", None).await;
    assert_eq!(ours.as_array().map(Vec::len), Some(1), "{ours}");
}

#[tokio::test]
async fn admins_make_list_and_revoke_keys_and_revocation_is_immediate() {
    let (base, _data, _app) = serve_app().await;
    let (status, made) = call(
        &base,
        Some(TEST_API_KEY),
        "POST",
        "/v1/keys",
        Some(json!({"role": "member", "name": "ci"})),
    )
    .await;
    assert_eq!(status, 201, "{made}");
    let key = made["key"].as_str().expect("the key, shown once").to_owned();
    let id = made["info"]["id"].as_str().expect("its id").to_owned();
    assert!(key.starts_with("e2b_") && key.len() == 44 && key[4..].starts_with(&id), "{made}");
    let (_, listed) = call(&base, Some(TEST_API_KEY), "GET", "/v1/keys", None).await;
    let listed_text = listed.to_string();
    assert!(listed_text.contains(&id) && !listed_text.contains(&key[4..]), "ids only: {listed}");
    assert_eq!(call(&base, Some(&key), "GET", "/v2/sandboxes", None).await.0, 200);
    assert_eq!(
        call(&base, Some(TEST_API_KEY), "DELETE", &format!("/v1/keys/{id}"), None).await.0,
        204
    );
    assert_eq!(
        call(&base, Some(&key), "GET", "/v2/sandboxes", None).await.0,
        401,
        "revoked at once"
    );
}

#[tokio::test]
async fn repeated_failures_from_one_address_are_rate_limited() {
    let (base, _data, _app) = serve_app().await;
    let wrong = "e2b_ffffffffffffffffffffffffffffffffffffffff";
    for _ in 0..20 {
        assert_eq!(call(&base, Some(wrong), "GET", "/v2/sandboxes", None).await.0, 401);
    }
    let headers = [("x-api-key", TEST_API_KEY)];
    let (status, response_headers, _) =
        http_request_with("GET", &format!("{base}/v2/sandboxes"), &headers, None).await;
    assert_eq!(status, 429, "even a good key, from this address, for a while");
    assert_eq!(response_headers["retry-after"], "60");
}

#[tokio::test]
async fn state_changes_and_refused_attempts_are_audited_per_team() {
    let (base, _data, app) = serve_app().await;
    let keys = app.keys().expect("keys");
    let (member, member_info) = keys.create(DEFAULT_TEAM, Role::Member, "member").expect("a key");
    let (outsider, _) = keys.create("other", Role::Admin, "outsider").expect("a key");
    let (_, created) =
        call(&base, Some(&member), "POST", "/v2/sandboxes", Some(json!({"templateID": "base"})))
            .await;
    let id = created["sandboxID"].as_str().expect("an id").to_owned();
    call(&base, Some(&member), "GET", "/v2/sandboxes", None).await;
    assert_eq!(
        call(&base, Some(&outsider), "DELETE", &format!("/sandboxes/{id}"), None).await.0,
        404
    );
    assert_eq!(
        call(&base, Some(&member), "DELETE", &format!("/sandboxes/{id}"), None).await.0,
        204
    );

    let (status, ours) = call(&base, Some(TEST_API_KEY), "GET", "/v1/audit", None).await;
    assert_eq!(status, 200, "{ours}");
    let actions: Vec<(String, u64, String)> = ours
        .as_array()
        .expect("records")
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap_or("").to_owned(),
                r["status"].as_u64().unwrap_or(0),
                r["key_id"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let kill = format!("DELETE /sandboxes/{id}");
    assert_eq!(
        actions,
        vec![
            ("POST /v2/sandboxes".to_owned(), 201, member_info.id.clone()),
            (kill.clone(), 204, member_info.id.clone()),
        ],
        "one record per mutation, reads not recorded: {ours}"
    );
    assert!(ours[0]["source"].as_str().is_some_and(|s| s.starts_with("127.")), "{ours}");
    let (_, theirs) = call(&base, Some(&outsider), "GET", "/v1/audit", None).await;
    let attempt = &theirs.as_array().expect("records")[0];
    assert_eq!(
        (attempt["action"].as_str(), attempt["status"].as_u64()),
        (Some(kill.as_str()), Some(404)),
        "the cross-team attempt: {theirs}"
    );
    // The log is read-only through the API, and admins only.
    assert_eq!(call(&base, Some(&member), "GET", "/v1/audit", None).await.0, 403);
    assert_eq!(call(&base, Some(TEST_API_KEY), "DELETE", "/v1/audit", None).await.0, 405);
    let (status, _) = call(&base, Some(&outsider), "GET", "/v1/audit?team=default", None).await;
    assert_eq!(status, 403, "another team's admin reads only its own team");
}

#[tokio::test]
async fn quotas_hold_a_team_and_usage_is_counted() {
    let (base, _data, app) = serve_app().await;
    let keys = app.keys().expect("keys");
    let (outsider, _) = keys.create("other", Role::Admin, "other team").expect("a key");
    let quota = json!({"max_live_sandboxes": 1, "max_timeout_secs": 60, "max_memory_mib": 1024});
    assert_eq!(
        call(&base, Some(&outsider), "PUT", "/v1/quotas/other", Some(quota.clone())).await.0,
        403,
        "a team does not set its own quota"
    );
    assert_eq!(
        call(&base, Some(TEST_API_KEY), "PUT", "/v1/quotas/other", Some(quota.clone())).await.0,
        204
    );
    assert_eq!(call(&base, Some(&outsider), "GET", "/v1/quotas/other", None).await.1, quota);

    let (status, answer) = call(
        &base,
        Some(&outsider),
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": "base", "timeout": 120})),
    )
    .await;
    assert_eq!(status, 400, "a timeout above the quota: {answer}");
    assert!(answer["message"].as_str().is_some_and(|m| m.contains("quota")), "{answer}");
    let (status, first) = call(
        &base,
        Some(&outsider),
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": "python", "timeout": 60})),
    )
    .await;
    assert_eq!(status, 201, "{first}");
    let (status, answer) = call(
        &base,
        Some(&outsider),
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": "python", "timeout": 60})),
    )
    .await;
    assert_eq!(status, 429, "one live sandbox at most: {answer}");
    let (status, _) = call(
        &base,
        Some(TEST_API_KEY),
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": "base"})),
    )
    .await;
    assert_eq!(status, 201, "another team is not held by it");

    // A cell run, then the sandbox killed: its use is counted for its team and template.
    let id = first["sandboxID"].as_str().expect("an id").to_owned();
    let token = first["envdAccessToken"].as_str().expect("a token").to_owned();
    let headers = [
        ("e2b-sandbox-id", id.as_str()),
        ("e2b-sandbox-port", "49999"),
        ("x-access-token", token.as_str()),
        ("content-type", "application/json"),
    ];
    let (status, _, body) = http_request_with(
        "POST",
        &format!("{base}/execute"),
        &headers,
        Some(br#"{"code": "1 + 1"}"#.to_vec()),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(
        call(&base, Some(&outsider), "DELETE", &format!("/sandboxes/{id}"), None).await.0,
        204
    );
    let (status, usage) = call(&base, Some(&outsider), "GET", "/v1/usage", None).await;
    assert_eq!(status, 200, "{usage}");
    let [row] = usage.as_array().expect("rows").as_slice() else { panic!("one row: {usage}") };
    assert_eq!(
        (row["team"].as_str(), row["template"].as_str()),
        (Some("other"), Some("python")),
        "{row}"
    );
    assert_eq!(
        (row["sandboxes"].as_u64(), row["executions"].as_u64()),
        (Some(1), Some(1)),
        "{row}"
    );
    assert!(row["sandbox_seconds"].as_f64().is_some_and(|s| s > 0.1), "{row}");
    assert!(row["cpu_seconds"].as_f64().is_some_and(|s| s > 0.0), "the cell's time: {row}");
    assert!(row["cpu_seconds_by_tier"]["wasm"].as_f64().is_some_and(|s| s > 0.0), "by tier: {row}");
    assert!(row["memory_gib_seconds"].as_f64().is_some_and(|s| s > 0.0), "{row}");
    assert_eq!(call(&base, Some(&outsider), "GET", "/v1/usage?team=default", None).await.0, 403);
    // And the quota has room again.
    let (status, _) = call(
        &base,
        Some(&outsider),
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": "python", "timeout": 60})),
    )
    .await;
    assert_eq!(status, 201);
}

/// Signs a request as `tokens.rs` documents it.
fn sign(secret: &str, method: &str, path: &str, timestamp: u64, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};
    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let message = format!("{method}\n{path}\n{timestamp}\n{}", hex(&Sha256::digest(body)));
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any length");
    mac.update(message.as_bytes());
    hex(&mac.finalize().into_bytes())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_secs()
}

#[tokio::test]
async fn signed_requests_are_checked_for_tampering_age_and_replay() {
    let (base, _data, _app) = serve_app().await;
    let (_, made) =
        call(&base, Some(TEST_API_KEY), "POST", "/v1/keys", Some(json!({"role": "member"}))).await;
    let id = made["info"]["id"].as_str().expect("an id").to_owned();
    let secret =
        made["signing_secret"].as_str().expect("its signing secret, shown once").to_owned();
    let signed = |method: &'static str,
                  path: &'static str,
                  body: Vec<u8>,
                  timestamp: u64,
                  signature: String| {
        let (base, id) = (base.clone(), id.clone());
        async move {
            let timestamp = timestamp.to_string();
            let headers = [
                ("x-soulbox-key-id", id.as_str()),
                ("x-soulbox-timestamp", timestamp.as_str()),
                ("x-soulbox-signature", signature.as_str()),
                ("content-type", "application/json"),
            ];
            http_request_with(method, &format!("{base}{path}"), &headers, Some(body)).await.0
        }
    };
    let now = unix_now();
    let body = br#"{"templateID": "base"}"#.to_vec();
    let good = sign(&secret, "POST", "/v2/sandboxes", now, &body);
    assert_eq!(signed("POST", "/v2/sandboxes", body.clone(), now, good.clone()).await, 201);
    assert_eq!(signed("POST", "/v2/sandboxes", body.clone(), now, good).await, 403, "a replay");
    let tampered = sign(&secret, "POST", "/v2/sandboxes", now, b"{}");
    assert_eq!(
        signed("POST", "/v2/sandboxes", body.clone(), now, tampered).await,
        403,
        "another body"
    );
    let old = now - 3600;
    let stale = sign(&secret, "POST", "/v2/sandboxes", old, &body);
    assert_eq!(signed("POST", "/v2/sandboxes", body.clone(), old, stale).await, 403, "too old");
    let listed = sign(&secret, "GET", "/v2/sandboxes?limit=5", now, b"");
    assert_eq!(
        signed("GET", "/v2/sandboxes?limit=5", vec![], now, listed).await,
        200,
        "the query is signed too"
    );
    assert_eq!(
        call(&base, Some(TEST_API_KEY), "DELETE", &format!("/v1/keys/{id}"), None).await.0,
        204
    );
    let after = sign(&secret, "GET", "/v2/sandboxes", now, b"");
    assert_eq!(
        signed("GET", "/v2/sandboxes", vec![], now, after).await,
        401,
        "a revoked key signs nothing"
    );
}

#[tokio::test]
async fn session_tokens_act_for_their_key_until_they_expire_or_it_is_revoked() {
    let (base, _data, app) = serve_app().await;
    let (viewer, viewer_info) =
        app.keys().expect("keys").create(DEFAULT_TEAM, Role::Viewer, "v").expect("a key");
    let (status, issued) =
        call(&base, Some(&viewer), "POST", "/v1/tokens", Some(json!({"ttl_secs": 60}))).await;
    assert_eq!(status, 201, "{issued}");
    let token = issued["token"].as_str().expect("a token").to_owned();
    assert_eq!(call(&base, Some(&token), "GET", "/v2/sandboxes", None).await.0, 200);
    let (status, _) =
        call(&base, Some(&token), "POST", "/v2/sandboxes", Some(json!({"templateID": "base"})))
            .await;
    assert_eq!(status, 403, "a viewer's token is a viewer's");
    let mut tampered = token.clone();
    let last = tampered.pop().expect("a character");
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    assert_eq!(call(&base, Some(&tampered), "GET", "/v2/sandboxes", None).await.0, 403, "tampered");
    let (_, short) =
        call(&base, Some(&viewer), "POST", "/v1/tokens", Some(json!({"ttl_secs": 1}))).await;
    let short = short["token"].as_str().expect("a token").to_owned();
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    assert_eq!(call(&base, Some(&short), "GET", "/v2/sandboxes", None).await.0, 403, "expired");
    assert!(app.keys().expect("keys").revoke(&viewer_info.id, DEFAULT_TEAM).expect("revoke"));
    assert_eq!(
        call(&base, Some(&token), "GET", "/v2/sandboxes", None).await.0,
        401,
        "its key revoked"
    );
}

#[tokio::test]
async fn tokens_of_an_openid_connect_issuer_are_accepted_with_its_keys() {
    use base64::Engine;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use ring::signature::KeyPair;
    // A local issuer: an Ed25519 key, its JWKS served over HTTP on loopback.
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
        .expect("a key");
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("a key pair");
    let x = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
    let jwks = json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "k1", "alg": "EdDSA", "use": "sig"}]});
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("listen");
    let jwks_url = format!("http://{}/jwks.json", listener.local_addr().expect("address"));
    let body = jwks.to_string();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(body.as_bytes()).await;
        }
    });
    let keys = soulbox_host::tokens::fetch_jwks(&jwks_url).await.expect("the JWKS");
    let issuer = soulbox_host::tokens::OidcIssuer {
        issuer: "https://idp.test".into(),
        audience: "soulbox".into(),
        jwks: keys,
    };
    let (base, _data, _app) = soulbox_tests::serve_configured(|app| app.with_oidc(issuer)).await;

    let token = |claims: Value| {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some("k1".into());
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_der(pkcs8.as_ref()))
            .expect("a token")
    };
    let exp = unix_now() + 300;
    let good = token(
        json!({"iss": "https://idp.test", "aud": "soulbox", "sub": "alice", "exp": exp, "soulbox_team": "research", "soulbox_role": "member"}),
    );
    let (status, created) =
        call(&base, Some(&good), "POST", "/v2/sandboxes", Some(json!({"templateID": "base"})))
            .await;
    assert_eq!(status, 201, "{created}");
    let (_, listed) = call(&base, Some(&good), "GET", "/v2/sandboxes", None).await;
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(1),
        "the sandbox is team research's: {listed}"
    );
    assert_eq!(
        call(&base, Some(TEST_API_KEY), "GET", "/v2/sandboxes", None).await.1,
        json!([]),
        "not the default team's"
    );
    for (claims, what) in [
        (
            json!({"iss": "https://other.test", "aud": "soulbox", "sub": "a", "exp": exp, "soulbox_team": "research", "soulbox_role": "admin"}),
            "another issuer",
        ),
        (
            json!({"iss": "https://idp.test", "aud": "elsewhere", "sub": "a", "exp": exp, "soulbox_team": "research", "soulbox_role": "admin"}),
            "another audience",
        ),
        (
            json!({"iss": "https://idp.test", "aud": "soulbox", "sub": "a", "exp": unix_now() - 10, "soulbox_team": "research", "soulbox_role": "admin"}),
            "expired",
        ),
    ] {
        assert_eq!(
            call(&base, Some(&token(claims)), "GET", "/v2/sandboxes", None).await.0,
            403,
            "{what}"
        );
    }
    // Signed with a key the issuer does not have.
    let stranger =
        ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .expect("a key");
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("k1".into());
    let forged = jsonwebtoken::encode(&header, &json!({"iss": "https://idp.test", "aud": "soulbox", "sub": "a", "exp": exp, "soulbox_team": "default", "soulbox_role": "admin"}), &EncodingKey::from_ed_der(stranger.as_ref())).expect("a token");
    assert_eq!(call(&base, Some(&forged), "GET", "/v1/keys", None).await.0, 403, "a forged token");
}
