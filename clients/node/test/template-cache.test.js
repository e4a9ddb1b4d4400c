'use strict';
// Parsed templates are kept per Client up to templateCacheSize, least recently
// used out first: a renderer serving many blogs, each with its own templates,
// does not keep every template it ever saw.
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { Client } = require('..');
const { startServer } = require('./helpers/server');

const BLOG = 'cacheblog';
let server;
let floor;
const clients = [];
const make = (templateCacheSize, templateCacheChars) => {
  const c = new Client({ address: server.grpc, deadlineMs: 5000, templateCacheSize, templateCacheChars });
  clients.push(c);
  return c;
};

before(async () => {
  server = await startServer();
  floor = await make().invalidate(BLOG);
});

after(async () => {
  for (const c of clients) c.close();
  await server?.stop();
});

const v = (p) => `${server.base}/${BLOG}/${floor}/${p}`;
// The parsed templates a Client holds (Mustache keys each by its text, then its tags).
const held = (c) => [...c.writer.templateCache.keys()];
const isHeld = (c, template) => held(c).some((k) => k.startsWith(`${template}:`));

test('more distinct templates than templateCacheSize: the cache never holds more, and pages stay right', async () => {
  const c = make(3);
  for (let i = 0; i < 40; i++) {
    const tpl = `<h1>{{title}} ${i}</h1>{{> nav}}<img src="{{#cdn}}/img/${i}.png{{/cdn}}">`;
    const html = await c.render(BLOG, tpl, { title: 'A & B' }, { nav: `<a href="{{#cdn}}/nav${i % 5}.css{{/cdn}}">` });
    assert.equal(html, `<h1>A &amp; B ${i}</h1><a href="${v(`nav${i % 5}.css`)}"><img src="${v(`img/${i}.png`)}">`);
    assert.ok(held(c).length <= 3, `${held(c).length} templates held after ${i + 1} pages`);
  }
  assert.equal(held(c).length, 3);
});

test('a template used again stays cached: least recently used out, not oldest first', async () => {
  const c = make(3);
  // Two entries: a section's text is parsed too, when its lambda renders it. Then one
  // other template a page: least recently used keeps home; oldest first would drop it.
  const home = '<link href="{{#cdn}}/home.css{{/cdn}}">';
  for (let i = 0; i < 10; i++) {
    assert.equal(await c.render(BLOG, home, {}), `<link href="${v('home.css')}">`);
    assert.equal(await c.render(BLOG, `<p>{{x}} ${i}</p>`, { x: '<' }), `<p>&lt; ${i}</p>`);
    assert.ok(isHeld(c, home), `home evicted after ${i + 1} other templates`);
  }
  // Not used for three other templates: it goes.
  for (const other of ['{{a}}', '{{b}}', '{{c}}']) await c.render(BLOG, other, {});
  assert.ok(!isHeld(c, home));
  assert.equal(held(c).length, 3);
});

test('templateCacheSize 0 keeps no template, and pages stay right', async () => {
  const c = make(0);
  for (let i = 0; i < 3; i++) {
    assert.equal(await c.render(BLOG, '<b>{{x}}</b>{{#cdn}}/z.css{{/cdn}}', { x: i }), `<b>${i}</b>${v('z.css')}`);
  }
  assert.equal(held(c).length, 0);
});

test('the default keeps 1000 templates', async () => {
  const c = make();
  assert.equal(c.options.templateCacheSize, 1000);
  for (let i = 0; i < 1100; i++) c.writer.parse(`<p>${i}</p>`);
  assert.equal(held(c).length, 1000);
  assert.ok(isHeld(c, '<p>1099</p>') && !isHeld(c, '<p>99</p>'));
});

test('templates are kept within templateCacheChars of text too; one longer than it is not kept', async () => {
  const c = make(1000, 10000);
  // Forty templates of 1,000 characters: ten fit.
  for (let i = 0; i < 40; i++) {
    const tpl = `<p>${i}</p>{{#cdn}}/k.css{{/cdn}}${' '.repeat(1000)}`;
    assert.equal((await c.render(BLOG, tpl, {})).trimEnd(), `<p>${i}</p>${v('k.css')}`);
    const chars = held(c).reduce((n, k) => n + k.length, 0);
    assert.ok(chars <= 10000, `${chars} characters held after ${i + 1} pages`);
  }
  assert.ok(held(c).length >= 9 && held(c).length <= 10, `${held(c).length} held`);
  assert.ok(isHeld(c, `<p>39</p>{{#cdn}}/k.css{{/cdn}}${' '.repeat(1000)}`));
  // Longer than the whole bound: rendered right, not kept, and nothing else dropped for it.
  const before = held(c);
  const big = `<b>{{x}}</b>${' '.repeat(20000)}`;
  assert.equal((await c.render(BLOG, big, { x: 1 })).trimEnd(), '<b>1</b>');
  assert.deepEqual(held(c), before);
  assert.equal(make().options.templateCacheChars, 2_000_000);
});
