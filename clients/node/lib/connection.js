'use strict';
// Calls: loads the one blotcdn.proto, and turns each call into a promise with a deadline,
// the bearer token and errors that carry the gRPC status name, over `transport.js` (one
// HTTP/2 connection). Knows nothing of Mustache or of what the calls mean.

const fs = require('node:fs');
const path = require('node:path');
const protoLoader = require('@grpc/proto-loader');
const { Transport } = require('./transport');

const PROTO_FILE = path.join('blotcdn', 'v1', 'blotcdn.proto');

// The published package carries a copy made by `npm pack` (scripts/copy-proto.js);
// in the repository the client loads the server's own file, two folders up.
function protoRoot() {
  const candidates = [path.join(__dirname, '..', 'proto'), path.join(__dirname, '..', '..', '..', 'proto')];
  for (const dir of candidates) {
    if (fs.existsSync(path.join(dir, PROTO_FILE))) return dir;
  }
  throw new Error(`blotcdn-client: ${PROTO_FILE} not found under ${candidates.join(' or ')}`);
}

// Each service's methods: path, and the request's and answer's (de)serializers.
let METHODS = null;
function methods() {
  if (METHODS) return METHODS;
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [protoRoot()],
    keepCase: false,
    longs: Number, // cache ids are milliseconds: well inside 2^53
    enums: String, // statuses by name, e.g. 'RESOLVE_STATUS_OK'
    defaults: true,
    oneofs: true,
  });
  METHODS = {
    resolver: definition['blotcdn.v1.Resolver'],
    publisher: definition['blotcdn.v1.Publisher'],
  };
  return METHODS;
}

// How long a call without a deadline is sent again while the server's request memory is busy.
const BUSY_RETRY_MS = 30000;

function until(deadline) {
  if (deadline === undefined || deadline === Infinity) return 0;
  return deadline instanceof Date ? deadline.getTime() : Date.now() + deadline;
}

class Connection {
  /**
   * @param {object} o
   * @param {string} o.address host:port of blotcdn's gRPC listener
   * @param {string} [o.token] bearer token sent on every call
   */
  constructor({ address, token }) {
    this.methods = methods();
    this.transport = new Transport(address, { token });
  }

  method(service, name) {
    const m = this.methods[service]?.[name];
    if (!m) throw new TypeError(`blotcdn-client: no method ${service}.${name}`);
    return m;
  }

  /** One attempt of a unary call: the answer, decoded. Tests wrap it to count calls. */
  async call(service, name, request, opts) {
    const m = this.method(service, name);
    const answer = await this.transport.unary(m.path, m.requestSerialize(request), opts);
    return m.responseDeserialize(answer);
  }

  /**
   * One unary call. `deadline` is a Date or a number of ms from now; `waitForReady`
   * false makes a call fail at once when the server is down instead of waiting for it.
   * A call the server refuses because its request memory is taken by other calls
   * (`grpc_memory_bytes`) is sent again, after 25 ms doubling to 500 ms, while its
   * deadline (or, without one, 30 s) leaves time.
   */
  async unary(service, name, request, { deadline, waitForReady = false } = {}) {
    const by = until(deadline);
    const retryUntil = by || Date.now() + BUSY_RETRY_MS;
    for (let wait = 25; ; wait = Math.min(wait * 2, 500)) {
      try {
        return await this.call(service, name, request, { until: by, waitForReady });
      } catch (err) {
        const busy = err.code === 'RESOURCE_EXHAUSTED' && /grpc_memory_bytes/.test(err.message);
        if (!busy || Date.now() + wait >= retryUntil) throw err;
        await new Promise((r) => setTimeout(r, wait));
      }
    }
  }

  /**
   * A client-streaming call: the writable call (`write(message)`, false when full: wait
   * for 'drain'; `end()`; `cancel()`) and a promise of its answer. `readyDeadline`: how
   * long it may wait for a connection, when that is not its whole deadline.
   */
  async clientStream(service, name, { deadline, waitForReady = false, readyDeadline } = {}) {
    const m = this.method(service, name);
    const by = until(deadline);
    const opts = { until: by, waitForReady, readyUntil: readyDeadline === undefined ? by : until(readyDeadline) };
    const { call, answer } = await this.transport.clientStream(m.path, opts);
    const write = call.write;
    call.write = (message) => write(m.requestSerialize(message));
    return { call, answer: answer.then((b) => m.responseDeserialize(b)) };
  }

  close() {
    this.transport.close();
  }
}

module.exports = { Connection, protoRoot, PROTO_FILE };
