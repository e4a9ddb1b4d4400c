'use strict';
// Starts the real blotcdn binary on ephemeral ports in a temporary data dir,
// for one test file. Its logs are hidden unless TEST_LOG is set.

const { spawn } = require('node:child_process');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { setTimeout: sleep } = require('node:timers/promises');

function binary() {
  return process.env.BLOTCDN_BIN || path.join(__dirname, '..', '..', '..', '..', 'target', 'debug', 'blotcdn');
}

/**
 * @param {object} [o]
 * @param {Record<string,string>} [o.env] extra environment (tokens, limits)
 * @returns {Promise<{grpc: string, http: string, base: string, dataDir: string, blogsDir: string,
 *   write(blog: string, p: string, bytes: string|Buffer): string, stop(): Promise<void>}>}
 */
async function startServer({ env = {} } = {}) {
  const bin = binary();
  if (!fs.existsSync(bin)) throw new Error(`blotcdn binary not found at ${bin}: run cargo build, or set BLOTCDN_BIN`);
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'blotcdn-node-'));
  const addrFile = path.join(dataDir, 'addrs.json');
  const args = ['serve', '--data-dir', dataDir, '--grpc-addr', '127.0.0.1:0', '--http-addr', '127.0.0.1:0', '--metrics-addr', '127.0.0.1:0', '--addr-file', addrFile];
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
 * A client interceptor that records each call's method and request, to count calls,
 * and in `events` when each call was sent and answered, to tell calls made at once
 * from calls made one after another.
 */
function callRecorder() {
  const calls = [];
  const events = [];
  const interceptor = (options, nextCall) => {
    const method = options.method_definition.path.split('/').pop();
    const { InterceptingCall } = require('@grpc/grpc-js');
    return new InterceptingCall(nextCall(options), {
      start(metadata, listener, next) {
        next(metadata, {
          onReceiveStatus(status, nextStatus) {
            events.push({ method, event: 'answered' });
            nextStatus(status);
          },
        });
      },
      sendMessage(message, next) {
        calls.push({ method, request: message });
        events.push({ method, event: 'sent' });
        next(message);
      },
    });
  };
  return {
    calls,
    events,
    interceptor,
    count: (method) => calls.filter((c) => c.method === method).length,
    reset: () => {
      calls.splice(0);
      events.splice(0);
    },
  };
}

module.exports = { startServer, binary, callRecorder };
