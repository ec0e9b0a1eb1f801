// The scoreboard page in real headless Chromium: server rendering with
// JavaScript off, live updates, zombie detection and resume after the server
// froze, the fallback to SSE, and publisher data that tries to be HTML.
'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const { launch, requireBrowser, startServer, eventually, scoreboard } = require('./harness');

const score = (page, side) => page.locator(`#board .sb-${side} .sb-score`).textContent();
const status = (page) => page.locator('#status').getAttribute('data-state');
const stats = (page) => page.evaluate(() => Object.assign({}, window.spillway.hub().stats));

test('the page shows the server-rendered score with JavaScript disabled', async (t) => {
  const pw = requireBrowser(t);
  if (!pw) return;
  const server = await startServer();
  const browser = await launch(pw, { javaScriptEnabled: false });
  t.after(async () => { await browser.close(); await server.stop(); });
  await server.publish('match-1', scoreboard(2, 1));

  const page = await browser.newPage();
  const response = await page.goto(`${server.url}/t/match-1`);
  assert.equal(response.status(), 200);
  assert.equal(await score(page, 'home'), '2');
  assert.equal(await score(page, 'away'), '1');
  assert.match(await page.locator('#board .sb-home .sb-name').textContent(), /Riverside Rovers/);
  assert.equal(await page.locator('#board .sb-events li').count(), 3);
  // Newest event first.
  assert.match(await page.locator('#board .sb-events li').first().textContent(), /Tanaka/);
  assert.match(await page.locator('#updated').textContent(), /updated \d+ s ago/);
  assert.match(await page.title(), /Riverside Rovers 2–1 Harbour City/);

  // The topic list, and a topic nobody has published yet.
  await page.goto(`${server.url}/`);
  assert.match(await page.locator('#topics').textContent(), /match-1.*Riverside Rovers 2 – 1 Harbour City/s);
  const missing = await page.goto(`${server.url}/t/not-yet`);
  assert.equal(missing.status(), 404);
  assert.match(await page.locator('#board').textContent(), /will appear here as soon as it is/);
});

test('a publish appears on the live page, announced politely; an unknown topic waits for its first publish', async (t) => {
  const pw = requireBrowser(t);
  if (!pw) return;
  const server = await startServer();
  const browser = await launch(pw);
  t.after(async () => { await browser.close(); await server.stop(); });
  await server.publish('match-2', scoreboard(0, 0));

  const page = await browser.newPage();
  await page.goto(`${server.url}/t/match-2`);
  await eventually(async () => (await status(page)) === 'live', 15000, 'the page to go live');
  assert.equal(await page.locator('#status').textContent(), 'Live');
  await server.publish('match-2', scoreboard(1, 0));
  await eventually(async () => (await score(page, 'home')) === '1', 15000, 'the new score');
  assert.equal(await page.locator('[aria-live="polite"]').textContent(), 'Score: Riverside Rovers 1, Harbour City 0');
  const s = await stats(page);
  assert.equal(s.transport, 'ws');
  // The page was rendered at the current version, so the server sent no
  // snapshot on connect, and the change came as a merge patch.
  assert.equal(s.snapshots, 0, JSON.stringify(s));
  assert.ok(s.patches >= 1, JSON.stringify(s));

  const waiting = await browser.newPage();
  await waiting.goto(`${server.url}/t/later`);
  await eventually(async () => (await status(waiting)) === 'live', 15000, 'the waiting page to go live');
  await server.publish('later', scoreboard(4, 4));
  await eventually(async () => (await score(waiting, 'home')) === '4', 15000, 'the first publish on a waiting page');
});

test('a frozen server shows "reconnecting" within 2.5 heartbeats; thawed, the page resumes without a reload or a resent snapshot', async (t) => {
  const pw = requireBrowser(t);
  if (!pw) return;
  const server = await startServer(['--heartbeat', '1s']);
  const browser = await launch(pw);
  t.after(async () => { await browser.close(); await server.stop(); });
  await server.publish('match-3', scoreboard(1, 1));

  const page = await browser.newPage();
  await page.goto(`${server.url}/t/match-3`);
  await eventually(async () => (await status(page)) === 'live', 15000, 'live');
  await page.evaluate(() => { window.__sameDocument = true; });
  const before = await stats(page);

  process.kill(server.proc.pid, 'SIGSTOP');
  const frozenAt = Date.now();
  let thawed = false;
  t.after(() => { if (!thawed) process.kill(server.proc.pid, 'SIGCONT'); });
  await eventually(async () => ['reconnecting', 'stale'].includes(await status(page)), 8000, 'reconnecting');
  const noticed = Date.now() - frozenAt;
  console.log(`# noticed the frozen server after ${noticed} ms (heartbeat 1000 ms)`);
  // 2.5 heartbeats, plus the time since the last frame was at most one
  // heartbeat ago, plus polling slack.
  assert.ok(noticed < 4500, `took ${noticed} ms`);
  assert.equal(await page.locator('#status').textContent(), 'Reconnecting…');

  await new Promise((r) => setTimeout(r, 1500));
  process.kill(server.proc.pid, 'SIGCONT');
  thawed = true;
  await eventually(async () => (await status(page)) === 'live', 30000, 'live again');
  const after = await stats(page);
  assert.equal(await page.evaluate(() => window.__sameDocument), true, 'the page was not reloaded');
  assert.ok(after.connects > before.connects, 'it reconnected');
  assert.equal(after.snapshots, before.snapshots, 'nothing was resent: the client resumed from EPOCH:VERSION');

  await server.publish('match-3', scoreboard(2, 1));
  await eventually(async () => (await score(page, 'home')) === '2', 15000, 'an update after the resume');
});

test('with WebSocket disabled the client falls back to SSE and still updates', async (t) => {
  const pw = requireBrowser(t);
  if (!pw) return;
  const server = await startServer(['--disable-websocket']);
  const browser = await launch(pw);
  t.after(async () => { await browser.close(); await server.stop(); });
  await server.publish('match-4', scoreboard(0, 2));

  const page = await browser.newPage();
  await page.goto(`${server.url}/t/match-4`);
  await eventually(async () => (await status(page)) === 'live', 20000, 'live over SSE');
  assert.equal((await stats(page)).transport, 'sse');
  await server.publish('match-4', scoreboard(0, 3));
  await eventually(async () => (await score(page, 'away')) === '3', 15000, 'the update over SSE');
  const connections = await server.connections();
  assert.deepEqual(connections.map((c) => c.transport), ['sse']);
  // What worked is remembered for this origin: the next page starts on SSE.
  const remembered = await page.evaluate((k) => localStorage.getItem(k), `spillway:transport:${server.url}`);
  assert.match(remembered, /^sse \d+$/);
  const second = await browser.newPage();
  await second.goto(`${server.url}/t/match-4`);
  await eventually(async () => (await status(second)) === 'live', 15000, 'the second page live');
  assert.equal((await stats(second)).connects, 1, 'no failed upgrade first');
});

test('publisher data that looks like HTML renders as text on the page', async (t) => {
  const pw = requireBrowser(t);
  if (!pw) return;
  const server = await startServer();
  const browser = await launch(pw);
  t.after(async () => { await browser.close(); await server.stop(); });
  const evil = '<img src=x onerror="window.__pwned=1">';
  await server.publish('evil', { headline: evil, count: 3 });

  const page = await browser.newPage();
  await page.goto(`${server.url}/t/evil`);
  await eventually(async () => (await status(page)) === 'live', 15000, 'live');
  assert.equal(await page.locator('#board dl.kv dd').first().textContent(), evil);
  await server.publish('evil', { home: { name: evil, score: 1 }, away: { name: 'x', score: '<b>2</b>' } });
  await eventually(async () => (await page.locator('#board .sb-home .sb-name').count()) === 1, 15000, 'the update');
  assert.equal(await page.locator('#board .sb-home .sb-name').textContent(), evil);
  assert.equal(await page.locator('#board .sb-away .sb-score').textContent(), '<b>2</b>');
  assert.equal(await page.locator('img').count(), 0);
  assert.equal(await page.locator('#board b').count(), 0);
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(await page.evaluate(() => window.__pwned), undefined);
});
