'use strict';
// The publish side: what a Node publish pipeline or dashboard tells the server.
// Each function takes the Connection; PutAsset streams bytes in bounded memory.

const { once } = require('node:events');
const { Readable } = require('node:stream');

const CHUNK = 64 * 1024;

async function invalidate(conn, blogId, paths = [], opts) {
  const res = await conn.unary('publisher', 'Invalidate', { blogId, paths }, opts);
  return res.cacheId;
}

/** Yields the data in pieces of at most CHUNK bytes, from a Buffer or any readable. */
async function* chunks(data) {
  if (Buffer.isBuffer(data) || data instanceof Uint8Array) {
    for (let i = 0; i < data.length; i += CHUNK) yield data.subarray(i, i + CHUNK);
    return;
  }
  if (!data || typeof data[Symbol.asyncIterator] !== 'function') {
    throw new TypeError('putAsset: data must be a Buffer or a readable stream');
  }
  for await (let piece of data) {
    if (typeof piece === 'string') piece = Buffer.from(piece);
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
  const again = Buffer.isBuffer(data) || data instanceof Uint8Array;
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
  // error. A readable source is destroyed at once, so an idle one does not hold the upload
  // until it next produces. (Not a race of each read against the answer: every such race
  // would stay attached to the answer, holding its chunk, for the whole upload.)
  let failed = null;
  answer.catch((err) => {
    failed = err;
    if (data instanceof Readable) data.destroy();
  });
  const stopped = answer.then(
    () => null,
    (err) => err,
  );
  try {
    call.write({ header: { blogId, filename, contentType, path } });
    for await (const piece of chunks(data)) {
      if (failed) break;
      if (!call.write({ data: piece })) {
        await Promise.race([once(call, 'drain'), stopped]);
      }
    }
  } catch (err) {
    // The call failed (the source was destroyed for it), or the source failed (or was not a
    // stream): the upload must not complete.
    if (failed) throw failed;
    call.cancel();
    answer.catch(() => {});
    if (data instanceof Readable) data.destroy();
    throw err;
  }
  if (data instanceof Readable && failed) data.destroy();
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
