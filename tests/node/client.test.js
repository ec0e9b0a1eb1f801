// Unit tests of the pure parts of static/client.js: the reconnect backoff,
// server hints and JSON Merge Patch. Run with `node --test tests/node`.
'use strict';
const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');

const client = require(path.join(__dirname, '..', '..', 'static', 'client.js'));
const { backoff, retryAfter, mergePatch } = client;

// A small seeded generator, so the deterministic checks are reproducible.
function mulberry32(seed) {
  return function () {
    seed |= 0;
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// Pearson's chi-square over 10 equal buckets of [0, 1).
function chiSquare(fractions) {
  const buckets = new Array(10).fill(0);
  for (const f of fractions) buckets[Math.min(9, Math.floor(f * 10))]++;
  const expected = fractions.length / 10;
  return buckets.reduce((sum, n) => sum + (n - expected) ** 2 / expected, 0);
}
// Critical values of chi-square with 9 degrees of freedom.
const CHI2_9_P001 = 27.877;
const CHI2_9_P0001 = 33.72;

const BASE = 500;
const CAP = 30000;
const window = (attempt) => Math.min(CAP, BASE * 2 ** attempt);

test('a thousand delays at the cap are uniform over the whole window (seeded)', () => {
  const random = mulberry32(42);
  const delays = Array.from({ length: 1000 }, () => backoff(12, { base: BASE, cap: CAP, random }));
  for (const d of delays) assert.ok(d >= 0 && d < CAP, `delay ${d} outside [0, ${CAP})`);
  const chi2 = chiSquare(delays.map((d) => d / CAP));
  assert.ok(chi2 < CHI2_9_P001, `chi-square ${chi2.toFixed(2)} says the delays are not uniform`);
});

test('a thousand delays along a reconnect sequence fill each window uniformly (Math.random)', () => {
  // A client that keeps failing: attempts 0, 1, 2, … ; each delay divided by
  // its own window must look uniform, whatever the attempt.
  const fractions = [];
  for (let i = 0; i < 1000; i++) {
    const attempt = i % 12;
    const d = backoff(attempt, { base: BASE, cap: CAP });
    assert.ok(d >= 0 && d < window(attempt), `attempt ${attempt}: ${d} outside its window`);
    fractions.push(d / window(attempt));
  }
  const chi2 = chiSquare(fractions);
  // A looser bound: real randomness, and a flaky test is worse than none.
  assert.ok(chi2 < CHI2_9_P0001, `chi-square ${chi2.toFixed(2)} says the delays are not uniform`);
});

test('the window doubles from the base and never exceeds the cap', () => {
  const top = () => 0.999999;
  assert.equal(backoff(0, { base: BASE, cap: CAP, random: top }), BASE - 1);
  assert.equal(backoff(3, { base: BASE, cap: CAP, random: top }), 8 * BASE - 1);
  for (let attempt = 0; attempt < 2000; attempt++) {
    const d = backoff(attempt, { base: BASE, cap: CAP });
    assert.ok(d < CAP, `attempt ${attempt} waited ${d}`);
  }
  // Absurd attempts do not overflow into NaN or Infinity.
  assert.ok(Number.isFinite(backoff(1e6, { base: BASE, cap: CAP })));
  assert.equal(backoff(1e6, { base: BASE, cap: CAP, random: () => 0 }), 0);
});

test('the defaults are 500 ms and 30 s', () => {
  assert.equal(backoff(0, { random: () => 0.999 }), 499);
  assert.equal(backoff(50, { random: () => 0.999 }), 29970);
});

test('a server hint is respected: never sooner, still spread when it is smaller than the jitter', () => {
  const random = mulberry32(7);
  for (let i = 0; i < 1000; i++) {
    const d = backoff(i % 10, { base: BASE, cap: CAP, hint: 4000, random });
    assert.ok(d >= 4000, `${d} is sooner than the hint`);
    assert.ok(d < Math.max(4000, CAP), `${d} is past both the hint and the cap`);
  }
  // A hint longer than the cap wins over the cap (the server knows its load)…
  assert.equal(backoff(0, { base: BASE, cap: CAP, hint: 45000, random: () => 0.5 }), 45000);
  // …but not an absurd one.
  assert.equal(backoff(0, { base: BASE, cap: CAP, hint: 1e9, random: () => 0.5 }), 300000);
});

test('Retry-After: the JSON body wins, seconds are spread over the next second, dates count', () => {
  assert.equal(retryAfter('9', { retry_after_ms: 1234 }), 1234);
  for (let i = 0; i < 200; i++) {
    const ms = retryAfter('3', null);
    assert.ok(ms >= 3000 && ms < 4000, `${ms} for Retry-After: 3`);
  }
  const now = Date.parse('2026-01-01T00:00:00Z');
  assert.equal(retryAfter('Thu, 01 Jan 2026 00:00:05 GMT', null, now, () => 0), 5000);
  assert.equal(retryAfter(null, null), null);
  assert.equal(retryAfter('soon', null), null);
  // Fed into the backoff, a refusal's Retry-After holds the next attempt back.
  const hint = retryAfter('2', null, 0, () => 0.5);
  for (let i = 0; i < 100; i++) assert.ok(backoff(0, { hint }) >= 2500);
});

test('merge patch follows RFC 7396', () => {
  const cases = [
    [{ a: 'b' }, { a: 'c' }, { a: 'c' }],
    [{ a: 'b' }, { b: 'c' }, { a: 'b', b: 'c' }],
    [{ a: 'b' }, { a: null }, {}],
    [{ a: 'b', b: 'c' }, { a: null }, { b: 'c' }],
    [{ a: ['b'] }, { a: 'c' }, { a: 'c' }],
    [{ a: 'c' }, { a: ['b'] }, { a: ['b'] }],
    [{ a: { b: 'c' } }, { a: { b: 'd', c: null } }, { a: { b: 'd' } }],
    [{ a: [{ b: 'c' }] }, { a: [1] }, { a: [1] }],
    [['a', 'b'], ['c', 'd'], ['c', 'd']],
    [{ a: 'b' }, ['c'], ['c']],
    [{ a: 'foo' }, null, null],
    [{ e: null }, { a: 1 }, { e: null, a: 1 }],
    [[1, 2], { a: 'b', c: null }, { a: 'b' }],
    [{}, { a: { bb: { ccc: null } } }, { a: { bb: {} } }],
  ];
  for (const [target, patch, want] of cases) {
    assert.deepEqual(mergePatch(target, patch), want, JSON.stringify({ target, patch }));
  }
  const target = { home: { score: 1 } };
  mergePatch(target, { home: { score: 2 } });
  assert.deepEqual(target, { home: { score: 1 } }, 'the target is not modified');
});
