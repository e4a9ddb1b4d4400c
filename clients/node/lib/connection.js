'use strict';
// Connection and calls: loads the one blotcdn.proto, opens the gRPC channel,
// and turns each unary call into a promise with a deadline, the bearer token
// and errors that carry the gRPC status name. Knows nothing of Mustache or of
// what the calls mean.

const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

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

function loadServices() {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [protoRoot()],
    keepCase: false,
    longs: Number, // cache ids are milliseconds: well inside 2^53
    enums: String, // statuses by name, e.g. 'RESOLVE_STATUS_OK'
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).blotcdn.v1;
}

// grpc.status maps names to numbers; errors report the name.
const STATUS_NAMES = Object.fromEntries(
  Object.entries(grpc.status).filter(([, v]) => typeof v === 'number').map(([k, v]) => [v, k]),
);

/** An Error whose `code` is the gRPC status name and whose message is the server's. */
function toError(err) {
  if (!err || typeof err.code !== 'number') return err;
  const e = new Error(err.details || err.message);
  e.code = STATUS_NAMES[err.code] || 'UNKNOWN';
  e.metadata = err.metadata;
  return e;
}

// How long a call without a deadline is sent again while the server's request memory is busy.
const BUSY_RETRY_MS = 30000;

class Connection {
  /**
   * @param {object} o
   * @param {string} o.address host:port of blotcdn's gRPC listener
   * @param {string} [o.token] bearer token sent on every call
   * @param {object} [o.grpcOptions] passed to @grpc/grpc-js client constructors (channel options, interceptors)
   */
  constructor({ address, token, grpcOptions }) {
    const v1 = loadServices();
    const credentials = grpc.credentials.createInsecure();
    const options = {
      // No limit of the client's own on answers: the server's bounds them (a full batch of long
      // paths, each percent-encoded, is about 31 MB), and grpc-js's default 4 MiB, or any fixed
      // one under that, would fail a page within max_batch whole.
      'grpc.max_receive_message_length': -1,
      // After a server restart, pages render as written until the channel reconnects:
      // keep grpc-js's reconnect backoff short (its own default grows to 120 s).
      'grpc.initial_reconnect_backoff_ms': 100,
      'grpc.max_reconnect_backoff_ms': 2000,
      ...grpcOptions,
    };
    this.resolver = new v1.Resolver(address, credentials, options);
    // The publisher shares the resolver's channel: one connection per Client.
    this.publisher = new v1.Publisher(address, credentials, { ...options, channelOverride: this.resolver.getChannel() });
    this.token = token;
  }

  metadata() {
    const md = new grpc.Metadata();
    if (this.token) md.set('authorization', `Bearer ${this.token}`);
    return md;
  }

  /**
   * One unary call. `deadline` is a Date or a number of ms from now; `waitForReady`
   * false makes a call fail at once when the server is down instead of queueing.
   * A call the server refuses because its request memory is taken by other calls
   * (`grpc_memory_bytes`) is sent again, after 25 ms doubling to 500 ms, while its
   * deadline (or, without one, 30 s) leaves time.
   */
  async unary(service, method, request, { deadline, waitForReady = false } = {}) {
    const stub = this[service];
    const options = { waitForReady };
    if (deadline !== undefined && deadline !== Infinity) {
      options.deadline = deadline instanceof Date ? deadline : new Date(Date.now() + deadline);
    }
    const until = options.deadline ? options.deadline.getTime() : Date.now() + BUSY_RETRY_MS;
    for (let wait = 25; ; wait = Math.min(wait * 2, 500)) {
      try {
        return await new Promise((resolve, reject) => {
          stub[method](request, this.metadata(), options, (err, res) => (err ? reject(toError(err)) : resolve(res)));
        });
      } catch (err) {
        const busy = err.code === 'RESOURCE_EXHAUSTED' && /grpc_memory_bytes/.test(err.message);
        if (!busy || Date.now() + wait >= until) throw err;
        await new Promise((r) => setTimeout(r, wait));
      }
    }
  }

  /** A client-streaming call: returns the writable call and a promise of its answer. */
  clientStream(service, method, { deadline, waitForReady = false } = {}) {
    const options = { waitForReady };
    if (deadline !== undefined && deadline !== Infinity) options.deadline = new Date(Date.now() + deadline);
    let call;
    const answer = new Promise((resolve, reject) => {
      call = this[service][method](this.metadata(), options, (err, res) => (err ? reject(toError(err)) : resolve(res)));
    });
    return { call, answer };
  }

  close() {
    this.publisher.close();
    this.resolver.close();
  }
}

module.exports = { Connection, toError, protoRoot, PROTO_FILE };
