'use strict';
// resolve() and the publish side against the real server.
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { Readable } = require('node:stream');
const { Client } = require('..');
const { startServer } = require('./helpers/server');

let server;
let client;

before(async () => {
  server = await startServer();
  client = new Client({ address: server.grpc, deadlineMs: 5000 });
});

after(async () => {
  client?.close();
  await server?.stop();
});

async function fetchBytes(url) {
  const res = await fetch(url);
  return { status: res.status, headers: res.headers, body: Buffer.from(await res.arrayBuffer()) };
}

test('invalidate creates the blog and returns increasing cache ids as Numbers', async () => {
  const a = await client.invalidate('pub1');
  const b = await client.invalidate('pub1', ['/style.css']);
  assert.equal(typeof a, 'number');
  assert.ok(b > a);
  const blog = await client.getBlog('pub1');
  assert.equal(blog.blogId, 'pub1');
  assert.equal(blog.cacheId, a);
  assert.equal(typeof blog.pathCount, 'number');
});

test('resolve: a Map keyed by each path as given, with status names', async () => {
  const floor = await client.invalidate('pub2');
  const res = await client.resolve('pub2', ['style.css', '/../x', '/a b.png']);
  assert.ok(res instanceof Map);
  assert.deepEqual([...res.keys()], ['style.css', '/../x', '/a b.png']);
  assert.deepEqual(res.get('style.css'), {
    url: `${server.base}/pub2/${floor}/style.css`,
    status: 'RESOLVE_STATUS_OK',
    cacheId: floor,
    contentHash: '',
  });
  assert.equal(res.get('/../x').status, 'RESOLVE_STATUS_INVALID_PATH');
  assert.equal(res.get('/a b.png').url, `${server.base}/pub2/${floor}/a%20b.png`);
  const unknown = await client.resolve('pub-unknown', ['/x.css']);
  assert.equal(unknown.get('/x.css').status, 'RESOLVE_STATUS_UNKNOWN_BLOG');
});

test('the origin serves what a resolved URL names', async () => {
  server.write('pub3', '/css/site.css', 'body{color:red}');
  await client.invalidate('pub3');
  const { url } = (await client.resolve('pub3', ['/css/site.css'])).get('/css/site.css');
  const got = await fetchBytes(url);
  assert.equal(got.status, 200);
  assert.equal(got.body.toString(), 'body{color:red}');
});

test('putAsset from a Buffer and from a stream: same bytes, same hash, served from the permanent URL', async () => {
  const bytes = Buffer.alloc(200 * 1024 + 7, 'x');
  const a = await client.putAsset('pub4', { filename: 'thumb.png', path: '/thumbs/a.png' }, bytes);
  assert.match(a.hash, /^[0-9a-f]{32}$/);
  assert.equal(a.size, bytes.length);
  assert.equal(a.contentType, 'image/png');
  assert.equal(a.filename, 'thumb.png');
  assert.equal(a.url, `${server.base}/pub4/_assets/${a.hash}/thumb.png`);
  const b = await client.putAsset('pub4', { filename: 'thumb.png', contentType: 'image/png' }, Readable.from([bytes.subarray(0, 1000), bytes.subarray(1000)]));
  assert.equal(b.hash, a.hash);
  const got = await fetchBytes(a.url);
  assert.equal(got.status, 200);
  assert.ok(got.body.equals(bytes));
  const r = (await client.resolve('pub4', ['/thumbs/a.png'])).get('/thumbs/a.png');
  assert.equal(r.url, a.url);
  assert.equal(r.contentHash, a.hash);
});

test('putAsset: a failing source stream rejects with its own error', async () => {
  const broken = new Readable({
    read() {
      this.destroy(new Error('disk gone'));
    },
  });
  await assert.rejects(client.putAsset('pub4', { filename: 'x.bin' }, broken), /disk gone/);
  await assert.rejects(client.putAsset('pub4', { filename: 'x.bin' }, 'not data'), TypeError);
});

test('importFile makes a file on disk permanent', async () => {
  server.write('pub5', '/img/logo.svg', '<svg xmlns="http://www.w3.org/2000/svg"/>');
  const asset = await client.importFile('pub5', '/img/logo.svg');
  assert.equal(asset.url, `${server.base}/pub5/_assets/${asset.hash}/logo.svg`);
  const got = await fetchBytes(asset.url);
  assert.equal(got.body.toString(), '<svg xmlns="http://www.w3.org/2000/svg"/>');
  await assert.rejects(client.importFile('pub5', '/img/missing.svg'), (e) => e.code === 'NOT_FOUND');
});

test('domains: set, look up, remove', async () => {
  await client.invalidate('pub6');
  await client.setDomain('Example.COM', 'pub6');
  assert.equal(await client.lookupDomain('example.com'), 'pub6');
  assert.deepEqual((await client.getBlog('pub6')).domains, ['example.com']);
  await client.removeDomain('example.com');
  await assert.rejects(client.lookupDomain('example.com'), (e) => e.code === 'NOT_FOUND' && /example\.com/.test(e.message));
});

test('deleteBlog: the blog is gone and its URLs answer 404', async () => {
  server.write('pub7', '/a.css', 'a{}');
  await client.invalidate('pub7');
  const { url } = (await client.resolve('pub7', ['/a.css'])).get('/a.css');
  assert.equal((await fetchBytes(url)).status, 200);
  await client.deleteBlog('pub7');
  assert.equal((await fetchBytes(url)).status, 404);
  await assert.rejects(client.getBlog('pub7'), (e) => e.code === 'NOT_FOUND');
});

test('errors carry the status name and the server message', async () => {
  const err = await client.invalidate('not a blog id!').catch((e) => e);
  assert.ok(err instanceof Error);
  assert.equal(err.code, 'INVALID_ARGUMENT');
  assert.doesNotMatch(err.message, /^3 /);
  assert.ok(err.message.length > 0);
  const big = await client.resolve('pub1', Array.from({ length: 10001 }, (_, i) => `/${i}`)).catch((e) => e);
  assert.equal(big.code, 'INVALID_ARGUMENT');
});

test('a wrong argument rejects with INVALID_ARGUMENT naming it, and nothing is sent', async () => {
  const floor = await client.invalidate('pub8', ['/a.css']);
  const bad = async (p, pattern) => {
    const err = await p.then(() => null, (e) => e);
    assert.ok(err instanceof TypeError, `rejected: ${err}`);
    assert.equal(err.code, 'INVALID_ARGUMENT');
    assert.match(err.message, pattern);
  };
  // One record without a path: not "/undefined" invalidated and reported done.
  await bad(client.invalidate('pub8', ['/a.css', undefined]), /invalidate: paths\[1\] must be a string, not undefined/);
  await bad(client.invalidate('pub8', [{ path: '/a.css' }]), /paths\[0\] must be a string, not an object/);
  await bad(client.invalidate('pub8', null), /invalidate: paths must be an array of strings, not null/);
  await bad(client.invalidate('pub8', '/a.css'), /paths must be an array of strings, not the string "\/a.css"/);
  await bad(client.invalidate(undefined), /invalidate: blogId must be a string/);
  await bad(client.resolve('pub8', [7]), /resolve: paths\[0\] must be a string, not the number 7/);
  await bad(client.resolve('pub8', '/a.css'), /resolve: paths must be an array/);
  await bad(client.purge('pub8', 'pub8'), /purge: keys must be an array/);
  await bad(client.getInfo({ deadlineMs: '5000' }), /deadlineMs must be a positive number of milliseconds, not the string "5000"/);
  await bad(client.setDomain('example.com', 42), /setDomain: blogId must be a string/);
  // A number from a database is not sent as "42": the page is not rendered for another blog.
  await bad(client.render(42, '<link href="{{#cdn}}/a.css{{/cdn}}">'), /render: blogId must be a string, not the number 42/);
  const source = Readable.from([Buffer.from('x')]);
  await bad(client.putAsset('pub8', null, source), /putAsset: the header must be an object/);
  assert.ok(source.destroyed, 'the stream of a call never sent is destroyed');
  await bad(client.putAsset('pub8', 'me.png', Buffer.from('x')), /the header must be an object .*not the string "me.png"/);
  await bad(client.putAsset('pub8', { path: '/a.png' }, Buffer.from('x')), /header.filename must be a string, not undefined/);
  await bad(client.putAsset('pub8', { filename: 'x' }, 42), /putAsset: data must be bytes .* or async iterable/);
  // null in a header is "not given", as a field left out.
  const a = await client.putAsset('pub8', { filename: 'n.css', contentType: null, path: null }, Buffer.from('b{}'));
  assert.equal(a.contentType, 'text/css');
  // Nothing reached the server: the floor and /a.css are where they were.
  const res = await client.resolve('pub8', ['/a.css', '/undefined']);
  assert.equal(res.get('/a.css').cacheId, floor);
  assert.ok(res.get('/undefined').cacheId <= floor, 'no /undefined was raised');
  const blog = await client.getBlog('pub8');
  assert.ok(blog.cacheId <= floor);
});
