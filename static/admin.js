// The operator page (/admin): follows /admin/events, the event stream of the
// internal `_stats` topic, and shows its figures. Plain script, no
// dependencies. Every element with `data-figure="a.b"` shows that path of the
// stats document, every `data-table="a"` lists that object's keys; a figure the
// server does not have (null) shows "—".
'use strict';
(function () {
  /** Samples kept for the sparklines: one a second, three minutes. */
  var WINDOW = 180;
  /** No event for this long (the server sends one a second) means stale. */
  var STALE_MS = 5000;

  var status = document.getElementById('status');
  var updated = document.getElementById('updated');
  var numbers = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });
  var history = { deliveries: [], rss: [] };
  var lastEvent = 0;
  var source = null;
  var retryMs = 1000;

  function setStatus(state, text) {
    status.setAttribute('data-state', state);
    status.textContent = text;
  }

  function get(doc, path) {
    return path.split('.').reduce(function (o, k) { return o === null || o === undefined ? undefined : o[k]; }, doc);
  }

  function bytes(n) {
    var units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
    var i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return numbers.format(n) + ' ' + units[i];
  }

  function duration(s) {
    var d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
    if (d > 0) return d + ' d ' + h + ' h';
    if (h > 0) return h + ' h ' + m + ' min';
    if (m > 0) return m + ' min ' + (s % 60) + ' s';
    return s + ' s';
  }

  function format(value, kind) {
    if (value === null || value === undefined) return '—';
    if (kind === 'bytes' && typeof value === 'number') return bytes(value);
    if (kind === 'duration' && typeof value === 'number') return duration(value);
    if (kind === 'quantiles') {
      if (typeof value !== 'object') return '—';
      return format(value.p50) + ' / ' + format(value.p99) + ' ms';
    }
    if (typeof value === 'number') return numbers.format(value);
    if (typeof value === 'boolean') return value ? 'yes' : 'no';
    return String(value);
  }

  /** Lists an object's keys and figures; non-zero ones stand out. */
  function table(el, obj) {
    if (!obj || typeof obj !== 'object') return;
    var rows = [];
    Object.keys(obj).forEach(function (key) {
      var row = document.createElement('div');
      var dt = document.createElement('dt');
      var dd = document.createElement('dd');
      dt.textContent = key.replace(/_/g, ' ');
      dd.textContent = format(obj[key]);
      dd.setAttribute('data-key', key);
      if (typeof obj[key] === 'number' && obj[key] > 0) row.className = 'hot';
      row.appendChild(dt);
      row.appendChild(dd);
      rows.push(row);
    });
    el.replaceChildren.apply(el, rows);
  }

  function push(list, value) {
    list.push(typeof value === 'number' ? value : null);
    if (list.length > WINDOW) list.shift();
  }

  /** Draws `values` (oldest first) as a polyline in a 300×60 box. */
  function spark(id, values, peakId, kind) {
    var svg = document.getElementById(id);
    if (!svg) return;
    var known = values.filter(function (v) { return v !== null; });
    var max = Math.max.apply(null, known.concat([0]));
    var top = max > 0 ? max * 1.1 : 1;
    var points = [];
    values.forEach(function (v, i) {
      if (v === null) return;
      var x = (WINDOW - values.length + i) * (300 / (WINDOW - 1));
      var y = 58 - (v / top) * 56;
      points.push(x.toFixed(1) + ',' + y.toFixed(1));
    });
    svg.querySelector('polyline').setAttribute('points', points.join(' '));
    var peak = document.getElementById(peakId);
    if (peak) peak.textContent = known.length ? '(peak ' + format(max, kind) + ')' : '';
  }

  function render(doc) {
    document.querySelectorAll('[data-figure]').forEach(function (el) {
      el.textContent = format(get(doc, el.getAttribute('data-figure')), el.getAttribute('data-format'));
    });
    document.querySelectorAll('[data-table]').forEach(function (el) {
      table(el, get(doc, el.getAttribute('data-table')));
    });
    push(history.deliveries, get(doc, 'deliveries.per_s'));
    push(history.rss, get(doc, 'process.rss_bytes'));
    spark('spark-deliveries', history.deliveries, 'deliveries-peak');
    spark('spark-rss', history.rss, 'rss-peak', 'bytes');
    if (doc.hub_id) document.getElementById('hub').textContent = 'operator · ' + doc.hub_id;
  }

  function onMessage(event) {
    var frame;
    try { frame = JSON.parse(event.data); } catch (e) { return; }
    lastEvent = Date.now();
    if (frame.type === 'snapshot' && frame.state) {
      render(frame.state);
      setStatus('live', 'Live');
      updated.textContent = new Date(lastEvent).toLocaleTimeString();
      retryMs = 1000;
    } else if (frame.type === 'notice') {
      setStatus('reconnecting', 'Reconnecting…');
    }
  }

  /**
   * The stream was closed for good (EventSource gives up after an error
   * status). Ask why: a 401 means the session is over, so reload to the login
   * form; anything else, try again later.
   */
  function recover() {
    setStatus('reconnecting', 'Reconnecting…');
    var abort = new AbortController();
    fetch('/admin/events', { signal: abort.signal, credentials: 'same-origin' }).then(function (r) {
      abort.abort();
      if (r.status === 401) { location.reload(); return; }
      connect();
    }, function () {
      retryMs = Math.min(retryMs * 2, 30000);
      setTimeout(recover, retryMs * (0.5 + Math.random()));
    });
  }

  function connect() {
    if (source) source.close();
    source = new EventSource('/admin/events');
    source.onmessage = onMessage;
    source.onerror = function () {
      if (source.readyState === EventSource.CLOSED) {
        retryMs = Math.min(retryMs * 2, 30000);
        setTimeout(recover, retryMs * (0.5 + Math.random()));
      } else {
        setStatus('reconnecting', 'Reconnecting…');
      }
    };
  }

  setInterval(function () {
    if (lastEvent && Date.now() - lastEvent > STALE_MS && status.getAttribute('data-state') === 'live') {
      setStatus('stale', 'Stale');
    }
  }, 1000);
  connect();
})();
