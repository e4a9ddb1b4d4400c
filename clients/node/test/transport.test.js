'use strict';
// The client's own gRPC over HTTP/2 (lib/transport.js), where grpc-js used to stand:
// a publish rides out a server restart within its deadline, a render does not wait,
// and a server's odd answers come back as gRPC status names. The odd answers come from
// a Node http2 server playing a broken or draining gRPC server, as the real one cannot
// be made to send them on demand.
const { test, after } = require('node:test');
const assert = require('node:assert/strict');
const http2 = require('node:http2');
const net = require('node:net');
const { setTimeout: sleep } = require('node:timers/promises');
const { Client } = require('..');
const { startServer, freePort } = require('./helpers/server');

const closers = [];
after(async () => {
  for (const c of closers.reverse()) await c();
});

test('a publish made while the server restarts waits for it; a render meanwhile does not', async () => {
  const addr = `127.0.0.1:${await freePort()}`;
  let server = await startServer({ grpcAddr: addr });
  closers.push(() => server.stop());
  const client = new Client({ address: addr, deadlineMs: 250, publishDeadlineMs: 15000 });
  closers.push(() => client.close());
  server.write('rblog', '/style.css', 'body{}');
  const before = await client.invalidate('rblog');

  await server.kill();
  // Once the client has seen its connection go (a call sent on a connection as it dies may
  // have been taken, and fails UNAVAILABLE: only a call never taken is sent again).
  await sleep(100);
  const pending = client.invalidate('rblog', ['/style.css']);
  const uploaded = client.putAsset('rblog', { filename: 'late.txt' }, Buffer.from('sent while down'));
  const t0 = Date.now();
  // A render does not wait for the server: its targets render as written, within its deadline.
  const html = await client.render('rblog', '{{#cdn}}/style.css{{/cdn}}', {});
  assert.equal(html, '/style.css');
  assert.ok(Date.now() - t0 < 250 + 1000, `render took ${Date.now() - t0} ms`);
  await sleep(1500);
  server = await startServer({ grpcAddr: addr, dataDir: server.dataDir });
  const after = await pending;
  assert.ok(after > before, `the publish made while down was answered, and durable: ${after} > ${before}`);
  assert.match((await uploaded).hash, /^[0-9a-f]{32}$/, 'an upload made while down waits for the server too');
  // Within the reconnect backoff (2 s at most), pages resolve again.
  const until = Date.now() + 5000;
  let page = '';
  while (Date.now() < until) {
    page = await client.render('rblog', '{{#cdn}}/style.css{{/cdn}}', {});
    if (page !== '/style.css') break;
    await sleep(50);
  }
  assert.match(page, new RegExp(`/rblog/${after}/style\\.css$`));
});

test('a publish whose deadline passes while the server is down fails with DEADLINE_EXCEEDED, at its deadline', async () => {
  const addr = `127.0.0.1:${await freePort()}`;
  // Past the point where the reconnect backoff (100 ms doubling) overshoots it: 1.5 s in.
  const client = new Client({ address: addr, publishDeadlineMs: 2500 });
  closers.push(() => client.close());
  const t0 = Date.now();
  await assert.rejects(client.invalidate('blog'), (e) => e.code === 'DEADLINE_EXCEEDED' && e.message.includes(addr));
  const took = Date.now() - t0;
  assert.ok(took >= 2450 && took < 2500 + 1500, `took ${took} ms`);
});

test('a deadline past what a Node timer holds (24.8 days) is a deadline, not 1 ms', async () => {
  const server = await startServer();
  closers.push(() => server.stop());
  const month = 30 * 24 * 3600 * 1000;
  const client = new Client({ address: server.grpc, deadlineMs: month, publishDeadlineMs: month });
  closers.push(() => client.close());
  for (let i = 0; i < 10; i++) assert.ok((await client.invalidate('mblog', ['/a.css'])) > 0);
  assert.equal((await client.resolve('mblog', ['/a.css'])).get('/a.css').status, 'RESOLVE_STATUS_OK');
});

test('a connection that goes silent (a half-open path) is dropped, and pages resolve again', async () => {
  const server = await startServer();
  closers.push(() => server.stop());
  server.write('hblog', '/a.css', 'a');
  // A TCP relay to the server that can go silent on the connections it holds, as a path that
  // loses its state does: nothing more is passed, nothing is closed. New connections pass.
  const held = [];
  const relay = net.createServer((c) => {
    const up = net.connect(Number(server.grpc.split(':').pop()), '127.0.0.1');
    c.pipe(up);
    up.pipe(c);
    const drop = () => {
      c.destroy();
      up.destroy();
    };
    c.on('error', drop);
    up.on('error', drop);
    held.push({ c, up });
  });
  await new Promise((r) => relay.listen(0, '127.0.0.1', r));
  closers.push(() => new Promise((r) => {
    for (const { c, up } of held) c.destroy() || up.destroy();
    relay.close(r);
  }));
  const client = new Client({ address: `127.0.0.1:${relay.address().port}`, deadlineMs: 250 });
  closers.push(() => client.close());
  const floor = await client.invalidate('hblog');
  const page = () => client.render('hblog', '{{#cdn}}/a.css{{/cdn}}', {});
  assert.match(await page(), new RegExp(`/hblog/${floor}/a\\.css$`));
  for (const { c, up } of held) {
    c.unpipe(up);
    up.unpipe(c);
    c.pause();
    up.pause();
  }
  const t0 = Date.now();
  assert.equal(await page(), '/a.css', 'the silent connection costs a page its deadline');
  let got = '/a.css';
  while (got === '/a.css' && Date.now() - t0 < 6000) {
    await sleep(100);
    got = await page();
  }
  assert.match(got, new RegExp(`/hblog/${floor}/a\\.css$`), `still as written ${Date.now() - t0} ms after the path went silent`);
});

test('a call whose deadline passes while the connection is made does not fail the calls after it', async () => {
  const server = await startServer();
  closers.push(() => server.stop());
  const client = new Client({ address: server.grpc, deadlineMs: 5000 });
  closers.push(() => client.close());
  await assert.rejects(client.resolve('nblog', ['/a'], { deadlineMs: 0.001 }), (e) => e.code === 'DEADLINE_EXCEEDED');
  // At once: the connection it started is made for the next call, not given up as failed.
  const got = await client.resolve('nblog', ['/a']);
  assert.equal(got.get('/a').status, 'RESOLVE_STATUS_UNKNOWN_BLOG');
});

/** A Node http2 server on 127.0.0.1 whose streams `onStream` answers; its address. */
async function fakeServer(onStream) {
  const server = http2.createServer();
  const sessions = new Set();
  server.on('session', (s) => sessions.add(s));
  server.on('stream', (stream, headers) => {
    stream.on('error', () => {}); // the resets this server makes itself
    onStream(stream, headers);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  closers.push(
    () =>
      new Promise((r) => {
        for (const s of sessions) s.destroy();
        server.close(r);
      }),
  );
  return `127.0.0.1:${server.address().port}`;
}

// An empty ResolveBatchResponse, framed; `flag`, `len`: what its prefix says.
function framed(flag = 0, body = Buffer.alloc(0), len = body.length) {
  const f = Buffer.alloc(5 + body.length);
  f[0] = flag;
  f.writeUInt32BE(len, 1);
  body.copy(f, 5);
  return f;
}

test('the deadline and the token go to the server as grpc-timeout and authorization', async () => {
  let seen = null;
  const addr = await fakeServer((stream, headers) => {
    seen = headers;
    stream.respond({ ':status': 200, 'content-type': 'application/grpc' }, { waitForTrailers: true });
    stream.on('wantTrailers', () => stream.sendTrailers({ 'grpc-status': '0' }));
    stream.end(framed());
  });
  const client = new Client({ address: addr, token: 's3cret', deadlineMs: 400 });
  closers.push(() => client.close());
  const got = await client.resolve('blog', []);
  assert.equal(got.size, 0);
  assert.equal(seen[':path'], '/blotcdn.v1.Resolver/ResolveBatch');
  assert.equal(seen['content-type'], 'application/grpc');
  assert.equal(seen.te, 'trailers');
  assert.equal(seen.authorization, 'Bearer s3cret');
  const ms = Number(/^(\d+)m$/.exec(seen['grpc-timeout'])?.[1]);
  assert.ok(ms > 0 && ms <= 400, `grpc-timeout ${seen['grpc-timeout']}`);
});

test("a server's errors and broken answers come back as status names", async () => {
  const cases = {
    // A trailers-only error with a percent-encoded message.
    '/blotcdn.v1.Resolver/GetBlog': (s) =>
      s.respond({ ':status': 200, 'content-type': 'application/grpc', 'grpc-status': '8', 'grpc-message': 'busy%3A 100%25' }, { endStream: true }),
    // Not gRPC at all: an HTTP error.
    '/blotcdn.v1.Resolver/GetInfo': (s) => s.respond({ ':status': 503 }, { endStream: true }),
    // A compressed message, never asked for.
    '/blotcdn.v1.Resolver/LookupDomain': (s) => {
      s.respond({ ':status': 200, 'content-type': 'application/grpc' }, { waitForTrailers: true });
      s.on('wantTrailers', () => s.sendTrailers({ 'grpc-status': '0' }));
      s.end(framed(1, Buffer.from([1, 2])));
    },
    // A whole answer without trailers.
    '/blotcdn.v1.Publisher/GetPurges': (s) => {
      s.respond({ ':status': 200, 'content-type': 'application/grpc' });
      s.end(framed());
    },
    // A prefix that promises more than comes.
    '/blotcdn.v1.Resolver/ResolveBatch': (s) => {
      s.respond({ ':status': 200, 'content-type': 'application/grpc' }, { waitForTrailers: true });
      s.on('wantTrailers', () => s.sendTrailers({ 'grpc-status': '0' }));
      s.end(framed(0, Buffer.alloc(3), 10));
    },
  };
  const addr = await fakeServer((stream, headers) => cases[headers[':path']](stream));
  const client = new Client({ address: addr, publishDeadlineMs: 2000, deadlineMs: 2000 });
  closers.push(() => client.close());
  await assert.rejects(client.getBlog('b'), (e) => e.code === 'RESOURCE_EXHAUSTED' && e.message === 'busy: 100%');
  await assert.rejects(client.getInfo(), (e) => e.code === 'UNAVAILABLE' && /503/.test(e.message));
  await assert.rejects(client.lookupDomain('a.example'), (e) => e.code === 'INTERNAL' && /compressed/.test(e.message));
  await assert.rejects(client.resolve('b', ['/a']), (e) => e.code === 'INTERNAL' && /length prefix/.test(e.message));
  await assert.rejects(client.getPurges(), (e) => e.code === 'INTERNAL' && /without a gRPC status/.test(e.message));
});

test('a call the server refused to start is sent again; one it reset after taking is not', async () => {
  const seen = { '/blotcdn.v1.Resolver/GetBlog': 0, '/blotcdn.v1.Publisher/Invalidate': 0 };
  const addr = await fakeServer((stream, headers) => {
    const n = ++seen[headers[':path']];
    if (headers[':path'] === '/blotcdn.v1.Publisher/Invalidate') {
      // Taken, then the connection's stream reset: the server may have acted on it.
      stream.close(http2.constants.NGHTTP2_INTERNAL_ERROR);
      return;
    }
    if (n === 1) {
      // As a server past its GOAWAY's last stream: refused, never seen.
      stream.close(http2.constants.NGHTTP2_REFUSED_STREAM);
      return;
    }
    stream.respond({ ':status': 200, 'content-type': 'application/grpc' }, { waitForTrailers: true });
    stream.on('wantTrailers', () => stream.sendTrailers({ 'grpc-status': '0' }));
    stream.end(framed());
  });
  const client = new Client({ address: addr, publishDeadlineMs: 2000 });
  closers.push(() => client.close());
  const blog = await client.getBlog('b');
  assert.equal(blog.blogId, '');
  assert.equal(seen['/blotcdn.v1.Resolver/GetBlog'], 2, 'sent again once, after the refusal');
  await assert.rejects(client.invalidate('b'), (e) => e.code === 'UNAVAILABLE');
  assert.equal(seen['/blotcdn.v1.Publisher/Invalidate'], 1, 'a publish the server took is never sent twice');
});

test('close() cancels an upload under way; it does not wait for a server that stopped reading', async () => {
  const server = await startServer();
  closers.push(() => server.stop());
  const client = new Client({ address: server.grpc });
  await client.invalidate('cblog');
  server.child.kill('SIGSTOP');
  closers.push(() => server.child.kill('SIGCONT'));
  // A source that never ends: the upload can only end by being cancelled.
  const { Readable } = require('node:stream');
  const endless = new Readable({ read() { this.push(Buffer.alloc(64 * 1024)); } });
  const upload = client.putAsset('cblog', { filename: 'big.bin' }, endless);
  await sleep(300);
  client.close();
  await assert.rejects(upload, (e) => e.code === 'CANCELLED' && /closed/.test(e.message));
  server.child.kill('SIGCONT');
});

test('an answer that came while a long synchronous render held the event loop is used; the connection is kept', async () => {
  const server = await startServer();
  closers.push(() => server.stop());
  const client = new Client({ address: server.grpc, deadlineMs: 250 });
  closers.push(() => client.close());
  await client.invalidate('lblog');
  const session = client.conn.transport.session;
  const call = client.resolve('lblog', ['/a.css']);
  // Sent (two turns of the loop), then the loop held 2.5 s: past the deadline and past a
  // ping's time to answer, with the answer waiting in the socket.
  await new Promise((r) => setImmediate(r));
  await new Promise((r) => setImmediate(r));
  const t = Date.now();
  while (Date.now() - t < 2500);
  assert.equal((await call).get('/a.css').status, 'RESOLVE_STATUS_OK');
  await sleep(2500);
  assert.equal(client.conn.transport.session, session, 'a healthy connection was dropped');
  assert.ok(!session.destroyed);
});

test('pages cancelled at their deadline by the dozen while the server stalls do not take the connection down with them', async () => {
  const server = await startServer();
  closers.push(() => server.stop());
  server.write('sblog', '/a.css', 'a');
  const client = new Client({ address: server.grpc, deadlineMs: 250, publishDeadlineMs: 10000 });
  closers.push(() => client.close());
  const floor = await client.invalidate('sblog');
  server.child.kill('SIGSTOP');
  closers.push(() => server.child.kill('SIGCONT'));
  // 100 pages, each cancelled (RST_STREAM) at its deadline before the stalled server took it
  // up; a publish on the same connection meanwhile.
  const pages = Array.from({ length: 100 }, () => client.render('sblog', '{{#cdn}}/a.css{{/cdn}}', {}));
  const publish = client.invalidate('sblog', ['/a.css']);
  await sleep(400);
  server.child.kill('SIGCONT');
  for (const html of await Promise.all(pages)) assert.equal(html, '/a.css');
  assert.ok((await publish) > floor, 'the publish on the same connection was answered');
  assert.match(await client.render('sblog', '{{#cdn}}/a.css{{/cdn}}', {}), /\/sblog\/\d+\/a\.css$/);
});

test('an upload over a slow uplink outlasts the keepalive: a link that carries bytes is alive', async () => {
  const server = await startServer();
  closers.push(() => server.stop());
  // A relay that carries the client's bytes at 150 kB/s, the server's at full speed.
  const RATE = 150 * 1024;
  const relay = net.createServer((c) => {
    const up = net.connect(Number(server.grpc.split(':').pop()), '127.0.0.1');
    up.pipe(c);
    c.on('data', (chunk) => {
      c.pause();
      up.write(chunk);
      setTimeout(() => c.resume(), (chunk.length / RATE) * 1000);
    });
    const drop = () => {
      c.destroy();
      up.destroy();
    };
    c.on('error', drop);
    up.on('error', drop);
    c.on('close', drop);
  });
  await new Promise((r) => relay.listen(0, '127.0.0.1', r));
  closers.push(() => new Promise((r) => relay.close(r)));
  const client = new Client({ address: `127.0.0.1:${relay.address().port}` });
  closers.push(() => client.close());
  await client.invalidate('ublog');
  // About 14 s on this link: past the 10 s keepalive, with a megabyte or so queued ahead of
  // any ping.
  const bytes = Buffer.alloc(2 * 1024 * 1024, 7);
  const asset = await client.putAsset('ublog', { filename: 'slow.bin' }, bytes);
  assert.equal(asset.size, bytes.length);
});

test('an upload that never starts leaves its stream closed, not its file open', async () => {
  const fs = require('node:fs');
  const os = require('node:os');
  const path = require('node:path');
  const file = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'blotcdn-up-')), 'a.bin');
  fs.writeFileSync(file, Buffer.alloc(1024));
  closers.push(() => fs.rmSync(path.dirname(file), { recursive: true, force: true }));
  const client = new Client({ address: `127.0.0.1:${await freePort()}`, publishDeadlineMs: 300 });
  closers.push(() => client.close());
  const source = fs.createReadStream(file);
  await assert.rejects(client.putAsset('blog', { filename: 'a.bin' }, source), (e) => e.code === 'DEADLINE_EXCEEDED');
  assert.ok(source.destroyed, 'the source stream was left open');
});

test('close() cancels an upload whose source is idle, at once, and closes the source', async () => {
  const server = await startServer();
  closers.push(() => server.stop());
  const client = new Client({ address: server.grpc });
  await client.invalidate('iblog');
  const { Readable } = require('node:stream');
  let pushed = false;
  // One chunk, then nothing more for ever (a source waiting on its own upstream).
  const idle = new Readable({
    read() {
      if (!pushed) this.push(Buffer.alloc(1024, 1));
      pushed = true;
    },
  });
  const upload = client.putAsset('iblog', { filename: 'idle.bin' }, idle);
  await sleep(300);
  const t0 = Date.now();
  client.close();
  await assert.rejects(upload, (e) => e.code === 'CANCELLED');
  assert.ok(Date.now() - t0 < 500, `settled ${Date.now() - t0} ms after close()`);
  assert.ok(idle.destroyed, 'the idle source was left open');
});

/**
 * Against a peer at `address` that never answers a call: a publish waits to its 1.5 s
 * deadline, pages meanwhile render as written without a connection each, and the peer sees
 * at most `most` connections (`seen()`), as the backoff (100 ms doubling) allows.
 */
async function backoffHolds(address, seen, most) {
  const client = new Client({ address, deadlineMs: 250, publishDeadlineMs: 1500 });
  closers.push(() => client.close());
  const t0 = Date.now();
  const publish = client.invalidate('blog');
  for (let i = 0; i < 50; i++) {
    assert.equal(await client.render('blog', '{{#cdn}}/a.css{{/cdn}}', {}), '/a.css');
    await sleep(20);
  }
  await assert.rejects(publish, (e) => e.code === 'DEADLINE_EXCEEDED');
  assert.ok(Date.now() - t0 >= 1450, `the publish gave up after ${Date.now() - t0} ms`);
  assert.ok(seen() <= most, `${seen()} connections in 1.5 s: the backoff (100 ms doubling) did not hold`);
}

test('a peer that accepts and closes at once is a failed connection: backoff, and publishes wait to their deadline', async () => {
  let accepted = 0;
  const lb = net.createServer((c) => {
    accepted++;
    c.destroy();
  });
  await new Promise((r) => lb.listen(0, '127.0.0.1', r));
  closers.push(() => new Promise((r) => lb.close(r)));
  await backoffHolds(`127.0.0.1:${lb.address().port}`, () => accepted, 8);
});

test('a call already past its deadline opens no stream', async () => {
  let streams = 0;
  const addr = await fakeServer((stream) => {
    streams++;
    stream.respond({ ':status': 200, 'content-type': 'application/grpc' }, { waitForTrailers: true });
    stream.on('wantTrailers', () => stream.sendTrailers({ 'grpc-status': '0' }));
    stream.end(framed());
  });
  const client = new Client({ address: addr, deadlineMs: 1, cdnBaseUrl: 'https://cdn.example' });
  closers.push(() => client.close());
  await client.getInfo(); // connected
  streams = 0;
  const session = client.conn.transport.session;
  const nextId = session.state.nextStreamID;
  // As a page's call is when a long synchronous render held the event loop past its deadline.
  for (let i = 0; i < 20; i++) {
    const past = new Date(Date.now() - 1);
    await assert.rejects(
      client.conn.unary('resolver', 'ResolveBatch', { blogId: 'blog', paths: ['/x.css'] }, { deadline: past }),
      (e) => e.code === 'DEADLINE_EXCEEDED',
    );
  }
  assert.equal(streams, 0, 'calls sent past their deadline');
  assert.equal(session.state.nextStreamID, nextId, 'streams opened for calls past their deadline');
});

test('a peer that sends its settings and then a GOAWAY, again and again, gets the backoff; publishes wait', async () => {
  let sessions = 0;
  const open = new Set();
  const server = http2.createServer();
  server.on('session', (session) => {
    sessions++;
    open.add(session);
    session.on('error', () => {});
    session.goaway(http2.constants.NGHTTP2_NO_ERROR, 0);
  });
  server.on('stream', (stream) => stream.close(http2.constants.NGHTTP2_REFUSED_STREAM));
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  closers.push(
    () =>
      new Promise((r) => {
        for (const s of open) s.destroy();
        server.close(r);
      }),
  );
  await backoffHolds(`127.0.0.1:${server.address().port}`, () => sessions, 10);
});

test('close() ends an upload whose source is an idle async generator', async () => {
  const server = await startServer();
  closers.push(() => server.stop());
  const client = new Client({ address: server.grpc });
  await client.invalidate('gblog');
  async function* idle() {
    yield Buffer.alloc(1024, 2);
    await new Promise(() => {}); // waits on its own upstream for ever
  }
  const upload = client.putAsset('gblog', { filename: 'gen.bin' }, idle());
  await sleep(300);
  const t0 = Date.now();
  client.close();
  await assert.rejects(upload, (e) => e.code === 'CANCELLED');
  assert.ok(Date.now() - t0 < 500, `settled ${Date.now() - t0} ms after close()`);
});

test('upload sources: any bytes are stored whole; a piece that is not bytes fails the upload, nothing stored', async () => {
  const server = await startServer();
  closers.push(() => server.stop());
  const client = new Client({ address: server.grpc });
  closers.push(() => client.close());
  await client.invalidate('kblog');
  const bytes = Buffer.from('0123456789abcdef'.repeat(8192)); // 128 KiB
  const ab = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length);
  const sources = {
    ArrayBuffer: ab,
    DataView: new DataView(ab),
    Uint16Array: new Uint16Array(ab),
    'stream of ArrayBuffers and DataViews': (async function* () {
      yield ab.slice(0, 1000);
      yield new DataView(ab, 1000, 1000);
      yield new Uint8Array(ab, 2000);
    })(),
  };
  for (const [kind, data] of Object.entries(sources)) {
    const asset = await client.putAsset('kblog', { filename: 'k.bin' }, data);
    assert.equal(asset.size, bytes.length, kind);
    const res = await fetch(asset.url);
    assert.ok(Buffer.from(await res.arrayBuffer()).equals(bytes), `${kind}: the stored bytes differ`);
  }
  const odd = (async function* () {
    yield Buffer.from('head');
    yield { not: 'bytes' };
  })();
  await assert.rejects(client.putAsset('kblog', { filename: 'odd.bin', path: '/odd.bin' }, odd), (e) => e instanceof TypeError && /not bytes/.test(e.message));
  const got = await client.resolve('kblog', ['/odd.bin']);
  assert.equal(got.get('/odd.bin').contentHash, '', 'an upload that failed bound its path');
});

test('a connection heard from while its ping was out, then silent, is probed again and dropped', async () => {
  // The transport's probe on a stand-in session (a real one cannot be made to answer a call
  // and then drop exactly the ping's answer): its ping is never answered.
  const { Transport } = require('../lib/transport');
  const t = new Transport('127.0.0.1:1');
  const s = { calls: 1, uploads: 0, progressAt: 0, probing: false, destroyed: false, closed: false };
  s.ping = () => true;
  s.destroy = () => {
    s.destroyed = true;
  };
  t.probe(s, 0);
  assert.equal(s.probing, true);
  await sleep(100);
  s.progressAt = Date.now(); // a call's answer came meanwhile
  await sleep(2200);
  assert.equal(s.destroyed, false, 'dropped though it answered a call');
  assert.equal(s.probing, false, 'still marked as pinging: never probed again');
  t.probe(s, 0); // the path goes silent: the next probe finds it
  await sleep(2200);
  assert.equal(s.destroyed, true);
});
