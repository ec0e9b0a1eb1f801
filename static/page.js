/* spillway pages: makes the server-rendered topic list (/) and scoreboard
 * (/t/{topic}) live. The server's markup stays readable without JavaScript;
 * this script only replaces it with the same markup built from newer states. */
(function (G) {
  'use strict';
  var S = G.spillway, doc = G.document, app = doc.getElementById('app');
  if (!S || !S.render || !app) return;

  function showStatus(node, st) {
    node.dataset.state = st.state;
    node.textContent = S.statusText(st);
  }

  function tick(fn) { fn(); setInterval(fn, 1000); }

  function topicPage() {
    var topic = app.dataset.topic, d = app.dataset, prev = null, initial = {};
    var boardNode = doc.getElementById('board'), statusNode = doc.getElementById('status');
    var timeNode = doc.getElementById('updated'), say = doc.getElementById('announce');
    var updatedAt = d.updated || null;
    if (d.epoch && d.state) {
      try { prev = JSON.parse(d.state); } catch (e) { prev = null; }
      initial[topic] = { epoch: d.epoch, version: +d.version, updated_at: d.updated, state: prev };
    }
    S.subscribe([topic], function (t, state, meta) {
      app.dataset.version = meta.version;
      if (meta.deleted) {
        boardNode.replaceChildren(S.el('p', 'empty', 'This topic has ended. It will reappear here if it is published again.'));
        prev = null;
        return;
      }
      var line = S.announce(prev, state);
      boardNode.replaceChildren(S.render(state));
      if (line) say.textContent = line;
      prev = state;
      updatedAt = meta.updated_at;
      timeNode.setAttribute('datetime', updatedAt);
      app.classList.remove('missing');
    }, { initial: initial, onStatus: function (st) { showStatus(statusNode, st); } });
    tick(function () { if (updatedAt) timeNode.textContent = 'updated ' + S.ago(updatedAt); });
  }

  function indexPage() {
    var list = doc.getElementById('topics'), statusNode = doc.getElementById('status'), rows = {}, subs = 0;

    function row(name) {
      if (rows[name]) return rows[name];
      var r = rows[name] = {
        li: S.el('li', 'topic'), sum: S.el('span', 't-sum'), ago: S.el('time', 't-ago'), at: null
      };
      var a = S.el('a', null, null, [S.el('span', 't-name', name), r.sum, r.ago]);
      a.href = '/t/' + encodeURIComponent(name);
      r.li.appendChild(a);
      list.appendChild(r.li);
      doc.getElementById('none').hidden = true;
      return r;
    }

    function follow(name) {
      // One connection carries every row; stay well inside the server's
      // per-connection topic limit.
      if (subs++ >= 48) return;
      S.subscribe([name], function (t, state, meta) {
        var r = row(t);
        r.li.classList.toggle('ended', meta.deleted);
        r.sum.textContent = meta.deleted ? 'ended' : S.summary(state);
        r.at = meta.updated_at;
      }, { onStatus: function (st) { showStatus(statusNode, st); } });
    }

    Array.prototype.forEach.call(list.querySelectorAll('li[data-topic]'), function (li) {
      var name = li.dataset.topic;
      rows[name] = { li: li, sum: li.querySelector('.t-sum'), ago: li.querySelector('.t-ago'), at: li.dataset.updated };
      follow(name);
    });

    // New topics have no stream of their own: look at the list now and then
    // (jittered, so a stadium of open tabs does not ask in step).
    function refresh() {
      fetch('/v1/topics', { cache: 'no-store' }).then(function (r) { return r.json(); }).then(function (b) {
        (b.topics || []).forEach(function (t) {
          if (!rows[t.topic]) { row(t.topic).at = t.updated_at; follow(t.topic); }
        });
      }).catch(function () {}).then(function () { setTimeout(refresh, 20000 + Math.random() * 20000); });
    }
    setTimeout(refresh, 5000 + Math.random() * 5000);
    if (!list.children.length) statusNode.textContent = 'Waiting for topics';
    tick(function () {
      for (var n in rows) if (rows[n].at) rows[n].ago.textContent = S.ago(rows[n].at);
    });
  }

  if (app.dataset.page === 'topic') topicPage();
  else if (app.dataset.page === 'index') indexPage();
})(window);
