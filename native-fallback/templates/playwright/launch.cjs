// Launches Debian's Chromium for playwright-core inside a SoulBox sandbox:
//
//   const { launch } = require('/opt/playwright/launch.cjs');
//   const browser = await launch();
//
// The sandbox is the isolation: Chromium's own sandbox (which needs user namespaces) is off,
// and it keeps its shared memory in /tmp rather than the sandbox's small /dev/shm.
const { chromium } = require('playwright-core');

const CHROMIUM = process.env.PLAYWRIGHT_CHROMIUM || '/usr/bin/chromium';

function launch(options = {}) {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    ...options,
    args: ['--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu', ...(options.args || [])],
  });
}

module.exports = { launch };
