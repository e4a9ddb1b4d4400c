'use strict';
// deleteAsset, purge and getPurges against the real server, with an `http`
// purge target: a local endpoint that records what it is sent.
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const http = require('node:http');
const { setTimeout: sleep } = require('node:timers/promises');
const { Client } = require('..');
const { startServer } = require('./helpers/server');

let server;
let client;
let hook;
const got = [];

before(async () => {
  hook = http.createServer((req, res) => {
    let body = '';
    req.on('data', (d) => (body += d));
    req.on('end', () => {
      got.push({ method: req.method, url: req.url, body: JSON.parse(body) });
      res.end('{}');
    });
  });
  await new Promise((r) => hook.listen(0, '127.0.0.1', r));
  const url = `http://127.0.0.1:${hook.address().port}/purge`;
  server = await startServer({ env: { BLOTCDN_PURGE_URLS: `http=${url}` } });
  client = new Client({ address: server.grpc, deadlineMs: 5000 });
});

after(async () => {
  client?.close();
  await server?.stop();
  hook?.close();
});

async function drained() {
  for (let i = 0; i < 250; i++) {
    const q = await client.getPurges();
    if (q.every((x) => x.length === 0)) return q;
    await sleep(20);
  }
  throw new Error(`purges still waiting: ${JSON.stringify(await client.getPurges())}`);
}

test('deleteAsset: the permanent URL answers 404 and its key is purged', async () => {
  const asset = await client.putAsset('npurge', { filename: 'a.png' }, Buffer.from('png bytes'));
  assert.equal((await fetch(asset.url)).status, 200);
  await client.deleteAsset('npurge', asset.hash);
  assert.equal((await fetch(asset.url)).status, 404);
  await drained();
  assert.deepEqual(got.at(-1), { method: 'POST', url: '/purge', body: { keys: [`npurge/${asset.hash}`] } });
  await assert.rejects(client.deleteAsset('npurge', asset.hash), (e) => e.code === 'NOT_FOUND');
});

test('purge and getPurges', async () => {
  await client.purge('npurge');
  await client.purge('npurge', ['npurge/pages']);
  const q = await drained();
  assert.equal(q.length, 1);
  assert.equal(q[0].target, `http-127.0.0.1-${hook.address().port}`);
  assert.equal(q[0].lastError, '');
  assert.equal(q[0].oldestMs, 0);
  assert.equal(typeof q[0].sent, 'number');
  assert.ok(q[0].sent >= 3);
  const keys = got.flatMap((g) => g.body.keys);
  assert.ok(keys.includes('npurge') && keys.includes('npurge/pages'), JSON.stringify(got));
  await assert.rejects(client.purge('npurge', ['other-blog']), (e) => e.code === 'INVALID_ARGUMENT');
});
