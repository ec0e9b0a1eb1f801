/* spillway renderer: turns a topic's state into DOM for the scoreboard page
 * and the partner widget. Publisher data is untrusted, so every piece of it
 * goes in through textContent; nothing here uses innerHTML. The markup
 * matches templates/board.html, which renders the same view on the server. */
(function (G) {
  'use strict';
  var S = G && G.spillway;
  if (!S || S.render) return;
  var doc = G.document;

  function el(tag, cls, text, kids) {
    var e = doc.createElement(tag);
    if (cls) e.className = cls;
    if (text != null) e.textContent = text;
    (kids || []).forEach(function (k) { if (k) e.appendChild(k); });
    return e;
  }
  function str(v) { return v == null ? '' : typeof v === 'object' ? JSON.stringify(v) : String(v); }
  function scalar(v) { return typeof v === 'string' || typeof v === 'number'; }
  function team(t) { return t && typeof t === 'object' && typeof t.name === 'string' && scalar(t.score); }

  // The scoreboard schema (docs/SCOREBOARD.md); anything else is generic.
  function isBoard(s) { return !!s && typeof s === 'object' && team(s.home) && team(s.away); }

  function events(s) {
    return (Array.isArray(s.events) ? s.events : []).filter(function (e) {
      return e && typeof e === 'object' && typeof e.text === 'string';
    }).reverse(); // Newest first.
  }

  function board(s) {
    var top = el('div', 'sb-top', null, [
      s.period != null ? el('span', 'sb-period', str(s.period)) : null,
      typeof s.status === 'string' ? el('span', 'sb-status sb-st-' + s.status.toLowerCase().replace(/[^a-z]/g, ''), s.status) : null,
      s.clock != null ? el('span', 'sb-clock', str(s.clock)) : null
    ]);
    var side = function (t, which) {
      return el('div', 'sb-team sb-' + which, null, [el('span', 'sb-name', t.name), el('span', 'sb-score', str(t.score))]);
    };
    var list = events(s).map(function (e) {
      return el('li', null, null, [el('span', 'sb-min', e.minute != null ? str(e.minute) + "'" : ''), el('span', 'sb-text', e.text)]);
    });
    return el('div', 'sb', null, [
      top,
      el('div', 'sb-teams', null, [side(s.home, 'home'), el('span', 'sb-sep', '–'), side(s.away, 'away')]),
      list.length ? el('ol', 'sb-events', null, list) : null
    ]);
  }

  function kv(s) {
    var keys = s && typeof s === 'object' ? Object.keys(s) : [];
    if (!keys.length) return el('p', 'empty', 'No data yet.');
    return el('dl', 'kv', null, keys.map(function (k) {
      return el('div', null, null, [el('dt', null, k), el('dd', null, str(s[k]))]);
    }));
  }

  S.isBoard = isBoard;
  S.el = el;
  S.render = function (s) { return isBoard(s) ? board(s) : kv(s); };

  // A sentence for screen readers when the score changes, or null.
  S.announce = function (prev, next) {
    if (!isBoard(next) || !isBoard(prev)) return null;
    if (str(prev.home.score) === str(next.home.score) && str(prev.away.score) === str(next.away.score)) return null;
    return 'Score: ' + next.home.name + ' ' + str(next.home.score) + ', ' + next.away.name + ' ' + str(next.away.score);
  };

  // One line for lists: "Home 2 – 1 Away · 67:00", or the first few keys.
  S.summary = function (s) {
    if (isBoard(s)) {
      return s.home.name + ' ' + str(s.home.score) + ' – ' + str(s.away.score) + ' ' + s.away.name + (s.clock != null ? ' · ' + str(s.clock) : '');
    }
    var keys = s && typeof s === 'object' ? Object.keys(s) : [];
    return keys.slice(0, 3).map(function (k) { return k + ': ' + str(s[k]).slice(0, 24); }).join(' · ');
  };

  // "4 s ago", "3 min ago", "2 h ago".
  S.ago = function (iso, now) {
    var t = Date.parse(iso);
    if (isNaN(t)) return '';
    var s = Math.max(0, Math.round(((now || Date.now()) - t) / 1000));
    return s < 60 ? s + ' s ago' : s < 3600 ? Math.floor(s / 60) + ' min ago' : Math.floor(s / 3600) + ' h ago';
  };

  S.statusText = function (st) {
    switch (st.state) {
      case 'live': return 'Live';
      case 'connecting': return 'Connecting…';
      case 'reconnecting': return 'Reconnecting…';
      case 'stale': return st.since ? 'Stale since ' + new Date(st.since).toLocaleTimeString() : 'Stale';
      default: return st.reason === 'network' ? 'Offline' : 'Live updates unavailable';
    }
  };
})(typeof window !== 'undefined' ? window : null);
