// The web terminal's page: xterm.js on the WebSocket of /v1/sandboxes/{id}/terminal
// (host/src/terminal.rs describes the protocol). The token comes from the page's fragment
// (#token=…), or from an API key typed into the form; it is never put in a URL sent anywhere.
"use strict";

(() => {
  const sandboxId = decodeURIComponent(location.pathname.split("/")[2] || "");
  const statusLine = document.getElementById("status");
  const loginForm = document.getElementById("login");
  document.getElementById("sandbox-id").textContent = sandboxId;

  const term = new Terminal({ cursorBlink: true, scrollback: 5000, fontFamily: "monospace" });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(document.getElementById("terminal"));
  fit.fit();
  window.addEventListener("resize", () => fit.fit());

  let token = new URLSearchParams(location.hash.slice(1)).get("token");
  // The token leaves the address bar (and the history) at once.
  history.replaceState(null, "", location.pathname + location.search);

  let socket = null;
  let pid = null;
  let ended = false;
  const encoder = new TextEncoder();

  function status(text, isError) {
    statusLine.textContent = text;
    statusLine.classList.toggle("error", Boolean(isError));
  }

  function send(data) {
    if (socket && socket.readyState === WebSocket.OPEN) socket.send(data);
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const query = new URLSearchParams({ cols: term.cols, rows: term.rows });
    if (pid !== null) query.set("pid", pid);
    const url = `${scheme}//${location.host}/v1/sandboxes/${encodeURIComponent(sandboxId)}/terminal?${query}`;
    status("connecting…");
    let opened = false;
    socket = new WebSocket(url, ["soulbox.terminal.v1", "soulbox.token." + token]);
    socket.binaryType = "arraybuffer";
    socket.onopen = () => { opened = true; };
    socket.onmessage = (event) => {
      if (typeof event.data !== "string") {
        term.write(new Uint8Array(event.data));
        return;
      }
      const message = JSON.parse(event.data);
      if (message.type === "started") {
        pid = message.pid;
        status(`connected (pid ${pid})`);
        term.focus();
      } else if (message.type === "exit") {
        ended = true;
        const how = message.signal !== undefined ? `signal ${message.signal}` : `exit code ${message.exit_code}`;
        status(`the shell ended (${how}); reload the page for a new one`);
      } else if (message.type === "error") {
        status(message.message, true);
      }
    };
    socket.onclose = () => {
      socket = null;
      if (ended) return;
      if (!opened) {
        status("the server refused the terminal: the token may have expired. " +
               "Get a new link with `soulbox sandbox connect " + sandboxId + " --web`.", true);
        askForKey();
        return;
      }
      status("disconnected; the shell keeps running. Press a key to reconnect.", true);
      const waiting = term.onKey(() => { waiting.dispose(); connect(); });
    };
  }

  term.onData((data) => send(encoder.encode(data)));
  term.onBinary((data) => send(Uint8Array.from(data, (c) => c.charCodeAt(0) & 0xff)));
  term.onResize(({ cols, rows }) => send(JSON.stringify({ type: "resize", cols, rows })));

  function askForKey() {
    loginForm.hidden = false;
    document.getElementById("api-key").focus();
  }

  loginForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = document.getElementById("api-key").value.trim();
    status("getting a terminal token…");
    try {
      const response = await fetch(`/v1/sandboxes/${encodeURIComponent(sandboxId)}/terminal/token`, {
        method: "POST",
        headers: { "X-API-KEY": key, "Content-Type": "application/json" },
        body: "{}",
      });
      const body = await response.json();
      if (!response.ok) {
        status(body.error?.message || body.message || `refused (${response.status})`, true);
        return;
      }
      token = body.token;
      loginForm.hidden = true;
      document.getElementById("api-key").value = "";
      connect();
    } catch (error) {
      status(`could not reach the server: ${error}`, true);
    }
  });

  if (token) {
    connect();
  } else {
    status("enter an API key to open the terminal");
    askForKey();
  }
})();
