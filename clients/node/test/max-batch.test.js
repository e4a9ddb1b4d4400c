'use strict';
// A page with more distinct targets than the server's max_batch: the server refuses
// such a batch whole, so the page is sent as several batches at once and every
// target resolves; a page within max_batch is still one ResolveBatch.
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { Client } = require('..');
const { startServer, callRecorder, freePort } = require('./helpers/server');

const MAX_BATCH = 4;
const BLOG = 'batchblog';
let server;
let client;
let rec;
let floor;

before(async () => {
  server = await startServer({ env: { BLOTCDN_MAX_BATCH: String(MAX_BATCH) } });
  rec = callRecorder();
  client = rec.attach(new Client({ address: server.grpc, deadlineMs: 5000 }));
  floor = await client.invalidate(BLOG);
});

after(async () => {
  client?.close();
  await server?.stop();
});

const v = (p) => `${server.base}/${BLOG}/${floor}/${p}`;
const TPL = '{{#items}}<img src="{{#cdn}}/img/{{.}}.png{{/cdn}}">{{/items}}<link href="{{#asset}}/style.css{{/asset}}">';
const items = (n) => Array.from({ length: n }, (_, i) => `n${i}`);
const page = (list) => `${list.map((i) => `<img src="${v(`img/${i}.png`)}">`).join('')}<link href="${v('style.css')}">`;

test('the server refuses a batch over its max_batch whole', async () => {
  const paths = items(MAX_BATCH + 1).map((i) => `/img/${i}.png`);
  await assert.rejects(client.resolve(BLOG, paths), (e) => e.code === 'INVALID_ARGUMENT' && /max_batch/.test(e.message));
});

test('a page with more targets than max_batch resolves every one, in batches sent at once', async () => {
  const list = items(10); // 11 distinct targets with /style.css: batches of 4, 4 and 3
  rec.reset();
  const html = await client.render(BLOG, TPL, { items: [...list, ...list] });
  assert.equal(html, page([...list, ...list]));
  const batches = rec.calls.filter((c) => c.method === 'ResolveBatch').map((c) => c.request.paths);
  assert.equal(batches.length, 3);
  assert.ok(batches.every((b) => b.length <= MAX_BATCH), `batch sizes ${batches.map((b) => b.length)}`);
  const sent = batches.flat();
  assert.equal(sent.length, 11, 'each distinct target once, in one batch');
  assert.deepEqual(new Set(sent), new Set([...list.map((i) => `/img/${i}.png`), '/style.css']));
  // At once: every batch was sent before the first was answered.
  const order = rec.events.filter((e) => e.method === 'ResolveBatch').map((e) => e.event);
  assert.deepEqual(order.slice(0, 3), ['sent', 'sent', 'sent']);
});

test('a page within max_batch is one ResolveBatch, and GetInfo is asked once per Client', async () => {
  for (const n of [MAX_BATCH - 1, 1, 0]) {
    rec.reset();
    const list = items(n);
    assert.equal(await client.render(BLOG, TPL, { items: list }), page(list));
    const batches = rec.calls.filter((c) => c.method === 'ResolveBatch');
    assert.equal(batches.length, 1, `${n + 1} targets`);
    assert.equal(batches[0].request.paths.length, n + 1);
    assert.equal(rec.count('GetInfo'), 0, 'max_batch is already known');
  }

  const fresh = rec.attach(new Client({ address: server.grpc, deadlineMs: 5000 }));
  try {
    rec.reset();
    const pages = await Promise.all([items(3), items(20), items(2)].map((list) => fresh.render(BLOG, TPL, { items: list })));
    assert.deepEqual(pages, [page(items(3)), page(items(20)), page(items(2))]);
    assert.equal(rec.count('GetInfo'), 1, 'pages rendered together share one GetInfo');
    assert.equal(await fresh.render(BLOG, TPL, { items: items(MAX_BATCH - 1) }), page(items(MAX_BATCH - 1)));
    assert.equal(rec.count('GetInfo'), 1);
    assert.equal(rec.count('ResolveBatch'), 1 + 6 + 1 + 1);
  } finally {
    fresh.close();
  }
});

test('a batch refused for another reason than max_batch does not make the next page ask GetInfo', async () => {
  await client.render(BLOG, TPL, { items: items(1) }); // max_batch known
  rec.reset();
  // The server refuses this blog id with INVALID_ARGUMENT, for a batch of several paths.
  const html = await client.render('not a blog id!', TPL, { items: items(2) });
  assert.equal(html, '<img src="/img/n0.png"><img src="/img/n1.png"><link href="/style.css">');
  assert.equal(rec.count('ResolveBatch'), 1);
  assert.equal(await client.render(BLOG, TPL, { items: items(2) }), page(items(2)));
  assert.equal(rec.count('GetInfo'), 0, 'max_batch is still known');
});

test('a batch refused as over max_batch makes the next page use the max_batch the refusal names', async () => {
  const c = rec.attach(new Client({ address: server.grpc, deadlineMs: 5000 }));
  try {
    assert.equal(await c.render(BLOG, TPL, { items: items(1) }), page(items(1)));
    // As after the server restarted with a lower max_batch than the one learned.
    c.maxBatch = 100;
    rec.reset();
    const list = items(MAX_BATCH + 2);
    const html = await c.render(BLOG, TPL, { items: list });
    assert.equal(html, `${list.map((i) => `<img src="/img/${i}.png">`).join('')}<link href="/style.css">`);
    assert.equal(c.maxBatch, MAX_BATCH, 'the refusal says the server takes 4');
    assert.equal(await c.render(BLOG, TPL, { items: list }), page(list));
    assert.equal(rec.count('GetInfo'), 0);
    assert.equal(c.maxBatch, MAX_BATCH);
  } finally {
    c.close();
  }
});

test('invalidate of more paths than max_batch goes as several calls, each durable', async () => {
  const c = rec.attach(new Client({ address: server.grpc, deadlineMs: 5000 }));
  try {
    const paths = items(MAX_BATCH * 2 + 1).map((i) => `/inv/${i}.css`);
    rec.reset();
    // max_batch not known yet: refused whole as over it, then split by the one the refusal
    // names (a publisher token may not ask GetInfo).
    const last = await c.invalidate(BLOG, paths);
    const sent = rec.calls.filter((x) => x.method === 'Invalidate').map((x) => x.request.paths.length);
    assert.deepEqual(sent, [paths.length, MAX_BATCH, MAX_BATCH, 1]);
    assert.equal(rec.count('GetInfo'), 0);
    const res = await c.resolve(BLOG, paths.slice(0, MAX_BATCH));
    const res2 = await c.resolve(BLOG, paths.slice(MAX_BATCH * 2));
    for (const [, a] of [...res, ...res2]) assert.ok(a.cacheId > floor && a.cacheId <= last, `${a.cacheId}`);
    // Known now: split at once.
    rec.reset();
    await c.invalidate(BLOG, paths.slice(0, MAX_BATCH + 1));
    assert.deepEqual(rec.calls.filter((x) => x.method === 'Invalidate').map((x) => x.request.paths.length), [MAX_BATCH, 1]);
  } finally {
    c.close();
  }
});

test('a split invalidate whose later part is refused names the path by its place in the whole list', async () => {
  // max_batch is known: the list goes as parts of 4, and the server refuses the second part's
  // path at its own index 2, the caller's paths[6].
  const paths = items(MAX_BATCH * 2).map((i) => `/part/${i}.css`);
  paths[MAX_BATCH + 2] = '/part/../escape.css';
  const err = await client.invalidate(BLOG, paths).then(() => null, (e) => e);
  assert.ok(err, 'rejected');
  assert.equal(err.code, 'INVALID_ARGUMENT');
  assert.match(err.message, /paths\[6\]/);
  assert.doesNotMatch(err.message, /paths\[2\]/);
  assert.match(err.message, /the 4 paths before it are invalidated/);
  assert.equal(err.pathsDone, MAX_BATCH);
  // As it says: the first part is done.
  const res = await client.resolve(BLOG, paths.slice(0, 1));
  assert.ok(res.get(paths[0]).cacheId > floor);
});

test('after the server restarts with a larger max_batch and another base URL, the client learns both', async () => {
  const addr = `127.0.0.1:${await freePort()}`;
  let s = await startServer({ grpcAddr: addr, env: { BLOTCDN_MAX_BATCH: String(MAX_BATCH), BLOTCDN_CDN_BASE_URL: 'https://old.test' } });
  const c = rec.attach(new Client({ address: addr, deadlineMs: 5000 }));
  try {
    const tpl = `${TPL}{{{cdn}}}`;
    const list = items(10);
    await c.invalidate(BLOG);
    assert.match(await c.render(BLOG, tpl, { items: list }), /https:\/\/old\.test$/);
    await s.kill();
    s = await startServer({ grpcAddr: addr, dataDir: s.dataDir, env: { BLOTCDN_MAX_BATCH: '100', BLOTCDN_CDN_BASE_URL: 'https://new.test' } });
    // The first page on the new connection asks again, without waiting for the answer.
    const until = Date.now() + 10000;
    let html = '';
    const learned = () => html.includes('https://new.test/') && html.endsWith('https://new.test');
    while (Date.now() < until && !learned()) {
      html = await c.render(BLOG, tpl, { items: list });
      if (!learned()) await new Promise((r) => setTimeout(r, 100));
    }
    assert.match(html, /^<img src="https:\/\/new\.test\/batchblog\/\d+\/img\/n0\.png">.*https:\/\/new\.test$/);
    rec.reset();
    await c.render(BLOG, tpl, { items: list });
    assert.equal(rec.count('ResolveBatch'), 1, 'one batch: the larger max_batch is known');
    assert.equal(rec.count('GetInfo'), 0);
  } finally {
    c.close();
    await s.stop();
  }
});
