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
  server = await startServer({ env: { BLOTCDN_RESOLVER_TOKENS: 'read-1', BLOTCDN_PUBLISHER_TOKENS: 'write-1' } });
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
