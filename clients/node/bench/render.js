'use strict';
// The cost of CDN URLs for a page of 20 assets, next to the peer the platform
// uses today: HMGET of 20 fields from Redis, with the `redis` client, in the
// same Node process and the same run. Not part of `npm test`.
//   BLOTCDN_BIN=../../target/release/blotcdn node bench/render.js [seconds per cell, default 3]
// Starts its own blotcdn and redis-server on free 127.0.0.1 ports and stops them.

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const path = require('node:path');
const { setTimeout: sleep } = require('node:timers/promises');
const Mustache = require('mustache');
const { createClient } = require('redis');
const { Client } = require('..');
const { renderPage } = require('../lib/render');
const { startServer, freePort } = require('../test/helpers/server');

const SECONDS = Number(process.argv[2] || 3);
const BLOG = 'benchblog';
const PATHS = Array.from({ length: 20 }, (_, i) => `/assets/file-${i}.${['css', 'js', 'png', 'woff2'][i % 4]}`);
const TEMPLATE = '<html><head><title>{{title}}</title></head><body>{{#items}}<a href="/p/{{n}}"><img src="{{#cdn}}{{path}}{{/cdn}}" alt="{{title}}"></a>\n{{/items}}</body></html>';
const PLAIN = TEMPLATE.replace('{{#cdn}}{{path}}{{/cdn}}', '{{path}}');
const VIEW = { title: 'A page', items: PATHS.map((p, n) => ({ path: p, n })) };

if (!process.env.BLOTCDN_BIN) {
  const release = path.join(__dirname, '..', '..', '..', 'target', 'release', 'blotcdn');
  if (fs.existsSync(release)) process.env.BLOTCDN_BIN = release;
}

async function startRedis() {
  const port = await freePort();
  const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], { stdio: 'ignore' });
  for (let i = 0; i < 250; i++) {
    const up = await new Promise((r) => {
      const c = net.connect(port, '127.0.0.1', () => r(c.end() || true)).on('error', () => r(false));
    });
    if (up) return { port, child };
    await sleep(20);
  }
  child.kill('SIGKILL');
  throw new Error('redis-server did not start');
}

/** Runs `op` from `concurrency` loops for SECONDS (after a short warm-up): latencies and rate. */
async function measure(op, concurrency) {
  const warm = Date.now() + 300;
  while (Date.now() < warm) await op();
  const latencies = [];
  const start = performance.now();
  const end = start + SECONDS * 1000;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (performance.now() < end) {
        const t0 = performance.now();
        await op();
        latencies.push(performance.now() - t0);
      }
    }),
  );
  const elapsed = (performance.now() - start) / 1000;
  latencies.sort((a, b) => a - b);
  const q = (p) => latencies[Math.min(latencies.length - 1, Math.floor(p * latencies.length))];
  return { p50: q(0.5), p99: q(0.99), rate: latencies.length / elapsed };
}

async function main() {
  const server = await startServer();
  const redis = await startRedis();
  const client = new Client({ address: server.grpc, deadlineMs: 5000 });
  const rc = createClient({ url: `redis://127.0.0.1:${redis.port}` });
  try {
    await rc.connect();
    await client.invalidate(BLOG);
    await rc.hSet(`blog:${BLOG}:urls`, Object.fromEntries(PATHS.map((p) => [p, `https://blotcdn.com/${BLOG}/1700000000000${p}`])));
    // Sanity: the page really has its 20 URLs, and Redis its 20 fields.
    const page = await client.render(BLOG, TEMPLATE, VIEW);
    if ((page.match(new RegExp(`${server.base}/${BLOG}/\\d+/assets/`, 'g')) || []).length !== 20) throw new Error(`bad page:\n${page}`);
    if ((await rc.hmGet(`blog:${BLOG}:urls`, PATHS)).filter(Boolean).length !== 20) throw new Error('bad redis data');

    const writer = new Mustache.Writer();
    const answers = new Map(PATHS.map((p) => [p, `https://blotcdn.com/${BLOG}/1700000000000${p}`]));
    const ops = [
      ['render (20 targets, 1 ResolveBatch)', () => client.render(BLOG, TEMPLATE, VIEW)],
      ['render passes alone, answers at hand', () =>
        renderPage({ writer, template: TEMPLATE, view: VIEW, tags: ['cdn'], resolveAll: async () => answers, knownBase: () => '', learnBase: async () => {} })],
      ['Mustache alone, same page, no CDN', async () => writer.render(PLAIN, VIEW)],
      ['resolve 20 paths', () => client.resolve(BLOG, PATHS)],
      ['Redis HMGET 20 fields', () => rc.hmGet(`blog:${BLOG}:urls`, PATHS)],
    ];
    const rows = [];
    for (const concurrency of [1, 32]) {
      for (const [name, op] of ops) {
        const r = await measure(op, concurrency);
        rows.push([name, String(concurrency), r.p50.toFixed(3), r.p99.toFixed(3), Math.round(r.rate).toString()]);
      }
    }
    const head = ['operation (per page of 20 assets)', 'concurrent', 'p50 ms', 'p99 ms', 'pages/s'];
    const widths = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
    const line = (cells) => `| ${cells.map((c, i) => (i === 0 ? c.padEnd(widths[i]) : c.padStart(widths[i]))).join(' | ')} |`;
    console.log(`blotcdn: ${process.env.BLOTCDN_BIN || 'target/debug/blotcdn'}; node ${process.version}; ${SECONDS} s per cell`);
    console.log(line(head));
    console.log(`| ${widths.map((w, i) => (i === 0 ? '-'.repeat(w) : `${'-'.repeat(w - 1)}:`)).join(' | ')} |`);
    for (const r of rows) console.log(line(r));
  } finally {
    await rc.quit().catch(() => {});
    client.close();
    redis.child.kill('SIGTERM');
    await server.stop();
  }
}

main().catch((err) => {
  console.error(err);
  process.exitCode = 1;
});
