/* spillway widget: <script src="https://HOST/embed.js" data-topic="match-42" async></script>
 * renders a live scoreboard where the tag stands, inside a Shadow DOM so the
 * partner's CSS cannot reach it. The server serves this file with client.js
 * and render.js in front; every widget on a page shares one connection.
 * No inline script, no eval, no inline style attribute: styles go in through
 * a constructable stylesheet, so a strict CSP needs nothing for them. */
(function (G) {
  'use strict';
  var S = G.spillway, doc = G.document, me = doc.currentScript;
  if (!S || !S.render || !me || !me.dataset.topic) return;
  var base = new URL(me.src, G.location.href).origin, topic = me.dataset.topic;
  var theme = me.dataset.theme === 'dark' || me.dataset.theme === 'light' ? me.dataset.theme : 'auto';

  // Sizes are in px, never em or rem, so a partner's huge root font cannot
  // reach in; `all: initial` on the host and the card cuts inheritance.
  var CSS = [
    ':host{all:initial!important;display:block!important;contain:content;max-width:420px;margin:8px 0!important}',
    '.w{all:initial;display:block;box-sizing:border-box;font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;',
    'border-radius:12px;padding:12px 14px;background:#fff;color:#0f172a;border:1px solid #d8dee9;box-shadow:0 1px 3px rgba(15,23,42,.08)}',
    '.w *{box-sizing:border-box;margin:0;padding:0;font:inherit;color:inherit;text-align:left;letter-spacing:normal}',
    '.dark{background:#0f172a;color:#e2e8f0;border-color:#1e293b}',
    '@media (prefers-color-scheme:dark){.auto{background:#0f172a;color:#e2e8f0;border-color:#1e293b}}',
    '.hd,.ft{display:flex;align-items:center;gap:8px;font-size:12px;opacity:.75}',
    '.hd{justify-content:space-between;margin-bottom:6px}',
    '.ft{margin-top:8px}',
    '.dot{width:8px;height:8px;border-radius:50%;background:#94a3b8;flex:none}',
    '[data-state=live] .dot{background:#16a34a}',
    '[data-state=reconnecting] .dot,[data-state=stale] .dot{background:#d97706}',
    '[data-state=offline] .dot{background:#dc2626}',
    '.ft a{margin-left:auto;text-decoration:none;color:inherit}',
    '.ft a:hover{text-decoration:underline}',
    '.sb-top{display:flex;gap:8px;align-items:center;justify-content:center;font-size:12px;text-transform:uppercase;letter-spacing:.06em;opacity:.8}',
    '.sb-clock{font-variant-numeric:tabular-nums;font-weight:600}',
    '.sb-status{border-radius:4px;padding:1px 6px;background:rgba(100,116,139,.18);font-weight:700}',
    '.sb-st-live{background:#dc2626;color:#fff}',
    '.sb-teams{display:grid;grid-template-columns:1fr auto 1fr;align-items:center;gap:6px;margin:6px 0}',
    '.sb-team{display:flex;flex-direction:column;align-items:center;min-width:0}',
    '.sb-name{font-size:13px;font-weight:600;text-align:center;overflow-wrap:anywhere}',
    '.sb-score{font-size:36px;line-height:1.1;font-weight:800;font-variant-numeric:tabular-nums}',
    '.sb-sep{font-size:24px;opacity:.5}',
    '.sb-events{list-style:none;border-top:1px solid rgba(100,116,139,.25);padding-top:6px;max-height:100px;overflow:auto}',
    '.sb-events li{display:flex;gap:8px;font-size:12px;padding:1px 0}',
    '.sb-min{flex:none;width:32px;text-align:right;font-variant-numeric:tabular-nums;opacity:.7}',
    '.kv div{display:flex;gap:8px;padding:2px 0;border-bottom:1px solid rgba(100,116,139,.18)}',
    '.kv dt{font-weight:600;flex:none;max-width:40%;overflow-wrap:anywhere}',
    '.kv dd{overflow-wrap:anywhere}',
    '.empty{opacity:.7;text-align:center;padding:12px 0}',
    '.sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap}'
  ].join('\n');

  var host = doc.createElement('div');
  host.setAttribute('data-spillway-topic', topic);
  if (me.parentNode && me.parentNode !== doc.head) me.parentNode.insertBefore(host, me);
  else doc.body.appendChild(host);
  var root = host.attachShadow({ mode: 'open' });
  if (root.adoptedStyleSheets && G.CSSStyleSheet && CSSStyleSheet.prototype.replaceSync) {
    // One sheet shared by every widget of the page.
    if (!S.widgetSheet) { S.widgetSheet = new CSSStyleSheet(); S.widgetSheet.replaceSync(CSS); }
    root.adoptedStyleSheets = [S.widgetSheet];
  } else {
    root.appendChild(S.el('style', null, CSS));
  }

  var el = S.el, dot = el('span', 'dot'), state = el('span', 'st', 'Connecting…'), ago = el('span', 'ago');
  var body = el('div', 'bd', null, [el('p', 'empty', 'Waiting for ' + topic + '…')]);
  var link = el('a', null, 'spillway ↗');
  link.href = base + '/t/' + encodeURIComponent(topic);
  link.target = '_blank';
  link.rel = 'noopener';
  var say = el('div', 'sr');
  say.setAttribute('aria-live', 'polite');
  var card = el('div', 'w ' + theme, null, [el('div', 'hd', null, [el('span', 'tp', topic)]), body, el('div', 'ft', null, [dot, state, ago, link]), say]);
  card.setAttribute('role', 'region');
  card.setAttribute('aria-label', 'Live: ' + topic);
  root.appendChild(card);

  var prev = null, at = null;
  S.subscribe([topic], function (t, s, meta) {
    if (meta.deleted) {
      body.replaceChildren(el('p', 'empty', 'This topic has ended.'));
      prev = null;
      return;
    }
    var line = S.announce(prev, s);
    body.replaceChildren(S.render(s));
    if (line) say.textContent = line;
    prev = s;
    at = meta.updated_at;
    host.setAttribute('data-version', meta.version);
  }, {
    server: base,
    onStatus: function (st) {
      card.setAttribute('data-state', st.state);
      host.setAttribute('data-state', st.state);
      state.textContent = S.statusText(st);
    }
  });
  setInterval(function () { if (at) ago.textContent = '· updated ' + S.ago(at); }, 1000);
})(window);
