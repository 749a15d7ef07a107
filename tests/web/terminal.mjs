// The web terminal in headless Chromium (Debian's), driven by playwright-core: opens the page,
// types into the terminal like a person, and reads what the page shows. Run by
// tests/all/web_terminal.rs with:
//   TERMINAL_URL  the page (with `#token=…`, or without, then API_KEY is typed into its form)
//   API_KEY       a key for the form
//   SCREENSHOT    where to save a PNG of the page at the end
// Prints one JSON line with what it saw; exits non-zero with the reason on a failure.
import { chromium } from "playwright-core";

const { TERMINAL_URL, API_KEY, SCREENSHOT } = process.env;
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";

const browser = await chromium.launch({
  executablePath,
  args: [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
  ],
});
const seen = { pageErrors: [], foreignRequests: [] };
try {
  const page = await browser.newPage({ viewport: { width: 1100, height: 700 } });
  page.on("pageerror", (error) => seen.pageErrors.push(String(error)));
  // Everything the page loads comes from the server it was opened from.
  const origin = new URL(TERMINAL_URL).origin;
  page.on("request", (request) => {
    const url = new URL(request.url());
    const sameOrigin = url.origin === origin ||
      (url.protocol.startsWith("ws") && url.host === new URL(origin).host);
    if (!sameOrigin && url.protocol !== "data:") seen.foreignRequests.push(request.url());
  });

  const screen = () => page.evaluate(() => document.querySelector(".xterm-rows")?.innerText ?? "");
  const status = () => page.evaluate(() => document.getElementById("status").textContent);
  async function waitForScreen(pattern, what) {
    try {
      await page.waitForFunction(
        (source) => new RegExp(source).test(document.querySelector(".xterm-rows")?.innerText ?? ""),
        pattern.source, { timeout: 20000, polling: 50 });
    } catch {
      throw new Error(`${what}: the screen never matched ${pattern}; it shows:\n${await screen()}\nstatus: ${await status()}`);
    }
    return (await screen()).match(pattern);
  }
  async function typeLine(text) {
    await page.keyboard.type(text);
    await page.keyboard.press("Enter");
  }

  await page.goto(TERMINAL_URL);
  seen.addressAfterLoad = page.url();
  if (API_KEY) {
    await page.waitForSelector("#login:not([hidden])");
    await page.fill("#api-key", API_KEY);
    await page.click("#login button");
  }
  await page.waitForFunction(() => document.getElementById("status").textContent.startsWith("connected"),
    null, { timeout: 20000 });
  await page.click("#terminal");

  // A command runs in the sandbox, as its user, and its output shows on the page.
  await typeLine('echo "answer-$((6*7))-uid-$(id -u)-$(pwd)"');
  seen.answer = (await waitForScreen(/answer-42-uid-\d+-\S+/, "the first command"))[0];

  // The window's size follows the page's.
  await typeLine('echo "size-$(stty size | tr " " x)"');
  seen.sizeBefore = (await waitForScreen(/size-\d+x\d+/, "stty size"))[0];
  await page.setViewportSize({ width: 700, height: 450 });
  await page.waitForTimeout(300);
  await typeLine('clear; echo "resized-$(stty size | tr " " x)"');
  seen.sizeAfter = (await waitForScreen(/resized-\d+x\d+/, "stty size after a resize"))[0];

  // Ctrl-C interrupts a running command, as in a local terminal.
  await typeLine("sleep 30");
  await page.waitForTimeout(300);
  await page.keyboard.press("Control+C");
  await typeLine('echo "after-$?"');
  seen.interrupted = (await waitForScreen(/after-\d+/, "Ctrl-C of sleep"))[0];

  // Leaving the shell ends the session, and the page says how.
  await typeLine("exit 3");
  await page.waitForFunction(() => document.getElementById("status").textContent.includes("ended"),
    null, { timeout: 20000 });
  seen.ended = await status();
  if (SCREENSHOT) await page.screenshot({ path: SCREENSHOT });
  console.log(JSON.stringify(seen));
} catch (error) {
  console.error(String(error && error.stack || error));
  console.log(JSON.stringify(seen));
  process.exitCode = 1;
} finally {
  await browser.close();
}
