/* spillway client: one connection per page shared by every subscription.
 * WebSocket, then SSE (fetch stream), then long-poll; full-jitter backoff that
 * honours server hints; resume by EPOCH:VERSION; zombie detection.
 * No dependencies, no build step. See docs/CLIENT.md. */
(function (G) {
  'use strict';
  var LADDER = ['ws', 'sse', 'poll'];
  var MAX_HINT = 300000; // A server hint above 5 minutes is treated as a bug.
  var KEY = 'spillway:transport:';

  // The delay before reconnect attempt `attempt` (0-based): uniform over
  // [0, min(cap, base * 2^attempt)) ("full jitter"), and never sooner than a
  // server hint. Pure, so it can be tested without a browser.
  function backoff(attempt, o) {
    o = o || {};
    var base = o.base > 0 ? o.base : 500, cap = o.cap > 0 ? o.cap : 30000;
    var win = Math.min(cap, base * Math.pow(2, Math.min(attempt, 40)));
    var d = Math.floor((o.random || Math.random)() * win);
    return o.hint > 0 ? Math.max(d, Math.min(o.hint, MAX_HINT)) : d;
  }

  // The hint of an HTTP refusal: the JSON body's retry_after_ms (exact and
  // already jittered by the server) wins; else Retry-After (seconds or a
  // date), spread over the following second since it is rounded.
  function retryAfter(header, body, now, random) {
    if (body && body.retry_after_ms >= 0) return +body.retry_after_ms;
    if (header == null || header === '') return null;
    var ms = /^\d+$/.test(header) ? header * 1000 : Date.parse(header) - (now || Date.now());
    return ms >= 0 ? Math.floor(ms + (random || Math.random)() * 1000) : null;
  }

  // RFC 7396 JSON Merge Patch.
  function mergePatch(target, patch) {
    if (patch === null || typeof patch !== 'object' || Array.isArray(patch)) return patch;
    var out = {}, k;
    if (target && typeof target === 'object' && !Array.isArray(target)) for (k in target) out[k] = target[k];
    for (k in patch) {
      if (patch[k] === null) delete out[k];
      else out[k] = mergePatch(out[k], patch[k]);
    }
    return out;
  }

  var api = { backoff: backoff, retryAfter: retryAfter, mergePatch: mergePatch };
  if (typeof module === 'object' && module.exports) module.exports = api;
  if (!G || !G.document) return;
  if (G.spillway && G.spillway.hub) return; // Loaded twice: keep the first hub.

  var doc = G.document, hubs = {};
  var me = doc.currentScript;
  var DEFAULT = me && me.src ? new URL(me.src, G.location.href).origin : G.location.origin;
  var enc = encodeURIComponent;
  function now() { return Date.now(); }
  function later(f) { setTimeout(f, 0); }
  function store(k, v) {
    try { return v === undefined ? G.localStorage.getItem(k) : G.localStorage.setItem(k, v); } catch (e) { return null; }
  }
  function refusal(r) {
    return r.json().catch(function () { return null; }).then(function (b) {
      return { hint: retryAfter(r.headers.get('Retry-After'), b), reachable: true, status: r.status, reason: b && b.error };
    });
  }

  function Hub(base, o) {
    this.base = base;
    this.o = o;
    this.topics = {};
    this.subs = [];
    this.stats = { connects: 0, frames: 0, snapshots: 0, patches: 0, transport: null };
    this.status = { state: 'connecting', since: null };
    this.attempt = 0;
    this.wsBad = 0;
    this.hb = 0;
    this.adv = {};
    // What worked for this origin last time (for a day), so a page behind a
    // proxy that breaks WebSocket does not pay for the failed upgrade again.
    var saved = (store(KEY + base) || '').split(' ');
    this.top = now() - saved[1] < 864e5 ? Math.max(0, LADDER.indexOf(saved[0])) : 0;
    this.rung = this.top;
  }
  var H = Hub.prototype;

  H.subscribe = function (topics, onState, o) {
    var self = this, sub = { onState: onState, onStatus: o.onStatus, topics: [].concat(topics) }, init = o.initial || {};
    this.subs.push(sub);
    sub.topics.forEach(function (t) {
      var s = self.topics[t];
      if (!s) {
        s = self.topics[t] = { subs: [] };
        var i = init[t];
        if (i && i.epoch && i.version) {
          s.epoch = i.epoch; s.version = i.version; s.updated_at = i.updated_at; s.state = i.state;
        }
        if (self.conn) self.conn.add(t, self.since(t));
      } else if (s.state) {
        later(function () { self.emit(t, s, sub); });
      }
      s.subs.push(sub);
    });
    if (sub.onStatus) later(function () { sub.onStatus(self.status); });
    if (!this.conn && !this.timer) this.timer = setTimeout(function () { self.connect(); }, 0);
    return {
      close: function () {
        self.subs = self.subs.filter(function (x) { return x !== sub; });
        sub.topics.forEach(function (t) {
          var s = self.topics[t];
          if (!s) return;
          s.subs = s.subs.filter(function (x) { return x !== sub; });
          if (!s.subs.length) { delete self.topics[t]; if (self.conn) self.conn.remove(t); }
        });
      },
      hub: this
    };
  };

  H.since = function (t) {
    var s = this.topics[t];
    return s && s.epoch ? s.epoch + ':' + s.version : null;
  };

  H.query = function () {
    var q = [];
    for (var t in this.topics) { var v = this.since(t); q.push('topic=' + enc(v ? t + '@' + v : t)); }
    return q.join('&') + '&delta=merge-patch';
  };

  H.setStatus = function (state, extra) {
    var st = this.status;
    if (st.state === state && !extra) return;
    st = this.status = { state: state, since: this.lastFrame || null, transport: this.stats.transport };
    for (var k in extra) st[k] = extra[k];
    this.subs.forEach(function (s) { if (s.onStatus) s.onStatus(st); });
  };

  // Opens the transport on the current rung of the ladder.
  H.connect = function (quiet) {
    var self = this, kind = LADDER[this.rung], c = { kind: kind, add: noop, remove: noop, close: noop };
    clearTimeout(this.timer);
    this.timer = null;
    if (!Object.keys(this.topics).length) return;
    this.conn = c;
    c.sent = {};
    for (var t in this.topics) c.sent[t] = 1;
    this.stats.connects++;
    this.stats.transport = kind;
    if (!quiet) this.setStatus(this.down());
    // Until hello arrives, a connection that says nothing is as dead as a
    // zombie; the same watchdog covers both.
    this.watch(c, this.hb ? Math.max(2.5 * this.hb, 3000) : this.o.connectTimeout || 10000);
    T[kind](this, c);
  };

  H.watch = function (c, ms) {
    var self = this;
    clearTimeout(this.dog);
    if (c.kind !== 'poll') this.dog = setTimeout(function () { self.fail(c, { timeout: true }); }, ms);
  };

  // Drops the connection without backoff (SSE learning of a new topic).
  H.reopen = function () {
    var self = this, c = this.conn;
    if (!c || this.timer) return;
    c.close();
    this.conn = null;
    this.timer = setTimeout(function () { self.connect(true); }, 0);
  };

  // The state to show while not live.
  H.down = function (tries) {
    return G.navigator.onLine === false || this.refused || (!this.everLive && tries > 3) ? 'offline' :
      this.stale ? 'stale' : this.everLive ? 'reconnecting' : 'connecting';
  };

  H.fail = function (c, f) {
    var self = this;
    if (c !== this.conn) return;
    this.conn = null;
    clearTimeout(this.dog);
    c.close();
    var hint = f.hint || c.hint || c.retry;
    if (f.status === 403) this.refused = f.reason || 'forbidden';
    var next = function () {
      var d = backoff(self.attempt++, { base: self.o.base || self.adv.base_ms, cap: self.o.cap || self.adv.cap_ms, hint: hint });
      var gone = G.navigator.onLine === false;
      self.setStatus(self.down(self.attempt), { retryIn: d, reason: self.refused || (gone ? 'network' : f.timeout ? 'timeout' : undefined) });
      self.timer = setTimeout(function () { self.connect(); }, d);
      if (!self.staler) self.staler = setTimeout(function () { self.stale = true; self.setStatus(self.down()); }, self.o.staleAfter || 10000);
    };
    if (c.live || f.status === 403) return next();
    if (c.kind === 'ws') {
      // A browser cannot see why an upgrade failed. Step down to SSE only if
      // the server answers plain HTTP; if it does not, it is simply down.
      var ac = new AbortController(), to = setTimeout(function () { ac.abort(); }, 5000);
      fetch(this.base + '/healthz', { mode: 'no-cors', cache: 'no-store', signal: ac.signal }).then(
        function () { if (++self.wsBad > 1) self.rung = 1; }, noop).then(function () { clearTimeout(to); next(); });
      return;
    }
    // SSE answered but no hello came (a buffering proxy), or it is not there:
    // long-poll is the last rung.
    if (c.kind === 'sse' && (c.ok ? f.timeout : f.reachable && f.status !== 503)) this.rung = 2;
    next();
  };

  H.frame = function (c, raw) {
    if (!c || c !== this.conn) return;
    var f = raw, s;
    if (typeof raw === 'string') try { f = JSON.parse(raw); } catch (e) { return; }
    this.lastFrame = now();
    this.stats.frames++;
    if (this.hb) this.watch(c, 2.5 * this.hb);
    switch (f.type) {
      case 'hello':
        if (f.heartbeat_ms) this.hb = f.heartbeat_ms;
        if (f.reconnect) this.adv = f.reconnect;
        this.watch(c, this.hb ? 2.5 * this.hb : 60000);
        c.live = this.everLive = true;
        this.refused = null;
        this.stale = false;
        clearTimeout(this.staler);
        this.staler = null;
        if (c.kind === 'ws') this.wsBad = 0;
        if (this.rung !== this.top || store(KEY + this.base) === null) store(KEY + this.base, c.kind + ' ' + now());
        this.top = this.rung;
        for (var t in this.topics) if (!c.sent[t]) c.add(t, this.since(t));
        this.setStatus('live');
        return;
      case 'notice':
        c.hint = f.retry_after_ms;
        return;
      case 'error':
        if (G.console) G.console.warn('spillway: ' + f.code + ': ' + f.message);
        return;
      case 'heartbeat':
        this.attempt = 0;
        return;
    }
    s = this.topics[f.topic];
    this.attempt = 0;
    if (!s) return;
    if (f.type === 'snapshot') {
      this.stats.snapshots++;
      if (s.epoch === f.epoch && s.version >= f.version) return; // Never backwards.
      s.state = f.state;
    } else if (f.type === 'patch') {
      this.stats.patches++;
      if (s.epoch !== f.epoch || s.version !== f.base) {
        // Not our base (should not happen): forget the topic's position and
        // take a fresh snapshot.
        s.epoch = null;
        return this.fail(c, {});
      }
      s.state = mergePatch(s.state, f.patch);
    } else if (f.type === 'deleted') {
      s.state = null;
      s.deleted = true;
      // Keep waiting for the topic to come back; the server dropped it from
      // this connection.
      later(function () { if (c.live) c.add(f.topic, null); });
    } else {
      return;
    }
    s.epoch = f.type === 'deleted' ? null : f.epoch;
    s.version = f.version;
    s.updated_at = f.updated_at;
    s.skipped = f.skipped || 0;
    if (f.type !== 'deleted') s.deleted = false;
    this.emit(f.topic, s);
  };

  H.emit = function (t, s, only) {
    var meta = { epoch: s.epoch, version: s.version, updated_at: s.updated_at, skipped: s.skipped, deleted: !!s.deleted };
    (only ? [only] : s.subs).forEach(function (sub) {
      try { sub.onState(t, s.state, meta); } catch (e) { setTimeout(function () { throw e; }); }
    });
  };

  // Back from the background, the bfcache or a network change: a connection
  // that stayed quiet too long is a zombie; a pending retry goes now; and
  // each held topic is checked over HTTP at once rather than after a heartbeat.
  H.check = function (force) {
    var self = this, c = this.conn;
    if (G.navigator.onLine === false) return this.setStatus('offline', { reason: 'network' });
    if (!c) {
      if (this.timer || force) { this.attempt = 0; this.connect(); }
      return;
    }
    if (c.live && c.kind !== 'poll' && this.hb && now() - this.lastFrame > 2.5 * this.hb) return this.fail(c, { timeout: true });
    Object.keys(this.topics).slice(0, 8).forEach(function (t) {
      var v = self.since(t);
      if (!v) return;
      fetch(self.base + '/v1/topics/' + enc(t) + '?since=' + enc(v), { cache: 'no-store', credentials: 'omit' }).then(function (r) {
        return r.status === 200 ? r.json().then(function (b) { b.type = 'snapshot'; self.frame(self.conn, b); }) : null;
      }).catch(noop);
    });
  };

  function noop() {}

  var T = {
    ws: function (h, c) {
      var ws = new WebSocket(h.base.replace(/^http/, 'ws') + '/v1/ws?' + h.query());
      c.add = function (t, since) {
        // Before the socket opens, hello sends whatever is not yet sent.
        if (ws.readyState === 1 && (c.sent[t] = 1)) ws.send(JSON.stringify(since ? { type: 'subscribe', topic: t, since: since } : { type: 'subscribe', topic: t }));
      };
      c.remove = function (t) { if (ws.readyState === 1) ws.send(JSON.stringify({ type: 'unsubscribe', topic: t })); };
      c.close = function () { ws.onclose = ws.onmessage = null; try { ws.close(); } catch (e) { /* already closed */ } };
      ws.onmessage = function (e) { h.frame(c, e.data); };
      ws.onclose = function (e) {
        var hint;
        try { hint = JSON.parse(e.reason).retry_after_ms; } catch (x) { /* no hint */ }
        h.fail(c, { hint: hint, code: e.code });
      };
    },
    sse: function (h, c) {
      // fetch rather than EventSource: it lets us read refusals (status,
      // Retry-After, JSON body) and `retry:`, and keep our own backoff.
      var ac = new AbortController(), buf = '', data = [];
      c.add = c.remove = function () { h.reopen(); };
      c.close = function () { ac.abort(); };
      fetch(h.base + '/v1/events?' + h.query(), { headers: { Accept: 'text/event-stream' }, cache: 'no-store', credentials: 'omit', signal: ac.signal })
        .then(function (r) {
          if (!r.ok) return refusal(r).then(function (f) { h.fail(c, f); });
          c.ok = true;
          var rd = r.body.getReader(), dec = new TextDecoder();
          var pump = function () {
            return rd.read().then(function (x) {
              if (x.done) return h.fail(c, { reachable: true });
              var lines = (buf + dec.decode(x.value, { stream: true })).split(/\r\n|\r|\n/);
              buf = lines.pop();
              lines.forEach(function (l) {
                if (l === '') { if (data.length) h.frame(c, data.join('\n')); data = []; }
                else if (l.slice(0, 5) === 'data:') data.push(l.slice(l[5] === ' ' ? 6 : 5));
                else if (l.slice(0, 6) === 'retry:') c.retry = +l.slice(6);
              });
              return c === h.conn && pump();
            });
          };
          return pump();
        })
        .catch(function () { h.fail(c, {}); });
    },
    poll: function (h, c) {
      // One long-poll per topic; the last rung, for networks that break both
      // WebSocket and streaming responses.
      var acs = {};
      c.close = function () { c.dead = true; for (var t in acs) acs[t].abort(); };
      c.add = function (t) {
        if (c.dead || acs[t] || !h.topics[t]) return;
        var ac = acs[t] = new AbortController(), v = h.since(t);
        var to = setTimeout(function () { ac.abort(); }, 40000);
        c.sent[t] = 1;
        fetch(h.base + '/v1/topics/' + enc(t) + (v ? '?since=' + enc(v) + (c.live ? '&wait=25' : '') : ''), { cache: 'no-store', credentials: 'omit', signal: ac.signal })
          .then(function (r) {
            delete acs[t];
            clearTimeout(to);
            if (c.dead) return;
            if (r.status === 200 || r.status === 304 || r.status === 404) {
              if (!c.live) h.frame(c, { type: 'hello' });
              if (r.status === 304) return c.add(t);
              if (r.status === 404) {
                if (h.topics[t] && h.topics[t].epoch) h.frame(c, { type: 'deleted', topic: t, version: h.topics[t].version });
                // A missing topic cannot be long-polled; look again soon.
                return setTimeout(function () { c.add(t); }, 2000 + Math.random() * 3000);
              }
              return r.json().then(function (b) { b.type = 'snapshot'; h.frame(c, b); c.add(t); });
            }
            return refusal(r).then(function (f) { h.fail(c, f); });
          })
          .catch(function () { clearTimeout(to); delete acs[t]; if (!c.dead) h.fail(c, {}); });
      };
      c.remove = function (t) { if (acs[t]) acs[t].abort(); };
      for (var t in h.topics) c.add(t);
    }
  };

  function hub(base, o) {
    base = base || DEFAULT;
    return hubs[base] || (hubs[base] = new Hub(base, o || {}));
  }

  // subscribe(topics, onState(topic, state, meta), {onStatus, initial, server,
  // base, cap, connectTimeout, staleAfter}). The first call for a server fixes
  // its options; later calls share its one connection.
  api.subscribe = function (topics, onState, o) {
    o = o || {};
    return hub(o.server, o).subscribe(topics, onState, o);
  };
  api.hub = hub;
  G.spillway = api;

  function each(f) { for (var b in hubs) f(hubs[b]); }
  doc.addEventListener('visibilitychange', function () { if (!doc.hidden) each(function (h) { h.check(); }); });
  G.addEventListener('online', function () { each(function (h) { h.check(true); }); });
  G.addEventListener('offline', function () { each(function (h) { h.setStatus('offline', { reason: 'network' }); }); });
  // Closing on pagehide keeps the page eligible for the back/forward cache;
  // pageshow from that cache reconnects at once.
  G.addEventListener('pagehide', function (e) {
    if (e.persisted) each(function (h) { if (h.conn) { h.conn.close(); h.conn = null; } });
  });
  G.addEventListener('pageshow', function (e) { if (e.persisted) each(function (h) { h.check(true); }); });
})(typeof window !== 'undefined' ? window : null);
