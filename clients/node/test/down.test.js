'use strict';
// A resolver that is down or silent costs a page at most the deadline.
const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const net = require('node:net');
const { Client } = require('..');
const { freePort } = require('./helpers/server');

const sockets = new Set();
let silent;

after(() => {
  for (const s of sockets) s.destroy();
  silent?.close();
});

async function listen(server) {
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return server.address().port;
}

const TPL = '<link href="{{#cdn}}/style.css{{/cdn}}"><img src="{{#asset}}/i/{{slug}}.png{{/asset}}">{{{cdn}}}';
const AS_WRITTEN = '<link href="/style.css"><img src="/i/a&amp;b.png">';

async function timedRender(address, deadlineMs) {
  const c = new Client({ address, deadlineMs });
  try {
    const t0 = performance.now();
    const html = await c.render('blog', TPL, { slug: 'a&b' });
    return { html, ms: performance.now() - t0 };
  } finally {
    c.close();
  }
}

test('nothing listening: the page renders as written, within the deadline', async () => {
  const port = await freePort();
  const { html, ms } = await timedRender(`127.0.0.1:${port}`, 250);
  assert.equal(html, AS_WRITTEN);
  assert.ok(ms < 250 + 1000, `took ${ms} ms`);
});

test('a server that accepts and never answers: the page renders as written, within the deadline', async () => {
  silent = net.createServer((s) => sockets.add(s));
  const port = await listen(silent);
  const { html, ms } = await timedRender(`127.0.0.1:${port}`, 300);
  assert.equal(html, AS_WRITTEN);
  assert.ok(ms < 300 + 1000, `took ${ms} ms`);
});

test('resolve() itself rejects with a status name when the server is down', async () => {
  const port = await freePort();
  const c = new Client({ address: `127.0.0.1:${port}` });
  try {
    await assert.rejects(c.resolve('blog', ['/a']), (e) => e.code === 'UNAVAILABLE' || e.code === 'DEADLINE_EXCEEDED');
  } finally {
    c.close();
  }
});
