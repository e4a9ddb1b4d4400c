'use strict';
// A path that is not well-formed Unicode (a lone surrogate: an emoji cut in two by
// .slice()) cannot be sent: gRPC encodes it as invalid UTF-8 and the server refuses
// the whole ResolveBatch. Such a target alone renders as written; the rest of the page
// resolves. resolve() answers it RESOLVE_STATUS_INVALID_PATH, as the server would.
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { Client } = require('..');
const { startServer, callRecorder } = require('./helpers/server');

const BLOG = 'surrogateblog';
const CUT = 'Hello 😀 world'.slice(0, 7); // 'Hello \ud83d', as truncating a title does
let server;
let client;
let rec;
let floor;

before(async () => {
  server = await startServer();
  rec = callRecorder();
  client = rec.attach(new Client({ address: server.grpc, deadlineMs: 5000 }));
  floor = await client.invalidate(BLOG);
});

after(async () => {
  client?.close();
  await server?.stop();
});

const v = (p) => `${server.base}/${BLOG}/${floor}/${p}`;

test('a target with a lone surrogate renders as written; the other targets of the page resolve', async () => {
  assert.equal(CUT.isWellFormed(), false);
  // Learn max_batch first, so that the calls below are the page's only.
  await client.render(BLOG, '{{#cdn}}/style.css{{/cdn}}', {});
  rec.reset();
  const tpl = '<link href="{{#cdn}}/style.css{{/cdn}}"><img src="{{#cdn}}/img/{{title}}.png{{/cdn}}"><img src="{{#asset}}/img/Hello.png{{/asset}}"><a href="{{#cdn}}/x&#xD800;y{{/cdn}}">';
  const html = await client.render(BLOG, tpl, { title: CUT });
  assert.equal(
    html,
    `<link href="${v('style.css')}"><img src="/img/${CUT}.png"><img src="${v('img/Hello.png')}"><a href="/x&#xD800;y">`,
  );
  const batches = rec.calls.filter((c) => c.method === 'ResolveBatch');
  assert.equal(batches.length, 1);
  assert.deepEqual(batches[0].request.paths.sort(), ['/img/Hello.png', '/style.css']);
  // The page refused nothing, so the client still knows max_batch: no GetInfo.
  assert.equal(rec.count('GetInfo'), 0);
});

test('a lone surrogate in the query only: the path resolves', async () => {
  const html = await client.render(BLOG, '{{#cdn}}/style.css?t={{title}}{{/cdn}}', { title: CUT });
  assert.equal(html, `${v('style.css')}?t=${CUT}`);
});

test('a page whose only target has a lone surrogate makes no call', async () => {
  rec.reset();
  const html = await client.render(BLOG, '<img src="{{#cdn}}/img/{{title}}.png{{/cdn}}">', { title: CUT });
  assert.equal(html, `<img src="/img/${CUT}.png">`);
  assert.equal(rec.calls.length, 0);
});

test('resolve() answers a lone surrogate RESOLVE_STATUS_INVALID_PATH, and the other paths as usual', async () => {
  rec.reset();
  const bad = `/img/${CUT}.png`;
  const answers = await client.resolve(BLOG, ['/style.css', bad, '/../nope', '\udc00']);
  assert.deepEqual([...answers.keys()], ['/style.css', bad, '/../nope', '\udc00']);
  assert.deepEqual(answers.get('/style.css'), { url: v('style.css'), status: 'RESOLVE_STATUS_OK', cacheId: floor, contentHash: '' });
  const invalid = { url: '', status: 'RESOLVE_STATUS_INVALID_PATH', cacheId: 0, contentHash: '' };
  assert.deepEqual(answers.get(bad), invalid);
  assert.deepEqual(answers.get('/../nope'), invalid, 'what the server answers an invalid path');
  assert.deepEqual(answers.get('\udc00'), invalid);
  assert.deepEqual(rec.calls.find((c) => c.method === 'ResolveBatch').request.paths, ['/style.css', '/../nope']);
  // Only malformed paths: the call is still made, so a blog id or token the server
  // refuses is still reported.
  assert.deepEqual(await client.resolve(BLOG, [bad]), new Map([[bad, invalid]]));
  await assert.rejects(client.resolve('not a blog id!', [bad]), (e) => e.code === 'INVALID_ARGUMENT');
});
