"""A Playwright script in a sandbox of the Playwright template
(native-fallback/templates/playwright): it serves a page inside the sandbox, opens it in
Debian's Chromium, clicks a button, and the screenshots before and after come back as PNGs
through the SDK. Run by tests/all/templates.rs with E2B_API_URL, E2B_SANDBOX_URL,
E2B_API_KEY and TEMPLATE."""

import json
import os
import struct

from e2b import Sandbox

TEMPLATE = os.environ["TEMPLATE"]

SCRIPT = r"""
const http = require('http');
const { launch } = require('/opt/playwright/launch.cjs');
const html = `<!doctype html><html><body style="font: 32px sans-serif">
  <h1 id="state" style="color: #a00">waiting</h1>
  <button id="go" onclick="state.textContent = 'clicked'; state.style.color = '#0a0'">Go</button>
</body></html>`;
const server = http.createServer((request, response) => {
  response.writeHead(200, { 'content-type': 'text/html' });
  response.end(html);
});
server.listen(8123, '127.0.0.1', async () => {
  const browser = await launch();
  const page = await browser.newPage({ viewport: { width: 640, height: 360 } });
  await page.goto('http://127.0.0.1:8123/');
  await page.screenshot({ path: '/home/user/before.png' });
  await page.click('#go');
  const state = await page.textContent('#state');
  await page.screenshot({ path: '/home/user/after.png' });
  await browser.close();
  server.close();
  console.log(JSON.stringify({ state, browser: browser.version() }));
});
"""


def png_size(data):
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def main():
    sandbox = Sandbox.create(TEMPLATE, timeout=300)
    try:
        sandbox.files.write("/home/user/click.cjs", SCRIPT)
        result = sandbox.commands.run("node click.cjs", timeout=120)
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["state"] == "clicked", report
        before = sandbox.files.read("/home/user/before.png", format="bytes")
        after = sandbox.files.read("/home/user/after.png", format="bytes")
        assert png_size(bytes(before)) == (640, 360)
        assert png_size(bytes(after)) == (640, 360)
        assert bytes(before) != bytes(after), "the click changed nothing on the page"
        out = os.environ.get("SCREENSHOT_OUT")
        if out:
            with open(out, "wb") as f:
                f.write(bytes(after))
        print(f"chromium {report['browser']}: {len(after)} bytes", flush=True)
    finally:
        sandbox.kill()
    print("ok", flush=True)


if __name__ == "__main__":
    main()
    os._exit(0)
