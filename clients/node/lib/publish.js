'use strict';
// The publish side: what a Node publish pipeline or dashboard tells the server.
// Each function takes the Connection; PutAsset streams bytes in bounded memory.

const { Readable } = require('node:stream');
const { badArgument } = require('./args');

const CHUNK = 64 * 1024;

async function invalidate(conn, blogId, paths = [], opts) {
  const res = await conn.unary('publisher', 'Invalidate', { blogId, paths }, opts);
  return res.cacheId;
}

/** Bytes as a Buffer (no copy), from any kind of bytes or a string; null for anything else. */
function bytesOf(piece) {
  if (Buffer.isBuffer(piece)) return piece;
  if (typeof piece === 'string') return Buffer.from(piece);
  if (ArrayBuffer.isView(piece)) return Buffer.from(piece.buffer, piece.byteOffset, piece.byteLength);
  if (piece instanceof ArrayBuffer || piece instanceof SharedArrayBuffer) return Buffer.from(piece);
  return null;
}

/** Yields the data in pieces of at most CHUNK bytes, from any kind of bytes or any readable. */
async function* chunks(data) {
  const whole = bytesOf(data);
  if (whole && typeof data !== 'string') {
    for (let i = 0; i < whole.length; i += CHUNK) yield whole.subarray(i, i + CHUNK);
    return;
  }
  if (!data || typeof data[Symbol.asyncIterator] !== 'function') {
    throw badArgument(
      'putAsset: data must be bytes (a Buffer, a typed array, a DataView, an ArrayBuffer), or a readable stream or async iterable of bytes or strings',
    );
  }
  for await (const item of data) {
    // A piece that is not bytes is refused, not skipped: a permanent asset is never stored
    // with bytes missing.
    const piece = bytesOf(item);
    if (!piece) throw badArgument(`putAsset: the stream gave a ${item === null ? 'null' : typeof item}, not bytes or a string`);
    for (let i = 0; i < piece.length; i += CHUNK) yield piece.subarray(i, i + CHUNK);
  }
}

/**
 * Uploads `data` as a permanent asset: the header first, then 64 KiB chunks.
 * Waits for 'drain' whenever the call's buffer is full, so a stream of any size
 * is read only as fast as the server takes it.
 */
async function putAsset(conn, blogId, header = {}, data, opts) {
  // Bytes at hand can be sent again: an upload the server refused to start (a stream past
  // its GOAWAY) is, as a unary call would be. A stream's bytes are gone once sent.
  const again = typeof data !== 'string' && bytesOf(data) !== null;
  for (let attempt = 0; ; attempt++) {
    try {
      return await upload(conn, blogId, header, data, opts);
    } catch (err) {
      if (!again || !err.refused || attempt >= 2) throw err;
    }
  }
}

async function upload(conn, blogId, { filename, contentType = '', path = '' } = {}, data, opts) {
  let started;
  try {
    started = await conn.clientStream('publisher', 'PutAsset', opts);
  } catch (err) {
    // Never started (no connection in time, or the client closed): the stream is not read
    // (its file stays open otherwise, one descriptor per try of a pipeline that retries).
    if (data instanceof Readable) data.destroy();
    throw err;
  }
  const { call, answer } = started;
  // The answer settles early when the server refuses (too big, bad header), or the call ends
  // (cancelled by close(), its connection dropped): stop writing then, and report the call's
  // error, without waiting for an idle source's next piece. A node stream is destroyed at
  // once; any other source is let go (its pending read left behind). Each wait for the source races
  // a wake-up of its own: racing every read against the answer itself would keep each race,
  // and its chunk, attached to the answer for the whole upload.
  let failed = null;
  let wake = null;
  const letGo = () => {
    if (data instanceof Readable) data.destroy();
  };
  answer.then(
    () => {
      if (wake) wake();
    },
    (err) => {
      failed = err;
      letGo();
      if (wake) wake();
    },
  );
  const pieces = chunks(data);
  try {
    call.write({ header: { blogId, filename, contentType, path } });
    for (;;) {
      const next = pieces.next();
      // Left behind when the call ends first: it may yet fail, with nobody waiting.
      next.catch(() => {});
      const woken = new Promise((r) => {
        wake = () => r({ done: true });
      });
      const got = failed ? { done: true } : await Promise.race([next, woken]);
      wake = null;
      if (got.done || failed) break;
      // Full: wait for 'drain', or the call's end. One listener, removed either way (racing a
      // promise of the end would leave a reaction on it for each wait of a long upload).
      if (!call.write({ data: got.value }) && !failed) {
        await new Promise((r) => {
          const done = () => {
            call.off('drain', done);
            r();
          };
          call.on('drain', done);
          wake = done;
        });
        wake = null;
      }
    }
  } catch (err) {
    // The call failed (its source let go for it), or the source failed (or gave something
    // that is not bytes): the upload must not complete.
    if (failed) throw failed;
    call.cancel();
    answer.catch(() => {});
    letGo();
    throw err;
  }
  if (failed) {
    pieces.return().catch(() => {});
    throw failed;
  }
  call.end();
  return answer;
}

async function importFile(conn, blogId, path, opts) {
  return conn.unary('publisher', 'ImportFile', { blogId, path }, opts);
}

async function setDomain(conn, domain, blogId, opts) {
  await conn.unary('publisher', 'SetDomain', { domain, blogId }, opts);
}

async function removeDomain(conn, domain, opts) {
  await conn.unary('publisher', 'RemoveDomain', { domain }, opts);
}

async function deleteBlog(conn, blogId, opts) {
  await conn.unary('publisher', 'DeleteBlog', { blogId }, opts);
}

async function deleteAsset(conn, blogId, hash, opts) {
  await conn.unary('publisher', 'DeleteAsset', { blogId, hash }, opts);
}

/** Enqueues purge keys of one blog at every edge target (none: the blog id). */
async function purge(conn, blogId, keys = [], opts) {
  await conn.unary('publisher', 'Purge', { blogId, keys }, opts);
}

async function getPurges(conn, opts) {
  const res = await conn.unary('publisher', 'GetPurges', {}, opts);
  return res.queues;
}

module.exports = {
  invalidate,
  putAsset,
  importFile,
  setDomain,
  removeDomain,
  deleteBlog,
  deleteAsset,
  purge,
  getPurges,
  CHUNK,
};
