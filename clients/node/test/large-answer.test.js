'use strict';
// A page within max_batch whose answer is larger than 16 MiB (long paths that percent-encode
// three bytes for one): it resolves whole. Before, the client's own 16 MiB receive limit
// failed the call and the whole page rendered as written.
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { Client } = require('..');
const { startServer } = require('./helpers/server');

const BLOG = 'bigansw';
let server;
let client;
let floor;

before(async () => {
  server = await startServer();
  client = new Client({ address: server.grpc, deadlineMs: 30000 });
  floor = await client.invalidate(BLOG);
});

after(async () => {
  client?.close();
  await server?.stop();
});

test('a batch whose answer passes 16 MiB resolves whole', async () => {
  const paths = Array.from({ length: 6000 }, (_, i) => `/${'é'.repeat(500)}${i}`);
  const got = await client.resolve(BLOG, paths);
  assert.equal(got.size, 6000);
  const last = got.get(paths[5999]);
  assert.equal(last.status, 'RESOLVE_STATUS_OK');
  assert.equal(last.url, `${server.base}/${BLOG}/${floor}/${'%C3%A9'.repeat(500)}5999`);
});
