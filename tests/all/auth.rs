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
