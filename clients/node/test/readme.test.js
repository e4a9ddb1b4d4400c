'use strict';
// Runs every ```js example of README.md against a real server and checks what
// it prints against its `// →` lines.
const { test, before, after } = require('node:test');
const assert = require('node:assert/strict');
const { execFile } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { startServer } = require('./helpers/server');

const README = fs.readFileSync(path.join(__dirname, '..', 'README.md'), 'utf8');
const examples = [...README.matchAll(/```js\n([\s\S]*?)```/g)].map((m) => m[1]);

let server;
let work;

before(async () => {
  server = await startServer();
  work = fs.mkdtempSync(path.join(os.tmpdir(), 'blotcdn-readme-'));
});

after(async () => {
  await server?.stop();
  if (work) fs.rmSync(work, { recursive: true, force: true });
});

function expectation(line) {
  const escaped = line.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  const pattern = escaped
    .replaceAll('http://127\\.0\\.0\\.1:8080', server.base.replace(/[.]/g, '\\.'))
    .replaceAll('1700000000000', '\\d+')
    .replaceAll('<hash>', '[0-9a-f]{32}')
    .replaceAll('…', '.+');
  return new RegExp(`^${pattern}$`);
}

function run(code) {
  const source = code
    .replaceAll("require('blotcdn-client')", `require(${JSON.stringify(path.join(__dirname, '..'))})`)
    .replaceAll("'127.0.0.1:50051'", JSON.stringify(server.grpc));
  const file = path.join(work, `example-${Math.random().toString(16).slice(2)}.js`);
  fs.writeFileSync(file, source);
  const env = { ...process.env };
  delete env.BLOTCDN_PUBLISHER_TOKEN;
  return new Promise((resolve) => {
    execFile(process.execPath, [file], { cwd: work, env, timeout: 20000 }, (err, stdout, stderr) => resolve({ err, stdout, stderr }));
  });
}

test('the README has examples', () => {
  assert.ok(examples.length >= 3);
});

// In order: the first example creates the blog the others use.
for (const [i, code] of examples.entries()) {
  const firstLine = code.split('\n').find((l) => l.includes('client.') && !l.includes('new Client')) || '';
  test(`README example ${i + 1}: ${firstLine.trim().slice(0, 50)}`, async () => {
    const { err, stdout, stderr } = await run(code);
    assert.equal(err, null, stderr);
    const printed = stdout.split('\n').map((l) => l.trimEnd()).filter(Boolean);
    const wanted = code.split('\n').filter((l) => /^\s*\/\/ → /.test(l)).map((l) => l.replace(/^\s*\/\/ → /, '').trimEnd());
    assert.ok(wanted.length > 0, 'the example says what it prints');
    assert.equal(printed.length, wanted.length, `printed:\n${stdout}`);
    printed.forEach((line, j) => assert.match(line, expectation(wanted[j])));
  });
}
