// The operator page in real headless Chromium: log in through the form, watch
// the live figures from /admin/events move after a publish, log out.
'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const { launch, requireBrowser, startServer, eventually } = require('./harness');

const ADMIN = 'browser-admin-token';
const figure = (page, path) => page.locator(`[data-figure="${path}"]`).textContent();

test('an operator logs in through the form and sees the figures move after a publish', async (t) => {
  const pw = requireBrowser(t);
  if (!pw) return;
  const server = await startServer(['--admin-token', ADMIN]);
  const browser = await launch(pw, { viewport: { width: 390, height: 844 } });
  t.after(async () => { await browser.close(); await server.stop(); });

  const page = await browser.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  // Failed loads are expected here (the favicon, the 401 of the wrong token);
  // script errors are not.
  page.on('console', (m) => { if (m.type() === 'error' && !/Failed to load resource/.test(m.text())) errors.push(m.text()); });

  await page.goto(`${server.url}/admin`);
  // A wrong token first: the form again, with the reason.
  await page.fill('#token', 'not-the-token');
  await Promise.all([page.waitForNavigation(), page.click('button[type="submit"]')]);
  assert.match(await page.locator('#login-error').textContent(), /not the admin token/);

  await page.fill('#token', ADMIN);
  await Promise.all([page.waitForNavigation(), page.click('button[type="submit"]')]);
  assert.equal(new URL(page.url()).pathname, '/admin');
  await eventually(async () => (await page.locator('#status').getAttribute('data-state')) === 'live', 15000, 'the page to go live');
  assert.equal(await figure(page, 'publishes.ok'), '0');
  // Nothing is stuck on an idle hub; no publish has been timed yet, so its
  // latency shows a dash.
  assert.equal(await figure(page, 'bytes_in_flight'), '0 B');
  assert.equal(await figure(page, 'publish_latency_ms'), '—');
  assert.match(await figure(page, 'process.rss_bytes'), /MiB|KiB/);

  await server.publish('board', { n: 1 });
  await eventually(async () => (await figure(page, 'publishes.ok')) === '1', 15000, 'the publish count to move');
  assert.equal(await figure(page, 'topics'), '1');
  // The sparkline has points by now.
  await eventually(async () => (await page.locator('#spark-rss polyline').getAttribute('points')).length > 0, 15000, 'a sparkline');
  // The session cookie is out of scripts' reach.
  assert.equal(await page.evaluate(() => document.cookie), '');

  await Promise.all([page.waitForNavigation(), page.click('#logout')]);
  assert.equal(await page.locator('#token').count(), 1, 'logged out: the form again');
  assert.deepEqual(errors, []);
});
