'use strict';
// What a section's text means: a `?query` or `#fragment` written in the template is
// kept after the URL, but a `?` or `#` from the view is part of the file's name, and
// only the ASCII whitespace of template formatting is trimmed. Each URL is fetched
// from the server as a browser would (attribute read, entities decoded, `#` starts a
// fragment), and must serve the file meant, never a neighbour with a shorter name.
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { Client } = require('..');
const { startServer, callRecorder } = require('./helpers/server');

const BLOG = 'pathsblog';
// Each file next to the neighbour a wrong cut or trim would link instead.
const FILES = {
  'images/c#.png': 'the c#.png file',
  'images/c': 'the c file',
  'images/what?.jpg': 'the what?.jpg file',
  'images/what': 'the what file',
  'images/a#b?c.png': 'the a#b?c.png file',
  'images/a': 'the a file',
  'images/nb\u00a0': 'the nb+NBSP file',
  'images/nb': 'the nb file',
  'images/\u3000x': 'the U+3000+x file',
  'images/x': 'the x file',
  'images/y\ufeff': 'the y+U+FEFF file',
  'images/y': 'the y file',
  'images/z\u2003.png': 'the z+EM SPACE.png file',
  'images/z.png': 'the z.png file',
  'style.css': 'the style.css file',
};

let server;
let client;
let rec;

before(async () => {
  server = await startServer();
  rec = callRecorder();
  client = rec.attach(new Client({ address: server.grpc, deadlineMs: 5000 }));
  for (const [p, bytes] of Object.entries(FILES)) server.write(BLOG, p, bytes);
  await client.invalidate(BLOG);
});

after(async () => {
  client?.close();
  await server?.stop();
});

/** The value of each src="…" on the page, as a browser reads the attribute. */
function srcs(html) {
  const named = { amp: '&', lt: '<', gt: '>', quot: '"' };
  return [...html.matchAll(/src="([^"]*)"/g)].map((m) =>
    m[1].replace(/&(amp|lt|gt|quot);|&#39;/g, (e, name) => (name ? named[name] : "'")),
  );
}

/** What a browser gets for a URL: the fragment is not sent. */
async function fetchText(url) {
  const res = await fetch(url);
  assert.equal(res.status, 200, `GET ${url}`);
  return res.text();
}

async function renderSending(template, view) {
  rec.reset();
  const html = await client.render(BLOG, template, view);
  const batches = rec.calls.filter((c) => c.method === 'ResolveBatch');
  assert.equal(batches.length, 1, 'one ResolveBatch for the page');
  return { html, sent: batches[0].request.paths };
}

test('a `#` or `?` from the view is part of the path: the URL serves that file, not its neighbour', async () => {
  const tpl = '<img src="{{#cdn}}/images/{{n}}.png{{/cdn}}"><img src="{{#cdn}}/images/{{q}}.jpg{{/cdn}}"><img src="{{#cdn}}/images/{{{both}}}{{/cdn}}">';
  const { html, sent } = await renderSending(tpl, { n: 'c#', q: 'what?', both: 'a#b?c.png' });
  assert.deepEqual(sent.sort(), ['/images/a#b?c.png', '/images/c#.png', '/images/what?.jpg']);
  const urls = srcs(html);
  assert.equal(urls.length, 3);
  for (const url of urls) assert.ok(url.startsWith(`${server.base}/${BLOG}/`), `${url} is a CDN URL`);
  assert.deepEqual(
    await Promise.all(urls.map(fetchText)),
    [FILES['images/c#.png'], FILES['images/what?.jpg'], FILES['images/a#b?c.png']],
  );
  // The name's `#` and `?` stay percent-encoded in the page: nothing undoes the server's encoding.
  assert.ok(urls[0].endsWith('/images/c%23.png') && urls[1].endsWith('/images/what%3F.jpg'), urls.join(' '));
});

test('a ?query or #fragment written in the template is kept after the URL of the path from the view', async () => {
  const tpl = '<img src="{{#cdn}}/images/{{n}}.png?w=200&amp;h={{h}}#top{{/cdn}}"><img src="{{#cdn}}/images/{{q}}.jpg#{{frag}}{{/cdn}}">';
  const { html, sent } = await renderSending(tpl, { n: 'c#', h: '1&2', q: 'what?', frag: 'x?y' });
  assert.deepEqual(sent.sort(), ['/images/c#.png', '/images/what?.jpg']);
  const [a, b] = srcs(html);
  assert.ok(a.endsWith('/images/c%23.png?w=200&h=1&2#top'), a);
  assert.ok(b.endsWith('/images/what%3F.jpg#x?y'), b);
  assert.equal(new URL(a).searchParams.get('w'), '200');
  assert.equal(await fetchText(a), FILES['images/c#.png']);
  assert.equal(await fetchText(b), FILES['images/what?.jpg']);
});

test('where a query or fragment starts in the template: entities, nested sections, set delimiters', async () => {
  const tpl = [
    '{{#cdn}}/style.css&#63;v=1{{/cdn}}', // an entity for `?` written in the template starts the query
    '{{#cdn}}/images&#x2F;{{n}}.png{{/cdn}}', // the `#` of an entity is not a fragment
    '{{#cdn}}/style.css{{#v}}?v={{v}}{{/v}}{{/cdn}}', // a section whose text starts with `?`
    '{{#cdn}}/images/{{n}}.png{{#none}}?v=1{{/none}}{{/cdn}}', // ...that renders nothing
    '{{#cdn}}/images/{{#img}}{{n}}.png{{/img}}{{/cdn}}', // a `#` from the view inside a section
    '{{#cdn}}{{=<% %>=}}/images/<%n%>.png?w=1<%={{ }}=%>{{/cdn}}', // set delimiters before the `?`
    '{{#cdn}}/style.css&#63v=3{{/cdn}}', // a numeric entity without its `;`, as a browser reads it
    '{{#cdn}}/style.css&quest;v=4{{/cdn}}', // a named one
  ].join('|');
  const { html, sent } = await renderSending(tpl, { n: 'c#', v: 2, img: true });
  assert.deepEqual(sent.sort(), ['/images/c#.png', '/style.css']);
  const cdn = `${server.base}/${BLOG}/`;
  const parts = html.split('|');
  assert.equal(parts.length, 8);
  assert.ok(parts[0].startsWith(cdn) && parts[0].endsWith('/style.css?v=1'), parts[0]);
  assert.ok(parts[1].endsWith('/images/c%23.png'), parts[1]);
  assert.ok(parts[2].endsWith('/style.css?v=2'), parts[2]);
  assert.ok(parts[3].endsWith('/images/c%23.png'), parts[3]);
  assert.ok(parts[4].endsWith('/images/c%23.png'), parts[4]);
  assert.ok(parts[5].endsWith('/images/c%23.png?w=1'), parts[5]);
  assert.equal(await fetchText(parts[5]), FILES['images/c#.png']);
  assert.ok(parts[6].endsWith('/style.css?v=3'), parts[6]);
  assert.ok(parts[7].endsWith('/style.css?v=4'), parts[7]);

  // Without v, the nested section renders nothing: the URL has no query.
  const { html: bare } = await renderSending('{{#cdn}}/style.css{{#v}}?v={{v}}{{/v}}{{/cdn}}', {});
  assert.ok(bare.startsWith(cdn) && bare.endsWith('/style.css'), bare);
});

test('only ASCII whitespace around the target is trimmed: NBSP, U+3000, U+FEFF are part of the name', async () => {
  const tpl = [
    '<img src="{{#cdn}}\n\t /images/{{a}} \r\n{{/cdn}}">',
    '<img src="{{#cdn}} images/{{b}}{{/cdn}}">',
    '<img src="{{#cdn}}/images/{{c}}\n{{/cdn}}">',
    '<img src="{{#cdn}}/images/z{{d}}.png\t{{/cdn}}">',
    '<img src="{{#cdn}}  /images/{{e}}  {{/cdn}}">',
  ].join('');
  const view = { a: 'nb\u00a0', b: '\u3000x', c: 'y\ufeff', d: '\u2003', e: 'nb' };
  const { html, sent } = await renderSending(tpl, view);
  assert.deepEqual(sent.sort(), ['/images/nb', '/images/nb\u00a0', '/images/y\ufeff', '/images/z\u2003.png', '/images/\u3000x'].sort());
  const bodies = await Promise.all(srcs(html).map(fetchText));
  assert.deepEqual(bodies, [
    FILES['images/nb\u00a0'],
    FILES['images/\u3000x'],
    FILES['images/y\ufeff'],
    FILES['images/z\u2003.png'],
    FILES['images/nb'],
  ]);
});

test('a target that does not resolve renders as written, its `#` and `?` included', async () => {
  const { html } = await renderSending('<img src="{{#cdn}}/images/{{n}}/../x.png?w=1{{/cdn}}">', { n: 'c#' });
  assert.equal(html, '<img src="/images/c#/../x.png?w=1">');
});
