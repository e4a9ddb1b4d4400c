'use strict';
// gRPC over Node's own http2, for the two kinds of call this client makes: unary calls,
// and PutAsset's client stream. One HTTP/2 connection per Client, opened on first use.
//
// Why not @grpc/grpc-js, which this client used first: a renderer makes one ResolveBatch
// per page on its one thread. Through grpc-js a batch of 20 paths cost 0.32-0.40 ms at p50
// alone, and 180-195 µs of that thread per call with 32 at once (its resolving,
// load-balancing, retrying and subchannel layers, each with its own objects and promises),
// so a renderer topped out near 6,500 batches/s; sent as below, 0.21-0.23 ms, 86 µs and
// 13,000/s (same machine, same server, one after the other; BENCHMARKS.md "Node client").
// What grpc-js gave that this keeps: deadlines sent as `grpc-timeout` and enforced here; calls that fail at once
// while the server is down, or that wait for it (`waitForReady`); a reconnect backoff
// kept short (100 ms doubling to 2 s); a call the server refused to start (a stream past
// a GOAWAY's last one, `REFUSED_STREAM`) sent again on a new connection, as the server
// never saw it; HTTP/2 and gRPC errors as gRPC status names. And one thing grpc-js did only
// when configured to: a connection whose peer stops answering pings is dropped (KEEPALIVE_MS).

const http2 = require('node:http2');
const { EventEmitter } = require('node:events');

const { NGHTTP2_CANCEL, NGHTTP2_REFUSED_STREAM } = http2.constants;

const STATUS_NAMES = [
  'OK',
  'CANCELLED',
  'UNKNOWN',
  'INVALID_ARGUMENT',
  'DEADLINE_EXCEEDED',
  'NOT_FOUND',
  'ALREADY_EXISTS',
  'PERMISSION_DENIED',
  'RESOURCE_EXHAUSTED',
  'FAILED_PRECONDITION',
  'ABORTED',
  'OUT_OF_RANGE',
  'UNIMPLEMENTED',
  'INTERNAL',
  'UNAVAILABLE',
  'DATA_LOSS',
  'UNAUTHENTICATED',
];

const BACKOFF_FIRST_MS = 100;
const BACKOFF_MAX_MS = 2000;
// A connection attempt with no deadline to bound it gives up after this long.
const CONNECT_TIMEOUT_MS = 20000;
// What `session.request` throws when the session can take no more streams.
const SESSION_GONE = new Set(['ERR_HTTP2_INVALID_SESSION', 'ERR_HTTP2_GOAWAY_SESSION', 'ERR_HTTP2_OUT_OF_STREAMS']);
// The largest answer taken: the server's are far below (a full batch of long paths is
// about 31 MB); a peer that sends without end is cut here, not when memory runs out.
const MAX_ANSWER = 256 << 20;
// While calls are open on a connection it is pinged this often, and one whose peer does not
// answer a ping within PING_TIMEOUT_MS is dropped (a server paused, or a network path that went
// silent, would otherwise hold every later call until its deadline, and an upload forever). A
// call whose deadline passes pings at once.
const KEEPALIVE_MS = 10000;
const PING_TIMEOUT_MS = 2000;
const UPLOAD_PING_TIMEOUT_MS = 20000;
// A call's deadline passing pings only a connection silent this long.
const DEADLINE_QUIET_MS = 1000;
// Node's timers take at most this many ms (longer ones fire after 1 ms).
const MAX_TIMER_MS = 2 ** 31 - 1;
// How many times a call the server refused to start is sent again.
const REFUSED_RETRIES = 2;
// Large answers (a full batch of long paths is about 31 MB) arrive in fewer round trips.
const WINDOW = 4 << 20;

/** An Error whose `code` is the gRPC status name. */
function grpcError(code, message, trailers) {
  const e = new Error(message);
  e.code = typeof code === 'number' ? STATUS_NAMES[code] || 'UNKNOWN' : code;
  if (trailers) e.metadata = trailers;
  return e;
}

// gRPC over HTTP/2's mapping of an HTTP status that came without a gRPC one.
function fromHttpStatus(status) {
  switch (status) {
    case 400:
      return 'INTERNAL';
    case 401:
      return 'UNAUTHENTICATED';
    case 403:
      return 'PERMISSION_DENIED';
    case 404:
      return 'UNIMPLEMENTED';
    case 429:
    case 502:
    case 503:
    case 504:
      return 'UNAVAILABLE';
    default:
      return 'UNKNOWN';
  }
}

function decodeMessage(m) {
  if (typeof m !== 'string') return '';
  try {
    return decodeURIComponent(m);
  } catch {
    return m;
  }
}

/** The body of a length-prefixed gRPC answer: exactly one uncompressed message. */
function oneMessage(chunks, total) {
  const b = chunks.length === 1 ? chunks[0] : Buffer.concat(chunks, total);
  if (b.length < 5) throw grpcError('INTERNAL', `the answer has ${b.length} bytes, not a message`);
  if (b[0] !== 0) throw grpcError('INTERNAL', 'the answer is compressed, which this client did not ask for');
  const len = b.readUInt32BE(1);
  if (b.length !== 5 + len) throw grpcError('INTERNAL', `the answer's length prefix says ${len} bytes, ${b.length - 5} came`);
  return b.subarray(5);
}

/**
 * Calls `fn` once the clock passes `until` (ms since the epoch), however far away; answers a
 * function that cancels it. Once the time has come, `fn` runs after the I/O already waiting
 * (`setImmediate`): an event loop held up past a deadline by a long synchronous render reads
 * the answer that came meanwhile before it gives up on it.
 */
function at(until, fn) {
  let timer;
  let immediate;
  const arm = () => {
    const left = until - Date.now();
    if (left <= 0) {
      immediate = setImmediate(fn);
      return;
    }
    timer = setTimeout(arm, Math.min(left, MAX_TIMER_MS));
  };
  arm();
  return () => {
    clearTimeout(timer);
    clearImmediate(immediate);
  };
}

/** A deadline as gRPC's `grpc-timeout` says it: at most 8 digits, then a unit. */
function grpcTimeout(ms) {
  ms = Math.max(1, Math.ceil(ms));
  if (ms < 1e8) return `${ms}m`;
  const s = Math.ceil(ms / 1000);
  if (s < 1e8) return `${s}S`;
  return `${Math.min(99999999, Math.ceil(s / 3600))}H`;
}

/** host:port, checked as a URL's authority would be: a port from 1 to 65535, IPv6 in brackets. */
function checkAddress(address) {
  const bad = () => new TypeError(`blotcdn-client: address must be host:port (IPv6 as [addr]:port), not ${JSON.stringify(address)}`);
  if (typeof address !== 'string') throw bad();
  const m = /^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})$/.exec(address);
  if (!m || Number(m[2]) < 1 || Number(m[2]) > 65535) throw bad();
  try {
    const u = new URL(`http://${address}`);
    if (!u.hostname) throw bad();
  } catch {
    throw bad();
  }
}

function frame(msg) {
  const f = Buffer.allocUnsafe(5 + msg.length);
  f[0] = 0;
  f.writeUInt32BE(msg.length, 1);
  msg.copy(f, 5);
  return f;
}

class Transport {
  /**
   * @param {string} address host:port
   * @param {object} o
   * @param {string} [o.token] sent as `authorization: Bearer <token>`
   */
  constructor(address, { token } = {}) {
    checkAddress(address);
    // Sent as a header: a newline in it would be refused by Node for each call, not here.
    if (token !== undefined && (typeof token !== 'string' || !/^[\x21-\x7e]+$/.test(token))) {
      throw new TypeError('blotcdn-client: token must be printable ASCII, without spaces');
    }
    this.address = address;
    this.authority = `http://${address}`;
    this.token = token;
    this.session = null; // connected, or connecting (`this.connecting`)
    this.connecting = null;
    this.failedUntil = 0; // while failed: calls that do not wait fail at once
    this.lastError = null;
    this.backoff = BACKOFF_FIRST_MS;
    this.closed = false;
    // Connections made so far: a new one may be to a restarted server, with other settings.
    this.generation = 0;
    // Client streams under way: close() cancels them (an upload has no deadline).
    this.streams = new Set();
  }

  /**
   * A connected session, opening one if needed. `until`: the call's deadline (ms since the
   * epoch) or 0. A connection attempt is shared by the calls waiting for it and is not cut
   * by any one call's deadline: each caller stops waiting at its own.
   */
  async ready(until, waitForReady) {
    for (;;) {
      if (this.closed) throw grpcError('CANCELLED', 'the client is closed');
      const s = this.session;
      if (s && !this.connecting && !s.closed && !s.destroyed) return s;
      let attempt = this.connecting;
      if (!attempt) {
        const now = Date.now();
        if (now < this.failedUntil) {
          if (!waitForReady) throw grpcError('UNAVAILABLE', `cannot reach ${this.address}: ${this.lastError}`);
          // Waits out the backoff, or up to its deadline if that comes first.
          const wake = until ? Math.min(this.failedUntil, until) : this.failedUntil;
          await new Promise((r) => at(wake, r));
          if (until && Date.now() >= until) {
            throw grpcError('DEADLINE_EXCEEDED', `deadline exceeded waiting for ${this.address} (${this.lastError})`);
          }
          continue;
        }
        attempt = this.connect();
      }
      try {
        return await this.within(attempt, until);
      } catch (err) {
        if (err.code === 'DEADLINE_EXCEEDED' || !waitForReady) throw err;
      }
    }
  }

  /** `p`, or DEADLINE_EXCEEDED should `until` come first. */
  within(p, until) {
    if (!until) return p;
    let cancel;
    const late = new Promise((_, reject) => {
      cancel = at(until, () => reject(grpcError('DEADLINE_EXCEEDED', `deadline exceeded while connecting to ${this.address}`)));
    });
    return Promise.race([p, late]).finally(() => cancel());
  }

  /**
   * Pings `s` unless a ping is under way; drops it when no answer comes in PING_TIMEOUT_MS,
   * so the next call opens a new connection.
   */
  probe(s, quietMs) {
    // A session draining after a GOAWAY (`closed`) is probed too: an upload may outlive it.
    if (s.probing || s.destroyed) return;
    // Heard from it lately (an answer's bytes, an upload's buffer drained): alive.
    if (Date.now() - s.progressAt < quietMs) return;
    s.probing = true;
    // With an upload under way the answer queues behind the upload's bytes already sent,
    // which a slow uplink takes long to carry: it gets longer.
    const limit = s.uploads > 0 ? UPLOAD_PING_TIMEOUT_MS : PING_TIMEOUT_MS;
    // After the I/O already waiting, as in `at`: an answer held up by a busy event loop counts.
    // Heard from meanwhile (a call's answer while the ping's is late): alive all the same.
    const sent = Date.now();
    const dead = setTimeout(
      () =>
        setImmediate(() => {
          if (!s.probing) return;
          if (s.progressAt <= sent) s.destroy(new Error(`no answer to a ping in ${limit} ms`));
          // Heard from: alive. The ping's answer may never come (the path went silent just
          // after): not waited for, so the next silence is probed again.
          else s.probing = false;
        }),
      limit,
    );
    dead.unref();
    const done = (err) => {
      clearTimeout(dead);
      s.probing = false;
      s.progressAt = Date.now();
      if (err && !s.destroyed) s.destroy(err);
    };
    try {
      if (!s.ping(done)) done(null);
    } catch (err) {
      done(err);
    }
  }

  /** A connection attempt failed: no new one before the backoff, which doubles. */
  failedTry(why) {
    this.lastError = why;
    this.failedUntil = Date.now() + this.backoff;
    this.backoff = Math.min(this.backoff * 2, BACKOFF_MAX_MS);
  }

  /** Starts a connection attempt: `this.connecting` until it settles. */
  connect() {
    let failedAtOnce = false;
    const attempt = new Promise((resolve, reject) => {
      // maxSessionMemory: what waits to be sent is bounded by the callers (a few large requests
      // at once passed Node's default of 10 MB, which then resets streams with ENHANCE_YOUR_CALM).
      let s;
      try {
        s = http2.connect(this.authority, {
          settings: { enablePush: false, initialWindowSize: WINDOW },
          maxSessionMemory: 1024,
        });
      } catch (err) {
        // Not taken as `this.connecting` below (settled already): the next try waits out
        // the backoff, and a caller that waits for the server waits on a timer, not in a loop.
        this.lastError = err.message;
        this.failedUntil = Date.now() + BACKOFF_MAX_MS;
        failedAtOnce = true;
        return reject(grpcError('UNAVAILABLE', `cannot connect to ${this.address}: ${err.message}`));
      }
      s.calls = 0;
      s.uploads = 0;
      s.progressAt = Date.now();
      this.session = s;
      const timer = setTimeout(() => s.destroy(new Error(`no connection within ${CONNECT_TIMEOUT_MS} ms`)), CONNECT_TIMEOUT_MS);
      timer.unref();
      const onError = (err) => fail(err);
      const onClose = () => fail(new Error('connection closed'));
      const fail = (err) => {
        clearTimeout(timer);
        s.off('error', onError);
        s.off('close', onClose);
        if (this.session === s) this.session = null;
        this.connecting = null;
        this.failedTry(err.message);
        reject(grpcError('UNAVAILABLE', `cannot reach ${this.address}: ${err.message}`));
      };
      s.on('error', onError);
      s.on('close', onClose);
      // Connected once the server has spoken HTTP/2 (its SETTINGS), not when TCP connects: a
      // peer that accepts and closes (a load balancer with no backend) is a failed attempt,
      // with its backoff, not a connection made on every call.
      s.once('remoteSettings', () => {
        clearTimeout(timer);
        s.off('error', onError);
        s.off('close', onClose);
        this.connecting = null;
        if (this.closed) {
          // close() came while it was being made.
          s.destroy();
          return reject(grpcError('CANCELLED', 'the client is closed'));
        }
        // The backoff starts over only once the connection has answered a call (`answered`):
        // a peer that sends its settings and then a GOAWAY, or closes, again and again, is a
        // failed try each time, not a new connection per call.
        try {
          s.setLocalWindowSize(WINDOW);
        } catch {
          // an older Node: the default window
        }
        this.generation += 1;
        // Once draining (GOAWAY) or gone, the next call opens a new connection; calls under
        // way finish on this one.
        const retire = () => {
          if (this.session === s) this.session = null;
          if (!s.answered && !s.retired) this.failedTry('the connection ended before it answered a call');
          s.retired = true;
        };
        const keepalive = setInterval(() => {
          if (s.calls > 0) this.probe(s, KEEPALIVE_MS);
        }, KEEPALIVE_MS);
        keepalive.unref();
        s.on('goaway', retire);
        s.on('close', () => {
          clearInterval(keepalive);
          retire();
        });
        s.on('error', retire);
        // With no call open, the connection does not keep the process alive.
        if (s.calls === 0) s.unref();
        resolve(s);
      });
    });
    // Settled for whoever waits; never an unhandled rejection when nobody does any more.
    attempt.catch(() => {});
    if (!failedAtOnce) this.connecting = attempt;
    return attempt;
  }

  headers(path, until) {
    const h = {
      ':method': 'POST',
      ':path': path,
      'content-type': 'application/grpc',
      te: 'trailers',
    };
    if (until) h['grpc-timeout'] = grpcTimeout(until - Date.now());
    if (this.token) h.authorization = `Bearer ${this.token}`;
    return h;
  }

  /**
   * One unary call: `body` is the serialized request; answers the serialized reply.
   * `until`: deadline in ms since the epoch, or 0 for none.
   */
  async unary(path, body, { until = 0, waitForReady = false } = {}) {
    for (let attempt = 0; ; attempt++) {
      const s = await this.ready(until, waitForReady);
      try {
        return await this.exchange(s, path, until, (stream) => stream.end(frame(body)));
      } catch (err) {
        // Refused calls were never taken: one that waits for the server is sent again until
        // its deadline (each try after the backoff), others twice.
        if (!err.refused || (attempt >= REFUSED_RETRIES && !waitForReady)) throw err;
      }
    }
  }

  /**
   * Opens a stream on `s`, lets `send` write to it, and settles with its one answer.
   * Rejects with `refused` set when the server refused the stream before taking it.
   */
  exchange(s, path, until, send, onStream) {
    return new Promise((resolve, reject) => {
      // Past its deadline already (a page's first pass took it all): no stream for it.
      if (until && until <= Date.now()) {
        return reject(grpcError('DEADLINE_EXCEEDED', `deadline exceeded before the call to ${this.address} was sent`));
      }
      let stream;
      try {
        stream = s.request(this.headers(path, until), { endStream: false });
      } catch (err) {
        if (!SESSION_GONE.has(err.code)) return reject(grpcError('INTERNAL', `cannot send the call: ${err.message}`));
        // The session closed, got a GOAWAY or ran out of stream ids since it was handed out:
        // nothing was sent. The next call opens a new one; calls under way end on this one.
        if (this.session === s) this.session = null;
        if (!s.closed) s.close();
        const e = grpcError('UNAVAILABLE', `connection to ${this.address} closing: ${err.message}`);
        e.refused = true;
        return reject(e);
      }
      if (s.calls++ === 0) s.ref();
      const chunks = [];
      let total = 0;
      let httpStatus = 0;
      let trailers = null;
      let settled = false;
      let cancelTimer = null;
      const finish = (err, value) => {
        if (settled) return;
        settled = true;
        if (cancelTimer) cancelTimer();
        // The last call done: the connection no longer keeps the process alive.
        if (--s.calls === 0 && !s.destroyed) s.unref();
        if (err) reject(err);
        else resolve(value);
      };
      if (until) {
        const expire = () => {
          stream.close(NGHTTP2_CANCEL);
          finish(grpcError('DEADLINE_EXCEEDED', `deadline exceeded: no answer from ${this.address} in time`));
          // Slow, or gone without a word? A connection that does not answer a ping is dropped.
          this.probe(s, DEADLINE_QUIET_MS);
        };
        if (until <= Date.now()) return expire();
        cancelTimer = at(until, expire);
      }
      stream.on('response', (h) => {
        s.progressAt = Date.now();
        if (!s.answered) {
          s.answered = true;
          this.backoff = BACKOFF_FIRST_MS;
          this.failedUntil = 0;
        }
        httpStatus = Number(h[':status']);
        if (h['grpc-status'] !== undefined) trailers = h; // trailers-only answer
      });
      stream.on('trailers', (h) => {
        trailers = h;
      });
      let ended = false;
      stream.on('end', () => {
        ended = true;
      });
      stream.on('data', (c) => {
        s.progressAt = Date.now();
        if (settled) return;
        chunks.push(c);
        total += c.length;
        if (total > 5 + MAX_ANSWER) {
          stream.close(NGHTTP2_CANCEL);
          finish(grpcError('RESOURCE_EXHAUSTED', `an answer of more than ${MAX_ANSWER} bytes from ${this.address}`));
        }
      });
      stream.on('error', () => {}); // settled on 'close', with what the stream says
      stream.on('close', () => {
        if (settled) return;
        if (!trailers) {
          const refused = stream.rstCode === NGHTTP2_REFUSED_STREAM && !httpStatus;
          let e;
          if (httpStatus && httpStatus !== 200) {
            e = grpcError(fromHttpStatus(httpStatus), `HTTP status ${httpStatus} without a gRPC status`);
          } else if (httpStatus && !stream.rstCode && ended) {
            e = grpcError('INTERNAL', `the answer from ${this.address} ended without a gRPC status`);
          } else {
            const why = stream.rstCode ? `stream reset (HTTP/2 code ${stream.rstCode})` : 'connection lost';
            e = grpcError('UNAVAILABLE', `${why} before the answer from ${this.address} ended`);
          }
          e.refused = refused;
          return finish(e);
        }
        const code = Number(trailers['grpc-status']);
        if (code !== 0) return finish(grpcError(Number.isInteger(code) ? code : 'UNKNOWN', decodeMessage(trailers['grpc-message']), trailers));
        try {
          finish(null, oneMessage(chunks, total));
        } catch (err) {
          finish(err);
        }
      });
      if (onStream) onStream(stream, (err) => finish(err));
      send(stream);
    });
  }

  /**
   * A client-streaming call. Answers `{ call, answer }`: `call.write(body)` (false when the
   * call's buffer is full: wait for 'drain'), `call.end()`, `call.cancel()`; `answer`, a promise
   * of the serialized reply.
   */
  async clientStream(path, { until = 0, waitForReady = false, readyUntil = until } = {}) {
    for (let attempt = 0; ; attempt++) {
      const s = await this.ready(readyUntil, waitForReady);
      const call = new EventEmitter();
      let opened = false;
      const answer = this.exchange(
        s,
        path,
        until,
        () => {},
        (stream, fail) => {
          opened = true;
          call.write = (body) => stream.write(frame(body));
          call.end = () => stream.end();
          call.cancel = (why = 'the call was cancelled') => {
            stream.close(NGHTTP2_CANCEL);
            fail(grpcError('CANCELLED', why));
          };
          stream.on('drain', () => {
            s.progressAt = Date.now();
            call.emit('drain');
          });
          s.uploads++;
          stream.once('close', () => s.uploads--);
        },
      );
      if (opened) {
        this.streams.add(call);
        answer.then(
          () => this.streams.delete(call),
          () => this.streams.delete(call),
        );
        return { call, answer };
      }
      // The connection was closing: no stream, nothing sent.
      const err = await answer.then(
        () => null,
        (e) => e,
      );
      if (!err?.refused || attempt >= REFUSED_RETRIES) throw err;
    }
  }

  close() {
    this.closed = true;
    for (const call of this.streams) call.cancel('the client was closed');
    const s = this.session;
    this.session = null;
    if (s && !s.destroyed) s.close();
  }
}

module.exports = { Transport };
