// Shared helpers for the browser tests: spawn the real server on port 0 with a
// fresh data directory, drive Debian's Chromium through playwright-core, and
// a second tiny HTTP server that plays a partner site on another origin.
'use strict';
const { spawn, execFileSync } = require('node:child_process');
const fs = require('node:fs');
const http = require('node:http');
const os = require('node:os');
const path = require('node:path');

const REPO = path.resolve(__dirname, '..', '..');
const BIN = process.env.SPILLWAY_BIN || path.join(REPO, 'target', 'debug', 'spillway');
const CHROMIUM = process.env.CHROMIUM_BIN || '/usr/bin/chromium';
const TOKEN = 'browser-test-token';

function tmpdir(prefix) {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

/** Whether the browser is usable; with CI=true a missing one is a failure. */
function requireBrowser(t) {
  let playwright = null;
  try {
    playwright = require('playwright-core');
  } catch (e) {
    playwright = null;
  }
  const ok = fs.existsSync(CHROMIUM) && playwright;
  if (ok) return playwright;
  const why = !playwright ? 'playwright-core is not installed (run tests/browser/setup.sh)' : `no browser at ${CHROMIUM} (run tests/browser/setup.sh)`;
  if (process.env.CI === 'true') throw new Error(why);
  t.skip(why);
  return null;
}

let versionShown = false;
function showVersion() {
  if (versionShown) return;
  versionShown = true;
  try {
    const v = execFileSync(CHROMIUM, ['--version'], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim();
    console.log(`# browser: ${v}`);
  } catch (e) {
    console.log(`# browser: ${CHROMIUM} (version unknown: ${e.message})`);
  }
}

/**
 * Launches Chromium with a fresh profile. Returns a Playwright
 * BrowserContext; `close()` also removes the profile.
 */
async function launch(playwright, options = {}) {
  showVersion();
  const profile = tmpdir('spillway-chromium-');
  const context = await playwright.chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    javaScriptEnabled: options.javaScriptEnabled !== false,
    viewport: options.viewport || { width: 1280, height: 800 },
    deviceScaleFactor: options.deviceScaleFactor || 1,
    colorScheme: options.colorScheme || 'light',
    args: [
      '--headless',
      '--no-sandbox',
      '--disable-gpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
      // Hidden or headless pages must not have their timers throttled while
      // a test waits on them.
      '--disable-background-timer-throttling',
      '--disable-renderer-backgrounding',
    ],
  });
  const close = context.close.bind(context);
  context.close = async () => {
    await close().catch(() => {});
    fs.rmSync(profile, { recursive: true, force: true });
  };
  return context;
}

/** Spawns the server; resolves once it logs `listening on ADDR`. */
async function startServer(args = [], options = {}) {
  if (!fs.existsSync(BIN)) throw new Error(`no server binary at ${BIN}; build it or set SPILLWAY_BIN`);
  const dataDir = options.dataDir || tmpdir('spillway-data-');
  const listen = options.listen || '127.0.0.1:0';
  const proc = spawn(BIN, ['--listen', listen, '--data-dir', dataDir, '--publish-token', TOKEN, ...args], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, NO_COLOR: '1', RUST_LOG: process.env.RUST_LOG || 'info' },
  });
  let log = '';
  const addr = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`server did not start:\n${log}`)), 20000);
    proc.stderr.on('data', (chunk) => {
      log += chunk.toString();
      // eslint-disable-next-line no-control-regex
      const m = log.replace(/\x1b\[[0-9;]*m/g, '').match(/listening on (\S+)/);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    proc.on('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`server exited with ${code}:\n${log}`));
    });
  });
  proc.removeAllListeners('exit');
  const url = `http://${addr}`;
  const server = {
    url,
    addr,
    proc,
    dataDir,
    log: () => log,
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) {
        try { process.kill(proc.pid, 'SIGCONT'); } catch (e) { /* gone */ }
        const exited = new Promise((resolve) => proc.once('exit', resolve));
        process.kill(proc.pid, 'SIGTERM');
        const timeout = new Promise((resolve) => setTimeout(() => resolve('timeout'), 8000));
        if ((await Promise.race([exited, timeout])) === 'timeout') process.kill(proc.pid, 'SIGKILL');
      }
      if (!options.dataDir) fs.rmSync(dataDir, { recursive: true, force: true });
    },
    async publish(topic, state) {
      const r = await fetch(`${url}/v1/topics/${encodeURIComponent(topic)}`, {
        method: 'PUT',
        headers: { Authorization: `Bearer ${TOKEN}`, 'Content-Type': 'application/json' },
        body: JSON.stringify(state),
      });
      if (!r.ok) throw new Error(`publish ${topic}: ${r.status} ${await r.text()}`);
      return r.json();
    },
    async connections() {
      const r = await fetch(`${url}/v1/connections`, { headers: { Authorization: `Bearer ${TOKEN}` } });
      if (!r.ok) throw new Error(`/v1/connections: ${r.status}`);
      return (await r.json()).connections;
    },
  };
  return server;
}

/**
 * A second origin: serves `pages` (path → {body, headers}) on another
 * loopback address, like a partner site embedding the widget.
 */
async function startPartner(pages, host = '127.0.0.2') {
  const srv = http.createServer((req, res) => {
    const page = pages[req.url.split('?')[0]];
    if (!page) {
      res.writeHead(404, { 'Content-Type': 'text/plain' });
      return res.end('not found');
    }
    res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8', ...(page.headers || {}) });
    res.end(page.body);
  });
  await new Promise((resolve, reject) => {
    srv.once('error', reject);
    srv.listen(0, host, resolve);
  });
  const { port } = srv.address();
  return { url: `http://${host}:${port}`, origin: `http://${host}:${port}`, close: () => new Promise((r) => srv.close(r)) };
}

/** Polls `fn` until it returns a truthy value or `ms` pass. */
async function eventually(fn, ms = 15000, what = 'condition') {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what} (last: ${last})`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

const scoreboard = (home, away, extra = {}) => ({
  home: { name: 'Riverside Rovers', score: home },
  away: { name: 'Harbour City', score: away },
  clock: '67:12',
  period: '2nd half',
  status: 'Live',
  events: [
    { minute: 12, text: 'Goal! Okafor (Riverside Rovers) 1–0' },
    { minute: 38, text: 'Yellow card: Alves (Harbour City)' },
    { minute: 61, text: 'Goal! Tanaka (Harbour City) 1–1' },
  ],
  ...extra,
});

module.exports = { REPO, TOKEN, launch, requireBrowser, startServer, startPartner, eventually, scoreboard, tmpdir };
