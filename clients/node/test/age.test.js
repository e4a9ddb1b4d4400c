'use strict';
// The server sends GOAWAY to connections past grpc_max_connection_age_secs.
// A renderer calling all the while never sees an error: calls in flight
// finish on the old connection and the client opens a new one for the next.
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const { setTimeout: sleep } = require('node:timers/promises');
const { Client } = require('..');
const { startServer } = require('./helpers/server');

let server;
let client;
const BLOG = 'ageblog';

before(async () => {
  server = await startServer({ env: { BLOTCDN_GRPC_MAX_CONNECTION_AGE_SECS: '1' } });
  server.write(BLOG, '/style.css', 'body{}');
  client = new Client({ address: server.grpc, deadlineMs: 5000 });
});

after(async () => {
  client?.close();
  await server?.stop();
});

// The client ports of established connections to the server's gRPC port,
// from /proc/net/tcp (state 01; addresses in hex).
function clientPorts(serverPort) {
  const ports = [];
  for (const line of fs.readFileSync('/proc/net/tcp', 'utf8').split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    if (f.length < 4 || f[3] !== '01') continue;
    const [local, remote] = [f[1], f[2]].map((a) => parseInt(a.split(':')[1], 16));
    if (remote === serverPort) ports.push(local);
  }
  return ports;
}

test('resolve calls across three connection ages all succeed, with the same URL', async () => {
  const floor = await client.invalidate(BLOG);
  const want = `${server.base}/${BLOG}/${floor}/style.css`;
  const until = Date.now() + 3500;
  const errors = [];
  let calls = 0;
  // Which connections the client used, looked at every 100 ms.
  const port = Number(server.grpc.split(':').pop());
  const seen = new Set();
  const watch = (async () => {
    while (Date.now() < until) {
      for (const p of clientPorts(port)) seen.add(p);
      await sleep(100);
    }
  })();
  // Four callers at once, as a renderer's pages overlap.
  await Promise.all(
    [0, 1, 2, 3].map(async () => {
      while (Date.now() < until) {
        try {
          const got = await client.resolve(BLOG, ['/style.css']);
          assert.equal(got.get('/style.css').url, want);
          calls++;
        } catch (e) {
          errors.push(`${e.code || ''} ${e.message}`);
        }
        await sleep(5);
      }
    }),
  );
  await watch;
  assert.deepEqual(errors, [], `${errors.length} of ${calls + errors.length} calls failed`);
  // The server did send the connections away: the client moved to new ones.
  assert.ok(seen.size >= 3, `the client used ${seen.size} connection(s) in 3.5 s of 1 s ages`);
  assert.ok(calls > 100, `only ${calls} calls`);
});
