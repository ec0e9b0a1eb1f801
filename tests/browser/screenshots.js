// Regenerates docs/screenshots/*.png: the scoreboard page at desktop and
// phone widths, and the partner widget in both themes. Not a test (it writes
// into docs/), so run it by hand after a visual change:
//
//   node tests/browser/screenshots.js
'use strict';
const fs = require('node:fs');
const path = require('node:path');
const { REPO, launch, startServer, startPartner, eventually, scoreboard } = require('./harness');

const OUT = path.join(REPO, 'docs', 'screenshots');

const match = scoreboard(2, 1, {
  clock: '67:12',
  events: [
    { minute: 12, text: 'Goal! Okafor (Riverside Rovers) 1–0' },
    { minute: 38, text: 'Yellow card: Alves (Harbour City)' },
    { minute: 45, text: 'Half time: Riverside Rovers 1–0 Harbour City' },
    { minute: 51, text: 'Goal! Tanaka (Harbour City) 1–1' },
    { minute: 64, text: 'Goal! Moreau (Riverside Rovers) 2–1' },
  ],
});

async function main() {
  const playwright = require('playwright-core');
  fs.mkdirSync(OUT, { recursive: true });
  const server = await startServer();
  const pages = {};
  const partner = await startPartner(pages);
  try {
    await server.publish('match-42', match);
    await server.publish('election-2026', { counted: '61.2%', leading: 'Greens', seats_declared: 412, turnout: '68.4%' });
    await server.publish('match-43', scoreboard(0, 0, { clock: '00:00', period: '1st half', status: 'Scheduled', events: [] }));

    const shots = [
      { name: 'page-desktop.png', viewport: { width: 1280, height: 800 }, url: '/t/match-42' },
      { name: 'page-phone.png', viewport: { width: 360, height: 740 }, url: '/t/match-42', scale: 2 },
      { name: 'page-dark-phone.png', viewport: { width: 360, height: 740 }, url: '/t/match-42', scale: 2, scheme: 'dark' },
      { name: 'topics-desktop.png', viewport: { width: 1280, height: 600 }, url: '/' },
    ];
    for (const shot of shots) {
      const browser = await launch(playwright, { viewport: shot.viewport, deviceScaleFactor: shot.scale || 1, colorScheme: shot.scheme || 'light' });
      const page = await browser.newPage();
      await page.goto(server.url + shot.url);
      await eventually(async () => (await page.locator('#status').getAttribute('data-state')) === 'live', 15000, 'live');
      await page.waitForTimeout(300);
      await page.screenshot({ path: path.join(OUT, shot.name), fullPage: true });
      await browser.close();
      console.log(`wrote docs/screenshots/${shot.name}`);
    }

    const html = await (await fetch(`${server.url}/partner-example.html`)).text();
    pages['/'] = { body: html.replace(/data-topic="demo"/, 'data-topic="election-2026"') };
    for (const scheme of ['light', 'dark']) {
      const browser = await launch(playwright, { viewport: { width: 520, height: 900 }, deviceScaleFactor: 2, colorScheme: scheme });
      const page = await browser.newPage();
      await page.goto(partner.url + '/');
      await eventually(() => page.evaluate(() => document.querySelectorAll('[data-spillway-topic][data-state="live"]').length === 3), 15000, 'widgets live');
      await page.waitForTimeout(1200);
      const name = `widget-${scheme}.png`;
      await page.screenshot({ path: path.join(OUT, name), fullPage: true });
      await browser.close();
      console.log(`wrote docs/screenshots/${name}`);
    }
  } finally {
    await partner.close();
    await server.stop();
  }
}

main().catch((e) => {
  console.error(e);
  process.exitCode = 1;
});
