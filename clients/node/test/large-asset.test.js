'use strict';
// putAsset streams in bounded memory: a large generated stream goes up at the
// pace the server takes it, and comes back intact from the permanent URL.
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { Readable } = require('node:stream');
const { Client } = require('..');
const { startServer } = require('./helpers/server');

const SIZE = 256 * 1024 * 1024;
const PIECE = 1024 * 1024;

let server;
let small;
let client;

before(async () => {
  server = await startServer({ env: { BLOTCDN_MAX_ASSET_BYTES: String(512 * 1024 * 1024) } });
  small = await startServer({ env: { BLOTCDN_MAX_ASSET_BYTES: String(1024 * 1024) } });
  client = new Client({ address: server.grpc });
});

after(async () => {
  client?.close();
  await server?.stop();
  await small?.stop();
});

/** Pseudo-random bytes (AES-CTR over zeros), `size` of them or forever; hashes what it gave. */
function generated(size) {
  const cipher = crypto.createCipheriv('aes-128-ctr', Buffer.alloc(16, 7), Buffer.alloc(16, 0));
  const zeros = Buffer.alloc(PIECE);
  const sha = crypto.createHash('sha256');
  let left = size;
  const stream = new Readable({
    read() {
      if (left <= 0) return this.push(null);
      const n = Math.min(PIECE, left);
      const piece = cipher.update(zeros.subarray(0, n));
      sha.update(piece);
      left -= n;
      this.push(piece);
    },
  });
  stream.digest = () => sha.digest('hex');
  return stream;
}

test(`a ${SIZE / 1024 / 1024} MiB stream: right size and bytes, RSS bounded`, async (t) => {
  global.gc?.();
  const baseline = process.memoryUsage().rss;
  let peak = baseline;
  const timer = setInterval(() => {
    peak = Math.max(peak, process.memoryUsage().rss);
  }, 10);
  const source = generated(SIZE);
  let asset;
  try {
    asset = await client.putAsset('big', { filename: 'video.bin', path: '/video.bin' }, source);
  } finally {
    clearInterval(timer);
  }
  peak = Math.max(peak, process.memoryUsage().rss);
  const grew = (peak - baseline) / 1024 / 1024;
  t.diagnostic(`RSS grew by ${grew.toFixed(1)} MiB while uploading ${SIZE / 1024 / 1024} MiB`);
  assert.equal(asset.size, SIZE);
  assert.match(asset.hash, /^[0-9a-f]{32}$/);
  // Buffered whole, the upload would add at least SIZE to the RSS; streamed with
  // back-pressure it adds a few tens of MiB whatever the size (measured: ~45 MiB for 64 MiB, ~55 MiB for 320 MiB).
  assert.ok(grew < SIZE / 1024 / 1024 / 2, `RSS grew by ${grew.toFixed(1)} MiB during the upload`);

  const sent = source.digest();
  const res = await fetch(asset.url);
  assert.equal(res.status, 200);
  const sha = crypto.createHash('sha256');
  let got = 0;
  for await (const piece of res.body) {
    sha.update(piece);
    got += piece.length;
  }
  assert.equal(got, SIZE);
  assert.equal(sha.digest('hex'), sent);
});

test('past max_asset_bytes: RESOURCE_EXHAUSTED, and an endless source stops being read', async () => {
  const c = new Client({ address: small.grpc });
  try {
    const endless = generated(Number.MAX_SAFE_INTEGER);
    await assert.rejects(c.putAsset('big', { filename: 'x.bin' }, endless), (e) => e.code === 'RESOURCE_EXHAUSTED');
    assert.ok(endless.destroyed);
  } finally {
    c.close();
  }
});
