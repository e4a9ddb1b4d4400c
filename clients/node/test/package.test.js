'use strict';
// The package as published: index.d.ts declares what index.js exports, and the
// proto it carries is the server's.
const { test } = require('node:test');
const assert = require('node:assert/strict');
const { execFileSync } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const api = require('..');

const here = path.join(__dirname, '..');
const dts = fs.readFileSync(path.join(here, 'index.d.ts'), 'utf8');

test('index.d.ts declares exactly the exports and public methods of index.js', () => {
  const declaredExports = [...dts.matchAll(/^export (?:declare )?(?:class|function|const) (\w+)/gm)].map((m) => m[1]);
  assert.deepEqual(declaredExports.sort(), Object.keys(api).sort());
  const body = dts.slice(dts.indexOf('export class Client'));
  const declaredMethods = [...body.matchAll(/^ {2}(\w+)\(/gm)].map((m) => m[1]).filter((n) => n !== 'constructor');
  const methods = Object.getOwnPropertyNames(api.Client.prototype).filter((n) => n !== 'constructor');
  assert.deepEqual(declaredMethods.sort(), methods.sort());
});

test('index.d.ts type-checks against a typical use', () => {
  const tsc = path.join(here, 'node_modules', 'typescript', 'bin', 'tsc');
  execFileSync(process.execPath, [tsc, '--noEmit', '--strict', '--types', 'node', path.join(__dirname, 'types', 'usage.ts')], { cwd: here, stdio: 'pipe' });
});

test('the packed package carries a copy of the server proto, and any copy agrees with it', () => {
  const pkg = JSON.parse(fs.readFileSync(path.join(here, 'package.json'), 'utf8'));
  assert.ok(pkg.files.includes('proto/'));
  assert.match(pkg.scripts.prepack, /scripts\/copy-proto\.js$/);
  assert.match(pkg.scripts.postpack, /scripts\/copy-proto\.js --remove$/);
  const server = fs.readFileSync(path.join(here, '..', '..', 'proto', 'blotcdn', 'v1', 'blotcdn.proto'));
  // What prepack does, into a scratch folder (not ./proto, which other test files may be loading).
  const scratch = fs.mkdtempSync(path.join(os.tmpdir(), 'blotcdn-proto-'));
  try {
    execFileSync(process.execPath, [path.join(here, 'scripts', 'copy-proto.js'), path.join(scratch, 'proto')]);
    assert.ok(fs.readFileSync(path.join(scratch, 'proto', 'blotcdn', 'v1', 'blotcdn.proto')).equals(server));
  } finally {
    fs.rmSync(scratch, { recursive: true, force: true });
  }
  const copy = path.join(here, 'proto', 'blotcdn', 'v1', 'blotcdn.proto');
  if (fs.existsSync(copy)) assert.ok(fs.readFileSync(copy).equals(server), `${copy} differs from the server's proto`);
});

test('options: a misspelt option or a bad deadline is refused at construction', () => {
  assert.throws(() => new api.Client({ adress: '127.0.0.1:1' }), /unknown option adress/);
  assert.throws(() => new api.Client({ deadlineMs: 0 }), /deadlineMs must be a positive/);
  assert.throws(() => new api.Client({ tags: 'cdn' }), /tags must be an array/);
  for (const bad of [-1, 1.5, '10', Infinity, null]) {
    assert.throws(() => new api.Client({ templateCacheSize: bad }), (e) => e instanceof TypeError && /templateCacheSize/.test(e.message));
    assert.throws(() => new api.Client({ templateCacheChars: bad }), (e) => e instanceof TypeError && /templateCacheChars/.test(e.message));
  }
  // 0.1's option, refused by name with what replaced it.
  assert.throws(() => new api.Client({ grpcOptions: {} }), /grpcOptions is gone since 0\.2\.0.*node:http2/);
  for (const bad of ['a\nb', 'two words', 'caf\u00e9', 42]) {
    assert.throws(() => new api.Client({ token: bad }), (e) => e instanceof TypeError && /token must be printable ASCII/.test(e.message), String(bad));
  }
  for (const bad of ['localhost', 'http://127.0.0.1:1', '127.0.0.1:1/x', 50051, '::1:8201', '127.0.0.1:99999', '127.0.0.1:0', '[::1:8201', 'a:b:8201', '%zz:8201']) {
    assert.throws(() => new api.Client({ address: bad }), (e) => e instanceof TypeError && /address must be host:port/.test(e.message), String(bad));
  }
  for (const good of ['[::1]:8201', 'localhost:8201', 'blotcdn.internal:50051']) new api.Client({ address: good }).close();
  // A deadline read from the environment is a string: refused, not taken as no deadline.
  assert.throws(() => new api.Client({ deadlineMs: '250' }), /deadlineMs must be a positive number/);
  assert.throws(() => new api.Client({ publishDeadlineMs: NaN }), /publishDeadlineMs must be a positive number/);
  const c = new api.Client({ address: '127.0.0.1:1', token: undefined });
  assert.equal(c.options.deadlineMs, 250);
  assert.deepEqual(c.options.tags, ['cdn', 'asset']);
  assert.equal(c.options.templateCacheSize, 1000);
  assert.equal(c.options.address, '127.0.0.1:1');
  c.close();
});
