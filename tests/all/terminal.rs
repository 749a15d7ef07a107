//! The web terminal (`host/src/terminal.rs`) over real sockets: its WebSocket's credentials,
//! checked before the upgrade; the bridge to a pseudo-terminal (bytes untouched, resizes,
//! reattaching, the exit); and the page in headless Chromium, typed into like a person.

use std::path::PathBuf;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use soulbox_host::auth::{DEFAULT_TEAM, Principal, Role};
use soulbox_tests::{TEST_API_KEY, http_request, http_request_with, serve_app};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long any one expected thing may take.
const PATIENCE: Duration = Duration::from_secs(20);

/// A new `base` sandbox on `base`; its id.
async fn new_sandbox(base: &str) -> String {
    let body = serde_json::to_vec(&json!({"templateID": "base", "timeout": 300})).expect("json");
    let (status, _, bytes) =
        http_request("POST", &format!("{base}/v2/sandboxes"), Some(body)).await;
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&bytes));
    let created: Value = serde_json::from_slice(&bytes).expect("json");
    created["sandboxID"].as_str().expect("an id").to_owned()
}

/// A call with `key`: the status and the JSON answer.
async fn call(base: &str, key: &str, method: &str, path: &str, body: Value) -> (u16, Value) {
    let headers = [("x-api-key", key), ("content-type", "application/json")];
    let body = serde_json::to_vec(&body).expect("json");
    let (status, _, bytes) =
        http_request_with(method, &format!("{base}{path}"), &headers, Some(body)).await;
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

/// A terminal token for sandbox `id`, asked for with `key`.
async fn terminal_token(base: &str, key: &str, id: &str, ttl_secs: u64) -> String {
    let path = format!("/v1/sandboxes/{id}/terminal/token");
    let (status, answer) = call(base, key, "POST", &path, json!({ "ttl_secs": ttl_secs })).await;
    assert_eq!(status, 201, "{answer}");
    let token = answer["token"].as_str().expect("a token").to_owned();
    assert_eq!(answer["url"], format!("/sandboxes/{id}/terminal#token={token}"));
    token
}

/// Opens the terminal WebSocket of sandbox `id` with `token` (as its subprotocol) and `query`;
/// the socket, or the status of the refusal.
async fn open(base: &str, id: &str, token: Option<&str>, query: &str) -> Result<Socket, u16> {
    let url = format!("{}/v1/sandboxes/{id}/terminal{query}", base.replace("http://", "ws://"));
    let mut request = url.into_client_request().expect("a request");
    let mut protocols = "soulbox.terminal.v1".to_owned();
    if let Some(token) = token {
        protocols.push_str(&format!(", soulbox.token.{token}"));
    }
    request
        .headers_mut()
        .insert("sec-websocket-protocol", protocols.parse().expect("a header value"));
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, response)) => {
            let chosen = response.headers().get("sec-websocket-protocol");
            assert_eq!(chosen.and_then(|v| v.to_str().ok()), Some("soulbox.terminal.v1"));
            Ok(socket)
        }
        Err(tungstenite::Error::Http(response)) => Err(response.status().as_u16()),
        Err(error) => panic!("the WebSocket failed otherwise: {error}"),
    }
}

/// A terminal over its WebSocket: what it has shown and said so far.
struct Terminal {
    socket: Socket,
    screen: Vec<u8>,
    said: Vec<Value>,
}

impl Terminal {
    /// The terminal on `socket`, once it has said it started; with its pid.
    async fn started(socket: Socket) -> (Self, u64) {
        let mut terminal = Self { socket, screen: Vec::new(), said: Vec::new() };
        let started = terminal.said_next().await;
        assert_eq!(started["type"], "started", "{started}");
        let pid = started["pid"].as_u64().expect("a pid");
        (terminal, pid)
    }

    /// Reads one message; `None` when the socket closed (with its close code).
    async fn read(&mut self) -> Result<(), Option<CloseCode>> {
        let message =
            tokio::time::timeout(PATIENCE, self.socket.next()).await.unwrap_or_else(|_| {
                panic!("nothing came; the screen: {}", String::from_utf8_lossy(&self.screen))
            });
        match message {
            Some(Ok(Message::Binary(data))) => self.screen.extend_from_slice(&data),
            Some(Ok(Message::Text(text))) => {
                self.said.push(serde_json::from_str(text.as_str()).expect("JSON text messages"));
            }
            Some(Ok(Message::Close(frame))) => return Err(frame.map(|f| f.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Err(None),
        }
        Ok(())
    }

    /// Reads until the screen shows `needle` (after what was matched before); the screen
    /// from there on is kept for the next match.
    async fn shows(&mut self, needle: &[u8]) {
        loop {
            if let Some(at) = self.screen.windows(needle.len()).position(|w| w == needle) {
                self.screen.drain(..at + needle.len());
                return;
            }
            if let Err(code) = self.read().await {
                panic!(
                    "closed ({code:?}) before {:?} showed; the screen: {}",
                    String::from_utf8_lossy(needle),
                    String::from_utf8_lossy(&self.screen)
                );
            }
        }
    }

    /// The next JSON message the server sends.
    async fn said_next(&mut self) -> Value {
        while self.said.is_empty() {
            if let Err(code) = self.read().await {
                panic!("closed ({code:?}) before the server said anything");
            }
        }
        self.said.remove(0)
    }

    async fn keys(&mut self, keys: &str) {
        self.socket.send(Message::Binary(keys.as_bytes().to_vec().into())).await.expect("send");
    }

    async fn text(&mut self, message: &str) {
        self.socket.send(Message::Text(message.into())).await.expect("send");
    }
}

/// The terminals running in sandbox `id`, by pid.
fn terminals(app: &soulbox_host::app::App, id: &str) -> Vec<u64> {
    let table = app.manager().expect("a manager").process_table(id).expect("the sandbox");
    table.list().iter().filter(|p| p.request.terminal.is_some()).map(|p| u64::from(p.pid)).collect()
}

#[tokio::test]
async fn the_terminal_websocket_is_refused_before_the_upgrade_without_a_valid_token() {
    let (base, _data, app) = serve_app().await;
    let id = new_sandbox(&base).await;
    let other = new_sandbox(&base).await;
    let keys = app.keys().expect("keys");
    let tokens = app.tokens().expect("tokens");

    assert_eq!(open(&base, &id, None, "").await.err(), Some(401), "no token");
    assert_eq!(open(&base, &id, Some("not.a.token"), "").await.err(), Some(403), "garbage");
    // A session token (for the API) is not a terminal token.
    let (status, session) = call(&base, TEST_API_KEY, "POST", "/v1/tokens", json!({})).await;
    assert_eq!(status, 201);
    let session = session["token"].as_str().expect("a token");
    assert_eq!(open(&base, &id, Some(session), "").await.err(), Some(403), "a session token");
    // Nor does a terminal token open anything else: not another sandbox's terminal...
    let theirs = terminal_token(&base, TEST_API_KEY, &other, 60).await;
    assert_eq!(open(&base, &id, Some(&theirs), "").await.err(), Some(403), "another sandbox's");
    // ...nor the API.
    let bearer = format!("Bearer {theirs}");
    let (status, _, _) = http_request_with(
        "GET",
        &format!("{base}/v2/sandboxes"),
        &[("authorization", bearer.as_str())],
        None,
    )
    .await;
    assert_eq!(status, 403, "a terminal token used as an API token");
    // An expired one.
    let short = terminal_token(&base, TEST_API_KEY, &id, 1).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(open(&base, &id, Some(&short), "").await.err(), Some(403), "an expired token");
    // One whose key was revoked since.
    let (member, member_info) = keys.create(DEFAULT_TEAM, Role::Member, "member").expect("a key");
    let revoked = terminal_token(&base, &member, &id, 60).await;
    assert!(keys.revoke(&member_info.id, DEFAULT_TEAM).expect("revoke"));
    assert_eq!(open(&base, &id, Some(&revoked), "").await.err(), Some(401), "a revoked key");
    // A viewer's (the API gives viewers none; a token made for one still opens nothing).
    let (_, viewer_info) = keys.create(DEFAULT_TEAM, Role::Viewer, "viewer").expect("a key");
    let viewer =
        Principal { key_id: viewer_info.id, team: DEFAULT_TEAM.to_owned(), role: Role::Viewer };
    let (viewers, _) = tokens.issue_terminal(&viewer, &id, Duration::from_secs(60)).expect("token");
    assert_eq!(open(&base, &id, Some(&viewers), "").await.err(), Some(403), "a viewer's token");
    // Another team's admin: the sandbox is not found for it.
    let (outsider_key, outsider_info) = keys.create("other", Role::Admin, "outsider").expect("key");
    let path = format!("/v1/sandboxes/{id}/terminal/token");
    assert_eq!(call(&base, &outsider_key, "POST", &path, json!({})).await.0, 404);
    let outsider =
        Principal { key_id: outsider_info.id, team: "other".to_owned(), role: Role::Admin };
    let (outsiders, _) = tokens.issue_terminal(&outsider, &id, Duration::from_secs(60)).expect("t");
    assert_eq!(open(&base, &id, Some(&outsiders), "").await.err(), Some(404), "another team");

    assert!(terminals(&app, &id).is_empty(), "a refused WebSocket started nothing");
    let (status, audit) = call(&base, TEST_API_KEY, "GET", "/v1/audit", json!(null)).await;
    assert_eq!(status, 200);
    let action = format!("GET /v1/sandboxes/{id}/terminal");
    let refusals = audit
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| r["action"] == action.as_str() && r["status"] == 403)
        .count();
    assert!(refusals >= 1, "refused terminals are audited: {audit}");
}

#[tokio::test]
async fn the_terminal_websocket_bridges_a_pty_and_reattaches() {
    let (base, _data, app) = serve_app().await;
    let id = new_sandbox(&base).await;
    let token = terminal_token(&base, TEST_API_KEY, &id, 120).await;
    let socket = open(&base, &id, Some(&token), "?cols=100&rows=30").await.expect("opened");
    let (mut terminal, pid) = Terminal::started(socket).await;
    assert_eq!(terminals(&app, &id), vec![pid]);

    terminal.keys("stty size; id -u\n").await;
    terminal.shows(b"30 100\r\n1000\r\n").await;
    // Bytes that are not UTF-8, and NUL, pass through untouched.
    terminal.keys("printf 'bin:\\377\\000\\001:end\\n'\n").await;
    terminal.shows(b"bin:\xff\x00\x01:end").await;
    // A resize, then refused ones: each refusal is said, and the terminal goes on.
    terminal.text(r#"{"type":"resize","cols":120,"rows":40}"#).await;
    for (refused, because) in [
        (r#"{"type":"resize","cols":0,"rows":24}"#, "0x24"),
        (r#"{"type":"resize","cols":80,"rows":100000}"#, "80x100000"),
        (r#"{"type":"shout"}"#, "shout"),
        ("ls", "JSON"),
    ] {
        terminal.text(refused).await;
        let said = terminal.said_next().await;
        assert_eq!(said["type"], "error", "{refused}: {said}");
        // Each refusal is this message's own (a refused resize to 120x40 would show here).
        let message = said["message"].as_str().unwrap_or_default();
        assert!(message.contains(because), "{refused}: {said}");
    }
    assert!(terminal.said.is_empty(), "nothing else was said: {:?}", terminal.said);
    terminal.keys("stty size\n").await;
    terminal.shows(b"40 120\r\n").await;
    terminal.keys("export MARK=kept-$((40+2))\n").await;

    // The connection drops: the shell runs on, and a new connection reattaches to it.
    drop(terminal);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(terminals(&app, &id), vec![pid], "the shell outlives its connection");
    let query = format!("?pid={pid}&cols=90&rows=20");
    let socket = open(&base, &id, Some(&token), &query).await.expect("reattached");
    let (mut terminal, again) = Terminal::started(socket).await;
    assert_eq!(again, pid);
    terminal.keys("echo $MARK; stty size\n").await;
    terminal.shows(b"kept-42\r\n20 90\r\n").await;

    // The shell's exit is said, then the socket closes normally.
    terminal.keys("exit 7\n").await;
    assert_eq!(terminal.said_next().await, json!({ "type": "exit", "exit_code": 7 }));
    let closed = loop {
        if let Err(code) = terminal.read().await {
            break code;
        }
    };
    assert_eq!(closed, Some(CloseCode::Normal));
    assert!(terminals(&app, &id).is_empty());
}

#[tokio::test]
async fn the_terminal_websocket_refuses_bad_queries_and_runs_as_root_when_asked() {
    let (base, _data, app) = serve_app().await;
    let id = new_sandbox(&base).await;
    let token = terminal_token(&base, TEST_API_KEY, &id, 120).await;
    for (query, status) in [
        ("?cols=0", 400),
        ("?rows=5000", 400),
        ("?cols=ten", 400),
        ("?user=nobody", 400),
        ("?shell=zsh", 400),
        ("?pid=99999", 404),
    ] {
        assert_eq!(open(&base, &id, Some(&token), query).await.err(), Some(status), "{query}");
    }
    assert!(terminals(&app, &id).is_empty(), "a refused query started nothing");
    let socket = open(&base, &id, Some(&token), "?user=root").await.expect("opened");
    let (mut terminal, _) = Terminal::started(socket).await;
    terminal.keys("echo uid-$(id -u)\n").await;
    terminal.shows(b"uid-0\r\n").await;
    // A sandbox that is gone: not found.
    http_request("DELETE", &format!("{base}/sandboxes/{id}"), None).await;
    assert_eq!(open(&base, &id, Some(&token), "").await.err(), Some(404));
}

/// Where the browser test's Node packages are (`.ci/run` installs them with `npm ci`), or
/// why it cannot run here.
fn browser_test() -> Result<PathBuf, String> {
    let web = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("web");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".to_owned());
    if !PathBuf::from(&chromium).exists() {
        return Err(format!("no Chromium at {chromium} (apt-get install chromium)"));
    }
    if !web.join("node_modules/playwright-core").exists() {
        return Err(format!("no playwright-core in {} (npm ci there)", web.display()));
    }
    Ok(web)
}

/// Runs `tests/web/terminal.mjs` on `url` (typing `api_key` into the page's form when given);
/// what it saw.
async fn drive_the_page(web: &std::path::Path, url: &str, api_key: Option<&str>) -> Value {
    let screenshot =
        std::env::temp_dir().join(format!("soulbox-terminal-{}.png", std::process::id()));
    let output = tokio::process::Command::new("node")
        .arg(web.join("terminal.mjs"))
        .env("TERMINAL_URL", url)
        .env("API_KEY", api_key.unwrap_or(""))
        .env("SCREENSHOT", &screenshot)
        .output()
        .await
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the browser test failed:\n{stdout}\n{stderr}");
    let png = std::fs::read(&screenshot).expect("a screenshot");
    assert!(png.starts_with(b"\x89PNG"), "the page's screenshot");
    std::fs::remove_file(&screenshot).ok();
    serde_json::from_str(stdout.trim().lines().last().unwrap_or("")).expect("what it saw")
}

#[tokio::test]
async fn the_web_terminal_works_in_headless_chromium() {
    let web = match browser_test() {
        Ok(web) => web,
        Err(reason) => {
            eprintln!("SKIPPED: {reason}");
            return;
        }
    };
    let (base, _data, app) = serve_app().await;
    let id = new_sandbox(&base).await;
    let token = terminal_token(&base, TEST_API_KEY, &id, 120).await;
    let page = format!("{base}/sandboxes/{id}/terminal");
    // With a link that carries a token (as `soulbox sandbox connect --web` prints), and from
    // the bare page with an API key typed into its form.
    for (url, key) in [(format!("{page}#token={token}"), None), (page.clone(), Some(TEST_API_KEY))]
    {
        let seen = drive_the_page(&web, &url, key).await;
        assert_eq!(seen["pageErrors"], json!([]), "{seen}");
        assert_eq!(
            seen["foreignRequests"],
            json!([]),
            "the page fetches nothing elsewhere: {seen}"
        );
        assert_eq!(seen["addressAfterLoad"], page.as_str(), "the token leaves the address bar");
        assert_eq!(seen["answer"], "answer-42-uid-1000-/home/user", "{seen}");
        let size = |key: &str| -> (u32, u32) {
            let text = seen[key].as_str().expect("a size");
            let (rows, cols) =
                text.rsplit('-').next().and_then(|s| s.split_once('x')).expect("RxC");
            (rows.parse().expect("rows"), cols.parse().expect("cols"))
        };
        let (before, after) = (size("sizeBefore"), size("sizeAfter"));
        assert!(after.0 < before.0 && after.1 < before.1, "the terminal follows the page: {seen}");
        assert_eq!(seen["interrupted"], "after-130", "Ctrl-C interrupts sleep: {seen}");
        assert!(
            seen["ended"].as_str().is_some_and(|s| s.contains("exit code 3")),
            "the page says how the shell ended: {seen}"
        );
    }
    assert!(terminals(&app, &id).is_empty(), "both shells ended");
}
