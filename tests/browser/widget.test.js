// The partner widget in real headless Chromium, embedded in a page from
// another origin that sets a strict CSP and hostile CSS: its own styles, live
// updates, one connection for three widgets, text-only rendering, and refusal
// when the origin is not allowed.
'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const { launch, requireBrowser, startServer, startPartner, eventually, scoreboard } = require('./harness');

// CSS a careless or hostile partner page might carry.
const HOSTILE = '<style>* { all: unset; } html { font-size: 64px; } body { font-size: 80px !important; color: red; ' +
  'font-family: "Comic Sans MS", fantasy; } div { background: hotpink; font-size: 90px; }</style>';

// The policy from the issue: nothing inline runs, scripts and connections only
// from the spillway host.
const csp = (host) => `default-src 'none'; script-src http://${host}; connect-src http://${host} ws://${host}; style-src 'unsafe-inline'`;

/** The sample partner page as spillway serves it, made hostile. */
async function partnerPage(server) {
  const r = await fetch(`${server.url}/partner-example.html`);
  assert.equal(r.status, 200);
  const html = (await r.text()).replace('</head>', `${HOSTILE}\n</head>`);
  assert.ok(html.includes(`src="http://${server.addr}/embed.js"`), 'the sample points at this server');
  return { body: html, headers: { 'Content-Security-Policy': csp(server.addr) } };
}

/** Records CSP violations and errors the page reports. */
async function watch(page) {
  const problems = [];
  page.on('console', (m) => { if (m.type() === 'error') problems.push(m.text()); });
  page.on('pageerror', (e) => problems.push(String(e)));
  await page.addInitScript(() => {
    document.addEventListener('securitypolicyviolation', (e) => {
      (window.__violations = window.__violations || []).push(`${e.violatedDirective} ${e.blockedURI}`);
    });
  });
  return problems;
}

const inWidget = (page, topic, selector, what = 'textContent') => page.evaluate(
  ([topic, selector, what]) => {
    const host = document.querySelector(`[data-spillway-topic="${topic}"]`);
    const node = host && host.shadowRoot && host.shadowRoot.querySelector(selector);
    if (!node) return null;
    if (what === 'textContent') return node.textContent;
    const style = getComputedStyle(node);
    return { fontSize: style.fontSize, fontFamily: style.fontFamily, background: style.backgroundColor, color: style.color, display: style.display };
  },
  [topic, selector, what],
);

test('widgets on a hostile partner page with a strict CSP keep their styles, update live and share one connection', async (t) => {
  const pw = requireBrowser(t);
  if (!pw) return;
  const pages = {};
  const partner = await startPartner(pages);
  const server = await startServer(['--allow-origin', partner.origin]);
  const browser = await launch(pw, { colorScheme: 'light' });
  t.after(async () => { await browser.close(); await server.stop(); await partner.close(); });
  await server.publish('demo', scoreboard(1, 0));
  await server.publish('match-42', scoreboard(3, 2));
  const evil = '<img src=x onerror="window.__pwned=1">';
  await server.publish('match-43', { headline: evil, turnout: '61.2%' });
  pages['/'] = await partnerPage(server);

  const page = await browser.newPage();
  const problems = await watch(page);
  await page.goto(`${partner.url}/`);
  await eventually(async () => (await inWidget(page, 'match-42', '.sb-home .sb-score')) === '3', 15000, 'the widget to render');
  await eventually(async () => (await inWidget(page, 'demo', '.sb-away .sb-score')) === '0', 15000, 'the demo widget');
  await eventually(async () => (await inWidget(page, 'match-43', 'dd')) === evil, 15000, 'the generic widget');
  assert.equal(await page.evaluate(() => document.querySelectorAll('[data-spillway-topic]').length), 3);

  // Its own computed styles, whatever the page says.
  const card = await inWidget(page, 'match-42', '.w', 'style');
  assert.equal(card.fontSize, '14px');
  assert.equal(card.display, 'block');
  assert.match(card.fontFamily, /system-ui/);
  assert.notEqual(card.background, 'rgb(255, 105, 180)', 'the partner pink does not reach in');
  assert.equal((await inWidget(page, 'match-42', '.sb-score', 'style')).fontSize, '36px');
  // data-theme="dark" and "light" on the tags, and the page's own (light)
  // scheme for the one without.
  assert.equal((await inWidget(page, 'match-42', '.w', 'style')).background, 'rgb(15, 23, 42)');
  assert.equal((await inWidget(page, 'match-43', '.w', 'style')).background, 'rgb(255, 255, 255)');
  assert.equal((await inWidget(page, 'demo', '.w', 'style')).background, 'rgb(255, 255, 255)');

  // Live.
  await server.publish('match-42', scoreboard(4, 2));
  await eventually(async () => (await inWidget(page, 'match-42', '.sb-home .sb-score')) === '4', 15000, 'the live update');
  await eventually(async () => (await inWidget(page, 'match-42', '.st')) === 'Live', 5000, 'the live status');

  // One connection for three widgets.
  const connections = await server.connections();
  assert.equal(connections.length, 1, JSON.stringify(connections));
  assert.equal(connections[0].transport, 'ws');
  const metrics = await (await fetch(`${server.url}/metrics`)).text();
  const ws = metrics.match(/^spillway_connections\{transport="ws"\} (\d+)/m);
  if (ws) assert.equal(ws[1], '1');

  // Text, never markup; and nothing the CSP had to block.
  assert.equal(await page.evaluate(() => {
    let n = document.querySelectorAll('img').length;
    document.querySelectorAll('[data-spillway-topic]').forEach((h) => { n += h.shadowRoot.querySelectorAll('img').length; });
    return n;
  }), 0);
  assert.equal(await page.evaluate(() => window.__pwned), undefined);
  assert.deepEqual(await page.evaluate(() => window.__violations || []), []);
  assert.deepEqual(problems.filter((p) => /Content Security Policy|Refused/i.test(p)), []);
});

test('a widget on an origin that is not allowed is refused', async (t) => {
  const pw = requireBrowser(t);
  if (!pw) return;
  const pages = {};
  const partner = await startPartner(pages);
  const server = await startServer(['--allow-origin', 'https://allowed.example']);
  const browser = await launch(pw);
  t.after(async () => { await browser.close(); await server.stop(); await partner.close(); });
  await server.publish('match-42', scoreboard(3, 2));
  pages['/'] = await partnerPage(server);

  // The server refuses this origin on every transport.
  const origin = { Origin: partner.origin };
  assert.equal((await fetch(`${server.url}/v1/events?topic=match-42`, { headers: origin })).status, 403);
  assert.equal((await fetch(`${server.url}/v1/topics/match-42?since=0000000000000001:1`, { headers: origin })).status, 403);

  const page = await browser.newPage();
  await watch(page);
  await page.goto(`${partner.url}/`);
  await eventually(async () => (await inWidget(page, 'match-42', '.st')) !== null, 10000, 'the widget shell');
  // It never shows the state, and ends up saying live updates are unavailable.
  await eventually(async () => (await inWidget(page, 'match-42', '.st')) === 'Live updates unavailable', 40000, 'the refusal');
  assert.equal(await inWidget(page, 'match-42', '.sb-score'), null);
  assert.match(await inWidget(page, 'match-42', '.bd'), /Waiting for match-42/);
  assert.deepEqual(await server.connections(), []);
});
