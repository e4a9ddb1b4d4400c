'use strict';
// The server refuses a call when its request memory (grpc_memory_bytes) is taken by other
// calls, and the caller is to retry: the client does, within the call's deadline. Here a
// budget with room for one large batch at a time, and eight large batches at once: all are
// answered. Before, seven failed with RESOURCE_EXHAUSTED.
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { Client } = require('..');
const { startServer } = require('./helpers/server');

const BLOG = 'busyblog';
let server;
let client;

before(async () => {
  server = await startServer({ env: { BLOTCDN_GRPC_MEMORY_BYTES: String(16 * 1024 * 1024) } });
  client = new Client({ address: server.grpc, deadlineMs: 60000, publishDeadlineMs: 60000 });
  await client.invalidate(BLOG);
});

after(async () => {
  client?.close();
  await server?.stop();
});

test('large calls refused for a busy request memory are sent again until answered', async () => {
  const paths = Array.from({ length: 3000 }, (_, i) => `/${String(i).padStart(4, '0')}/${'y'.repeat(900)}`);
  const got = await Promise.all(Array.from({ length: 8 }, () => client.resolve(BLOG, paths)));
  for (const m of got) assert.equal(m.size, 3000);
  const ids = await Promise.all(Array.from({ length: 8 }, () => client.invalidate(BLOG, paths)));
  assert.equal(new Set(ids).size, 8, 'eight invalidations, each acknowledged');
});
