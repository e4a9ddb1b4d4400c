'use strict';
// The demo in a real browser: headless Chromium loads the home page from the
// Node blog server; every asset comes from blotcdn's origin through Varnish
// running edge/varnish.vcl.
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { setTimeout: sleep } = require('node:timers/promises');
const { chromium } = require('playwright-core');
const { Client } = require('blotcdn-client');
const { startServer } = require('../../../clients/node/test/helpers/server');
const { seed, createServer, POSTS } = require('../blog');

const ROOT = path.join(__dirname, '..', '..', '..');
const BLOG = 'demo';
const ASSETS = POSTS.length + 3; // thumbnails, stylesheet, script, font

let work;
let blotcdn;
let varnish;
let edge;
let client;
let site;
let siteUrl;
let browser;

async function freePort() {
  const s = net.createServer();
  await new Promise((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

async function waitForPort(port) {
  for (let i = 0; i < 500; i++) {
    const ok = await new Promise((r) => {
      const c = net.connect(port, '127.0.0.1', () => r(c.end() || true)).on('error', () => r(false));
    });
    if (ok) return;
    await sleep(20);
  }
  throw new Error(`nothing listens on ${port}`);
}

/** varnishd in the foreground with edge/varnish.vcl, only the backend port rewritten. */
async function startVarnish(originPort, port) {
  const dir = path.join(work, 'varnish');
  fs.mkdirSync(dir, { recursive: true });
  fs.chmodSync(work, 0o755); // varnish's workers run as their own user
  fs.chmodSync(dir, 0o755);
  const vcl = fs.readFileSync(path.join(ROOT, 'edge', 'varnish.vcl'), 'utf8').replace('.port = "8080";', `.port = "${originPort}";`);
  const vclPath = path.join(work, 'blotcdn.vcl');
  fs.writeFileSync(vclPath, vcl);
  fs.chmodSync(vclPath, 0o644);
  const child = spawn('varnishd', ['-F', '-n', path.join(dir, 'n'), '-a', `127.0.0.1:${port}`, '-T', '127.0.0.1:0', '-s', 'malloc,64m', '-f', vclPath], {
    stdio: ['ignore', 'ignore', process.env.TEST_LOG ? 'inherit' : 'pipe'],
  });
  // Should the test process die without its after hook, varnishd goes with it.
  const reap = () => child.kill('SIGKILL');
  process.on('exit', reap);
  child.once('exit', () => process.off('exit', reap));
  let log = '';
  child.stderr?.on('data', (d) => {
    log = (log + d).slice(-4000);
  });
  try {
    await waitForPort(port);
  } catch (err) {
    child.kill('SIGKILL');
    throw new Error(`varnishd did not start: ${err.message}\n${log}`);
  }
  return child;
}

async function stopChild(child) {
  if (!child || child.exitCode !== null || child.signalCode !== null) return;
  const done = new Promise((r) => child.once('exit', r));
  child.kill('SIGTERM');
  if (!(await Promise.race([done.then(() => true), sleep(3000).then(() => false)]))) {
    child.kill('SIGKILL');
    await done;
  }
}

function fontFile() {
  const preferred = '/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf';
  if (fs.existsSync(preferred)) return preferred;
  const found = fs.readdirSync('/usr/share/fonts', { recursive: true }).find((f) => String(f).endsWith('.ttf'));
  if (!found) throw new Error('no .ttf font under /usr/share/fonts (apt-get install fonts-dejavu-core)');
  return path.join('/usr/share/fonts', found);
}

before(async () => {
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'blotcdn-blog-'));
  const edgePort = await freePort();
  edge = `http://127.0.0.1:${edgePort}`;
  // The URLs the server hands out point at the edge.
  blotcdn = await startServer({ env: { BLOTCDN_CDN_BASE_URL: edge } });
  varnish = await startVarnish(Number(blotcdn.http.split(':').pop()), edgePort);
  client = new Client({ address: blotcdn.grpc, deadlineMs: 2000 });
  await seed({ client, blogsDir: blotcdn.blogsDir, blogId: BLOG, fontFile: fontFile() });
  site = createServer({ client, blogId: BLOG });
  await new Promise((r) => site.listen(0, '127.0.0.1', r));
  siteUrl = `http://127.0.0.1:${site.address().port}/`;
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  await browser?.close();
  site?.close();
  client?.close();
  await stopChild(varnish);
  await blotcdn?.stop();
  if (work) fs.rmSync(work, { recursive: true, force: true });
});

/** Loads the page in a fresh browser context (empty cache); what the browser saw. */
async function load() {
  const context = await browser.newContext();
  const page = await context.newPage();
  const errors = [];
  page.on('console', (m) => m.type() === 'error' && errors.push(m.text()));
  page.on('pageerror', (e) => errors.push(e.message));
  const assets = [];
  page.on('response', (r) => {
    if (r.url().startsWith(edge)) assets.push(r);
  });
  const main = await page.goto(siteUrl, { waitUntil: 'load' });
  const fonts = await page.evaluate(async () => {
    await document.fonts.ready;
    return [...document.fonts].map((f) => ({ family: f.family, status: f.status }));
  });
  const seen = await page.evaluate(() => ({
    app: document.documentElement.dataset.app,
    color: getComputedStyle(document.body).color,
    images: [...document.images].map((i) => ({ src: i.currentSrc, ok: i.complete && i.naturalWidth > 0 })),
    title: document.querySelector('h2').textContent,
  }));
  const answers = await Promise.all(
    assets.map(async (r) => ({ url: r.url(), status: r.status(), headers: await r.allHeaders() })),
  );
  await context.close();
  return { main, fonts, seen, answers, errors };
}

test('the home page loads every asset through Varnish, the font cross-origin, with no console error', async () => {
  const first = await load();
  assert.equal(first.main.status(), 200);
  assert.deepEqual(first.errors, []);
  assert.equal(first.answers.length, ASSETS, first.answers.map((a) => a.url).join('\n'));
  for (const a of first.answers) {
    assert.equal(a.status, 200, a.url);
    assert.equal(a.headers['x-cache'], 'MISS', a.url); // a fresh edge
  }
  // Thumbnails are permanent assets, the template's files versioned URLs.
  assert.equal(first.answers.filter((a) => a.url.includes(`/${BLOG}/_assets/`)).length, POSTS.length);
  const font = first.answers.find((a) => a.url.endsWith('/fonts/blog.ttf'));
  assert.ok(font, 'the font was requested from the edge');
  assert.equal(font.headers['access-control-allow-origin'], '*');
  assert.deepEqual(first.fonts, [{ family: 'Blog', status: 'loaded' }]);
  assert.equal(first.seen.app, 'ran');
  assert.equal(first.seen.color, 'rgb(40, 40, 40)');
  assert.equal(first.seen.images.length, POSTS.length);
  for (const img of first.seen.images) assert.ok(img.ok && img.src.startsWith(edge), img.src);
  assert.equal(first.seen.title, 'Tom & Jerry’s <first> post');

  const second = await load();
  assert.deepEqual(second.errors, []);
  assert.equal(second.answers.length, ASSETS);
  for (const a of second.answers) {
    assert.equal(a.status, 200, a.url);
    assert.equal(a.headers['x-cache'], 'HIT', a.url);
  }
});
