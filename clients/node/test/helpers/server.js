'use strict';
// Starts the real blotcdn binary on ephemeral ports in a temporary data dir,
// for one test file. Its logs are hidden unless TEST_LOG is set.

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { setTimeout: sleep } = require('node:timers/promises');

function binary() {
  return process.env.BLOTCDN_BIN || path.join(__dirname, '..', '..', '..', '..', 'target', 'debug', 'blotcdn');
}

/**
 * @param {object} [o]
 * @param {Record<string,string>} [o.env] extra environment (tokens, limits)
 * @param {string} [o.grpcAddr] the gRPC address, default an ephemeral port on 127.0.0.1
 * @param {string} [o.dataDir] a data dir to start on again (after `kill()`), default a new one
 * @returns {Promise<{grpc: string, http: string, base: string, dataDir: string, blogsDir: string,
 *   write(blog: string, p: string, bytes: string|Buffer): string, stop(): Promise<void>}>}
 */
async function startServer({ env = {}, grpcAddr = '127.0.0.1:0', dataDir: given } = {}) {
  const bin = binary();
  if (!fs.existsSync(bin)) throw new Error(`blotcdn binary not found at ${bin}: run cargo build, or set BLOTCDN_BIN`);
  const dataDir = given || fs.mkdtempSync(path.join(os.tmpdir(), 'blotcdn-node-'));
  const addrFile = path.join(dataDir, 'addrs.json');
  fs.rmSync(addrFile, { force: true });
  const args = ['serve', '--data-dir', dataDir, '--grpc-addr', grpcAddr, '--http-addr', '127.0.0.1:0', '--metrics-addr', '127.0.0.1:0', '--addr-file', addrFile];
  const child = spawn(bin, args, {
    env: { RUST_LOG: 'warn', ...process.env, ...env },
    stdio: ['ignore', process.env.TEST_LOG ? 'inherit' : 'ignore', process.env.TEST_LOG ? 'inherit' : 'pipe'],
  });
  let stderr = '';
  child.stderr?.on('data', (d) => {
    stderr = (stderr + d).slice(-4000);
  });
  let exited = null;
  // Should the test process die without its after hook, the server goes with it.
  const reap = () => child.kill('SIGKILL');
  process.on('exit', reap);
  child.on('exit', (code, signal) => {
    exited = { code, signal };
    process.off('exit', reap);
  });

  let addrs = null;
  for (let i = 0; i < 500 && !addrs; i++) {
    if (exited) break;
    try {
      addrs = JSON.parse(fs.readFileSync(addrFile, 'utf8'));
    } catch {
      await sleep(20);
    }
  }
  if (!addrs) {
    child.kill('SIGKILL');
    throw new Error(`blotcdn did not start (${JSON.stringify(exited)}): ${stderr}`);
  }

  const blogsDir = path.join(dataDir, 'blogs');
  return {
    grpc: addrs.grpc,
    http: addrs.http,
    base: `http://${addrs.http}`,
    dataDir,
    blogsDir,
    child,
    write(blog, p, bytes) {
      const file = path.join(blogsDir, blog, ...p.split('/').filter(Boolean));
      fs.mkdirSync(path.dirname(file), { recursive: true });
      fs.writeFileSync(file, bytes);
      return file;
    },
    /** Kills the server at once (SIGKILL), keeping its data dir, to start again on it. */
    async kill() {
      if (!exited) {
        const done = new Promise((r) => child.once('exit', r));
        child.kill('SIGKILL');
        await done;
      }
    },
    async stop() {
      if (!exited) {
        const done = new Promise((r) => child.once('exit', r));
        child.kill('SIGTERM');
        const killed = await Promise.race([done.then(() => true), sleep(5000).then(() => false)]);
        if (!killed) {
          child.kill('SIGKILL');
          await done;
        }
      }
      fs.rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

/**
 * Records each call a Client sends (each attempt of `conn.call`) with its method and
 * request, to count calls, and in `events` when each call was sent and answered, to
 * tell calls made at once from calls made one after another. `attach(client)` starts
 * recording that client's calls.
 */
function callRecorder() {
  const calls = [];
  const events = [];
  const attach = (client) => {
    const call = client.conn.call.bind(client.conn);
    client.conn.call = async (service, method, request, opts) => {
      calls.push({ method, request });
      events.push({ method, event: 'sent' });
      try {
        return await call(service, method, request, opts);
      } finally {
        events.push({ method, event: 'answered' });
      }
    };
    return client;
  };
  return {
    calls,
    events,
    attach,
    count: (method) => calls.filter((c) => c.method === method).length,
    reset: () => {
      calls.splice(0);
      events.splice(0);
    },
  };
}

/** A port of 127.0.0.1 free when asked (nothing listens on it). */
async function freePort() {
  const s = net.createServer();
  await new Promise((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

module.exports = { startServer, binary, callRecorder, freePort };
