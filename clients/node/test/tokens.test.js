'use strict';
// Bearer tokens: one for renderers, one for the publish pipeline.
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { Client } = require('..');
const { startServer } = require('./helpers/server');

let server;
const clients = [];
const make = (token) => {
  const c = new Client({ address: server.grpc, token, deadlineMs: 5000 });
  clients.push(c);
  return c;
};

before(async () => {
  server = await startServer({
    env: { BLOTCDN_RESOLVER_TOKENS: 'read-1', BLOTCDN_PUBLISHER_TOKENS: 'write-1', BLOTCDN_MAX_BATCH: '10' },
  });
});

after(async () => {
  for (const c of clients) c.close();
  await server?.stop();
});

test('the right token works for each service', async () => {
  const floor = await make('write-1').invalidate('tok');
  const res = await make('read-1').resolve('tok', ['/a.css']);
  assert.equal(res.get('/a.css').url, `${server.base}/tok/${floor}/a.css`);
});

test('a wrong or missing token is UNAUTHENTICATED', async () => {
  for (const c of [make('nope'), make(undefined), make('read-1')]) {
    await assert.rejects(c.invalidate('tok'), (e) => e.code === 'UNAUTHENTICATED');
  }
  await assert.rejects(make('write-1').resolve('tok', ['/a.css']), (e) => e.code === 'UNAUTHENTICATED');
  await assert.rejects(make('nope').getBlog('tok'), (e) => e.code === 'UNAUTHENTICATED');
});

test('render with a wrong token renders targets as written, and with the right one resolves', async () => {
  const tpl = '<img src="{{#cdn}}/a.css{{/cdn}}">';
  assert.equal(await make('nope').render('tok', tpl, {}), '<img src="/a.css">');
  assert.match(await make('read-1').render('tok', tpl, {}), new RegExp(`^<img src="${server.base}/tok/\\d+/a\\.css">$`));
});

test('onRenderError hears once a page why it rendered as written', async () => {
  const heard = [];
  const c = new Client({ address: server.grpc, token: 'nope', deadlineMs: 5000, onRenderError: (err, blogId) => heard.push([err.code, blogId]) });
  clients.push(c);
  // 25 targets: three batches of 10 (max_batch), and {{cdn}}; each call refused.
  const tpl = '{{#n}}<img src="{{#cdn}}/{{.}}.css{{/cdn}}">{{/n}}{{cdn}}';
  const n = Array.from({ length: 25 }, (_, i) => `a${i}`);
  assert.equal(await c.render('tok', tpl, { n }), n.map((x) => `<img src="/${x}.css">`).join(''));
  assert.deepEqual(heard, [['UNAUTHENTICATED', 'tok']]);
  // A hook that throws, or an async one that rejects, does not fail the page (nor the process).
  for (const hook of [() => { throw new Error('hook'); }, async () => { throw new Error('async hook'); }]) {
    const d = new Client({ address: server.grpc, token: 'nope', deadlineMs: 5000, onRenderError: hook });
    clients.push(d);
    assert.equal(await d.render('tok', '<img src="{{#cdn}}/a.css{{/cdn}}">', {}), '<img src="/a.css">');
  }
  await new Promise((r) => setImmediate(r));
  assert.throws(() => new Client({ onRenderError: 'log' }), /onRenderError must be a function/);
});

test('a publisher token, which may not ask GetInfo, still splits an invalidate past max_batch', async () => {
  const c = make('write-1');
  const paths = Array.from({ length: 25 }, (_, i) => `/split/${i}.css`);
  const last = await c.invalidate('tok', paths);
  const res = await make('read-1').resolve('tok', paths.slice(0, 10));
  for (const [, a] of res) assert.ok(a.cacheId > 0 && a.cacheId <= last);
  assert.equal(c.maxBatch, 10);
});
