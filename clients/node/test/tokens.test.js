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

test('onRenderError hears why a page rendered as written', async () => {
  const heard = [];
  const c = new Client({ address: server.grpc, token: 'nope', deadlineMs: 5000, onRenderError: (err, blogId) => heard.push([err.code, blogId]) });
  clients.push(c);
  assert.equal(await c.render('tok', '<img src="{{#cdn}}/a.css{{/cdn}}">{{cdn}}', {}), '<img src="/a.css">');
  assert.ok(heard.length >= 1, 'heard at least the batch');
  assert.ok(heard.every(([code, blog]) => code === 'UNAUTHENTICATED' && blog === 'tok'), JSON.stringify(heard));
  // A hook that throws does not fail the page.
  const d = new Client({ address: server.grpc, token: 'nope', deadlineMs: 5000, onRenderError: () => { throw new Error('hook'); } });
  clients.push(d);
  assert.equal(await d.render('tok', '<img src="{{#cdn}}/a.css{{/cdn}}">', {}), '<img src="/a.css">');
  assert.throws(() => new Client({ onRenderError: 'log' }), /onRenderError must be a function/);
});
