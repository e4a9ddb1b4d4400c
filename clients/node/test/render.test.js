'use strict';
// render(): the page a reader gets, against the real server.
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { Client } = require('..');
const { startServer, callRecorder } = require('./helpers/server');

let server;
let client;
let rec;
let floor;
const BLOG = 'renderblog';

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

async function renderCounting(template, view, partials, c = client) {
  rec.reset();
  const html = await c.render(BLOG, template, view, partials);
  return { html, batches: rec.calls.filter((x) => x.method === 'ResolveBatch') };
}

test('static targets, both default tags, trimmed, leading slash added', async () => {
  const tpl = '<link href="{{#cdn}}/style.css{{/cdn}}"><script src="{{#asset}}  app.js\n{{/asset}}"></script>';
  const { html, batches } = await renderCounting(tpl, {});
  assert.equal(html, `<link href="${v('style.css')}"><script src="${v('app.js')}"></script>`);
  assert.equal(batches.length, 1);
  assert.deepEqual(batches[0].request.paths.sort(), ['/app.js', '/style.css']);
});

test('targets built from the view, in nested loops and partials: one batch, duplicates once', async () => {
  const tpl = '{{#posts}}{{> post}}{{/posts}}<link href="{{#cdn}}/style.css{{/cdn}}">';
  const partials = {
    post: '<article><img src="{{#cdn}}/images/{{slug}}.png{{/cdn}}">{{#tags}}<i style="background:url({{#cdn}}/icons/{{.}}.svg{{/cdn}})"></i>{{/tags}}</article>',
  };
  const posts = [];
  for (let i = 0; i < 30; i++) posts.push({ slug: `post-${i}`, tags: ['a', 'b', i % 2 ? 'c' : 'a'] });
  const { html, batches } = await renderCounting(tpl, { posts }, partials);
  assert.equal(batches.length, 1, 'one ResolveBatch per render');
  const sent = batches[0].request.paths;
  assert.equal(sent.length, new Set(sent).size, 'duplicates are sent once');
  assert.equal(sent.length, 30 + 3 + 1);
  assert.ok(html.includes(`<img src="${v('images/post-7.png')}">`));
  assert.ok(html.includes(`<i style="background:url(${v('icons/c.svg')})"></i>`));
  assert.ok(html.endsWith(`<link href="${v('style.css')}">`));
  assert.equal((html.match(/<article>/g) || []).length, 30);
  assert.ok(!html.includes('{{') && !html.includes('src="/images/') && !html.includes('url(/icons/'));
});

test('a page with no targets makes no call', async () => {
  const { html, batches } = await renderCounting('<p>{{title}}</p>', { title: 'a < b' });
  assert.equal(html, '<p>a &lt; b</p>');
  assert.equal(batches.length, 0);
});

test('HTML special characters in view values: the path is the value, the URL is escaped once', async () => {
  const tpl = '<img src="{{#cdn}}/images/{{name}}.png{{/cdn}}" alt="{{name}}"><a href="{{#cdn}}/d/{{{raw}}}{{/cdn}}">x</a>';
  const view = { name: `Tom & "Jerry" <it's>`, raw: 'a&b' };
  const { html, batches } = await renderCounting(tpl, view);
  // The server saw the value as written in the view, not its HTML escaping.
  assert.deepEqual(batches[0].request.paths.sort(), ['/d/a&b', `/images/Tom & "Jerry" <it's>.png`]);
  const url = v('images/Tom%20%26%20%22Jerry%22%20%3Cit%27s%3E.png');
  assert.equal(
    html,
    `<img src="${url}" alt="Tom &amp; &quot;Jerry&quot; &lt;it&#39;s&gt;"><a href="${v('d/a%26b')}">x</a>`,
  );
});

test('an entity written in the template is read as HTML, and the URL escaped for HTML', async () => {
  const { html } = await renderCounting('<a href="{{#cdn}}/s.css?a=1&amp;b=2{{/cdn}}">', {});
  assert.equal(html, `<a href="${v('s.css')}?a=1&amp;b=2">`);
});

test('query and fragment are kept after the resolved URL', async () => {
  const tpl = '{{#cdn}}/style.css?v={{v}}#top{{/cdn}} {{#cdn}}font.woff2#iefix{{/cdn}} {{#cdn}}/x.js?{{/cdn}}';
  const { html, batches } = await renderCounting(tpl, { v: '2&3' });
  assert.deepEqual(batches[0].request.paths.sort(), ['/font.woff2', '/style.css', '/x.js']);
  assert.equal(html, `${v('style.css')}?v=2&amp;3#top ${v('font.woff2')}#iefix ${v('x.js')}?`);
});

test('unicode and spaces: the server percent-encodes each segment', async () => {
  const { html } = await renderCounting('{{#cdn}}/a b/{{file}}{{/cdn}}', { file: 'ü日本.png' });
  assert.equal(html, v('a%20b/%C3%BC%E6%97%A5%E6%9C%AC.png'));
});

test('invalid paths render as written, next to good ones in the same batch', async () => {
  const tpl = '[{{#cdn}}/a/../b.png{{/cdn}}][{{#cdn}}/a//b.png{{/cdn}}][{{#cdn}}/{{bad}}{{/cdn}}][{{#cdn}}/ok.png{{/cdn}}][{{#cdn}}  {{/cdn}}]';
  const { html, batches } = await renderCounting(tpl, { bad: 'x\\y<' });
  assert.equal(batches.length, 1);
  assert.equal(html, `[/a/../b.png][/a//b.png][/x\\y&lt;][${v('ok.png')}][  ]`);
});

test('a page whose only sections have nothing to resolve renders them as written, with no call', async () => {
  const { html, batches } = await renderCounting('<a href="{{#cdn}}  {{/cdn}}">[{{#asset}}{{empty}}{{/asset}}]', { empty: '' });
  assert.equal(html, '<a href="  ">[]');
  assert.equal(batches.length, 0);
});

test('an unknown blog renders every target as written', async () => {
  rec.reset();
  const html = await client.render('no-such-blog', '<img src="{{#cdn}}/a {{x}}.png{{/cdn}}">', { x: '&' });
  assert.equal(html, '<img src="/a &amp;.png">');
  assert.equal(rec.count('ResolveBatch'), 1);
});

test('a blog id the server refuses renders every target as written', async () => {
  const html = await client.render('not a blog id!', '<img src="{{#cdn}}/a.png{{/cdn}}">', {});
  assert.equal(html, '<img src="/a.png">');
});

test('a permanent asset renders its permanent URL', async () => {
  const asset = await client.putAsset(BLOG, { filename: 'me.png', path: '/avatars/me.png' }, Buffer.from('not a png'));
  const { html } = await renderCounting('{{#cdn}}/avatars/me.png{{/cdn}}', {});
  assert.equal(html, `${server.base}/${BLOG}/_assets/${asset.hash}/me.png`);
  assert.equal(html, asset.url);
});

test('{{cdn}} and {{{cdn}}} alone print the base URL, learned once from GetInfo', async () => {
  const c = rec.attach(new Client({ address: server.grpc, deadlineMs: 5000 }));
  try {
    rec.reset();
    const a = await c.render(BLOG, '{{{cdn}}}|{{cdn}}|{{#items}}{{{asset}}}{{/items}}', { items: [1] });
    const b = await c.render(BLOG, '{{{cdn}}}/x', {});
    // {{cdn}} is HTML-escaped like any Mustache variable ('/' as &#x2F;, read by a browser as '/').
    assert.equal(a, `${server.base}|${server.base.replaceAll('/', '&#x2F;')}|${server.base}`);
    assert.equal(b, `${server.base}/x`);
    assert.equal(rec.count('GetInfo'), 1);
    assert.equal(rec.count('ResolveBatch'), 0);
  } finally {
    c.close();
  }
  const fixed = new Client({ address: server.grpc, cdnBaseUrl: 'https://blotcdn.com' });
  try {
    assert.equal(await fixed.render(BLOG, '{{{cdn}}}', {}), 'https://blotcdn.com');
  } finally {
    fixed.close();
  }
});

test('view text that looks like a tag is only text', async () => {
  rec.reset();
  const view = { title: '{{#cdn}}/style.css{{/cdn}}' };
  const html = await client.render(BLOG, '<h1>{{title}}</h1><p>{{{title}}}</p>', view);
  assert.equal(html, '<h1>{{#cdn}}&#x2F;style.css{{&#x2F;cdn}}</h1><p>{{#cdn}}/style.css{{/cdn}}</p>');
  assert.equal(rec.count('ResolveBatch'), 0);
});

test('a view key named like a tag does not hide the helper', async () => {
  const { html } = await renderCounting('{{#cdn}}/style.css{{/cdn}}', { cdn: 'mine', asset: false });
  assert.equal(html, v('style.css'));
});

test('inside a loop, an item with a key named like a tag does not hide the helper', async () => {
  // Mustache looks a name up in the innermost section's object first: a post with an `asset`
  // field (undefined, false, a string, inherited) used to take the tag's place.
  const posts = [
    { slug: 'a' },
    { slug: 'b', asset: undefined },
    { slug: 'c', asset: false },
    { slug: 'd', asset: 'cover.jpg' },
    Object.assign(Object.create({ asset: 1 }), { slug: 'e' }),
  ];
  const tpl = '{{#posts}}<img src="{{#asset}}/i/{{slug}}.jpg{{/asset}}">{{/posts}}{{#post}}{{{cdn}}}|{{#cdn}}/s.css{{/cdn}}{{/post}}';
  const c = new Client({ address: server.grpc, deadlineMs: 5000, cdnBaseUrl: 'https://cdn.test' });
  try {
    const html = await c.render(BLOG, tpl, { posts, post: { cdn: 'mine', title: 't' } });
    const imgs = ['a', 'b', 'c', 'd', 'e'].map((x) => `<img src="${v(`i/${x}.jpg`)}">`).join('');
    assert.equal(html, `${imgs}https://cdn.test|${v('s.css')}`);
  } finally {
    c.close();
  }
});

test("the page's deadline starts at its first call, not before its collecting pass", async () => {
  // A view function that takes longer than the deadline on each pass: the server answers at
  // once, so the page resolves.
  const c = new Client({ address: server.grpc, deadlineMs: 150 });
  try {
    const busy = () => {
      const until = Date.now() + 250;
      while (Date.now() < until);
      return 'slow';
    };
    await c.render(BLOG, '{{#cdn}}/warm.css{{/cdn}}', {}); // connected, max_batch known
    const t0 = Date.now();
    const html = await c.render(BLOG, '{{#cdn}}/{{name}}.css{{/cdn}}', { name: busy });
    assert.ok(Date.now() - t0 >= 500, 'each pass ran the view function');
    assert.equal(html, v('slow.css'));
  } finally {
    c.close();
  }
});

test('a page does not wait on a GetInfo shared with a longer deadline', async () => {
  // As when a publish on the same Client asked GetInfo (its 30 s deadline) and the server
  // stalled: the page waits its own deadline, not the publish's.
  const c = new Client({ address: server.grpc, deadlineMs: 200 });
  try {
    c.infoPending = new Promise(() => {});
    const t0 = Date.now();
    const html = await c.render(BLOG, '{{#cdn}}/style.css{{/cdn}}', {});
    assert.ok(Date.now() - t0 < 200 + 1000, `took ${Date.now() - t0} ms`);
    // Its deadline spent waiting: as written.
    assert.equal(html, '/style.css');
  } finally {
    c.infoPending = null;
    c.close();
  }
});

test('a tag name Mustache could never match, or one of its own, is refused', () => {
  for (const tags of [[' cdn'], ['.'], ['a b'], ['cdn', '#x']]) {
    assert.throws(() => new Client({ tags }), /tags must be an array of tag names/, JSON.stringify(tags));
  }
});

test('custom tags', async () => {
  const c = new Client({ address: server.grpc, deadlineMs: 5000, tags: ['static'] });
  try {
    const html = await c.render(BLOG, '{{#static}}/style.css{{/static}}|{{#cdn}}/style.css{{/cdn}}', {});
    assert.equal(html, `${v('style.css')}|`);
  } finally {
    c.close();
  }
});

test('a template Mustache refuses rejects, without calling the server', async () => {
  rec.reset();
  await assert.rejects(client.render(BLOG, '{{#cdn}}/style.css', {}), /Unclosed section/);
  assert.equal(rec.calls.length, 0);
});

test('an invalidated path gets a new URL on the next render', async () => {
  const before = await client.render(BLOG, '{{#cdn}}/style.css{{/cdn}} {{#cdn}}/app.js{{/cdn}}', {});
  const id = await client.invalidate(BLOG, ['/style.css']);
  const after = await client.render(BLOG, '{{#cdn}}/style.css{{/cdn}} {{#cdn}}/app.js{{/cdn}}', {});
  assert.notEqual(before, after);
  assert.equal(after, `${server.base}/${BLOG}/${id}/style.css ${v('app.js')}`);
});
