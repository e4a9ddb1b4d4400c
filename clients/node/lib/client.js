'use strict';
// The Client: options with their defaults in one place, and the public methods.
// Each method hands off to the file that owns its concern: connection.js for
// calls, render.js for Mustache, publish.js for the publish side.

const { Readable } = require('node:stream');
const Mustache = require('mustache');
const { badArgument, describe, checkMs, checkString, checkStrings } = require('./args');
const { Connection } = require('./connection');
const { renderPage } = require('./render');
const { TemplateCache } = require('./template-cache');
const publish = require('./publish');

const DEFAULTS = Object.freeze({
  address: '127.0.0.1:50051',
  token: undefined,
  deadlineMs: 250,
  tags: Object.freeze(['cdn', 'asset']),
  cdnBaseUrl: undefined,
  publishDeadlineMs: 30000,
  // Parsed templates kept per Client, least recently used out first. A 2 KB template
  // parses in about 0.2 ms and holds some 40 KB parsed: 1000 keep the templates of many
  // busy blogs (a miss costs a parse, not a page) and bound the cache near 50 MB.
  templateCacheSize: 1000,
  // And at most this much template text between them (characters; about bytes for ASCII):
  // parsed, a template holds some 20-40 times its text (plain prose the most), so at most
  // about 80 MB at the default.
  templateCacheChars: 2_000_000,
  // Called with each error that left a page's targets as written (a wrong token, the
  // server down or late), and the page's blog id.
  onRenderError: undefined,
});

// The server's default max_batch: the batch size used while GetInfo has not said.
const DEFAULT_MAX_BATCH = 10000;
// How the server words a refusal of a batch over its max_batch ("batch of 12 paths is
// over max_batch (10)", src/catalog.rs).
const OVER_MAX_BATCH = /\bis over max_batch\b/;

const overMaxBatch = (err) => err.code === 'INVALID_ARGUMENT' && OVER_MAX_BATCH.test(err.message);

// A path gRPC cannot send as UTF-8: a string with a lone surrogate (an emoji cut in two).
const malformed = (p) => typeof p === 'string' && !p.isWellFormed();

/**
 * One GetInfo at a time, shared by the pages waiting on it; learns the base URL
 * (unless given) and max_batch, as of the connection it was asked on. Answers the
 * Info, or the call's Error when the server cannot say in time (then it is asked
 * again by the next page that needs it); never rejects.
 */
function learnInfo(client, deadline) {
  if (!client.infoPending) {
    client.infoPending = client.conn
      .unary('resolver', 'GetInfo', {}, { deadline })
      .then(
        (info) => {
          if (info.cdnBaseUrl && client.options.cdnBaseUrl === undefined) client.baseUrl = info.cdnBaseUrl;
          if (info.maxBatch > 0) client.maxBatch = info.maxBatch;
          client.infoGeneration = client.conn.transport.generation;
          return info;
        },
        (err) => err,
      )
      .finally(() => {
        client.infoPending = null;
      });
  }
  return client.infoPending;
}

/**
 * The shared GetInfo (see learnInfo), waited for no later than `deadline`: a page may
 * share a call asked with a longer deadline (by a publish, say), and must not wait on it.
 */
function infoBy(client, deadline) {
  const shared = learnInfo(client, deadline);
  let timer;
  const late = new Promise((resolve) => {
    timer = setTimeout(() => {
      const err = new Error('deadline exceeded waiting for GetInfo');
      err.code = 'DEADLINE_EXCEEDED';
      resolve(err);
    }, Math.max(0, deadline.getTime() - Date.now()));
  });
  return Promise.race([shared, late]).finally(() => clearTimeout(timer));
}

/** Passes an error that left a page's targets as written to `onRenderError`, if set. */
function renderError(client, err, blogId) {
  const hook = client.options.onRenderError;
  if (!hook) return;
  // The page is not failed for what the hook throws, or for an async hook's rejection: the
  // process hears of it.
  const warn = (e) => process.emitWarning(`blotcdn-client: onRenderError threw: ${e && e.message}`);
  try {
    const r = hook(err, blogId);
    if (r && typeof r.then === 'function') r.then(undefined, warn);
  } catch (e) {
    warn(e);
  }
}

/** The most the server's refusal of a batch says it takes ("is over max_batch (10)"), if it says. */
function maxBatchOf(err) {
  const m = /\bis over max_batch \((\d+)\)/.exec(err.message);
  const n = m ? Number(m[1]) : 0;
  return n > 0 ? n : undefined;
}

// Publish calls wait for a connection (a pipeline rides out a restart) up to their deadline.
function publishOpts(client) {
  return { deadline: client.options.publishDeadlineMs, waitForReady: true };
}

/**
 * A later part of a split invalidate failed: the server's `paths[k]` is of that part, so it
 * is renumbered to the caller's list, and the error says how many paths are already done.
 */
function partFailed(err, done) {
  err.message = `${err.message.replace(/\bpaths\[(\d+)\]/g, (_, k) => `paths[${Number(k) + done}]`)} (the ${done} paths before it are invalidated)`;
  err.pathsDone = done;
  return err;
}

class Client {
  constructor(options = {}) {
    const o = { ...DEFAULTS };
    for (const [k, v] of Object.entries(options)) {
      if (k === 'grpcOptions') {
        throw new TypeError('blotcdn-client: grpcOptions is gone since 0.2.0: the client speaks gRPC over node:http2 itself, not @grpc/grpc-js');
      }
      if (!(k in DEFAULTS)) throw new TypeError(`blotcdn-client: unknown option ${k}`);
      if (v !== undefined) o[k] = v;
    }
    for (const k of ['deadlineMs', 'publishDeadlineMs']) checkMs(k, o[k]);
    if (!Number.isInteger(o.templateCacheSize) || o.templateCacheSize < 0) {
      throw new TypeError('blotcdn-client: templateCacheSize must be a whole number of templates, 0 or more');
    }
    if (!Number.isInteger(o.templateCacheChars) || o.templateCacheChars < 0) {
      throw new TypeError('blotcdn-client: templateCacheChars must be a whole number of characters, 0 or more');
    }
    // A name Mustache could never match in a section tag (a space), or one of its own ('.').
    if (!Array.isArray(o.tags) || o.tags.some((t) => typeof t !== 'string' || !/^[^\s.{}=#^/!>&]+$/.test(t))) {
      throw new TypeError('blotcdn-client: tags must be an array of tag names (no spaces, dots or Mustache sigils)');
    }
    if (o.onRenderError !== undefined && typeof o.onRenderError !== 'function') {
      throw new TypeError('blotcdn-client: onRenderError must be a function (err, blogId)');
    }
    this.options = Object.freeze({ ...o, tags: Object.freeze([...o.tags]) });
    this.conn = new Connection({ address: o.address, token: o.token });
    this.baseUrl = o.cdnBaseUrl;
    // Templates are parsed once per Client, not in Mustache's shared cache (which
    // keeps every template forever), and only the most recently used are kept.
    this.writer = new Mustache.Writer();
    this.writer.templateCache = new TemplateCache(o.templateCacheSize, o.templateCacheChars);
    // The server's max_batch, from GetInfo. Asked, not read from an INVALID_ARGUMENT:
    // that code also refuses a bad blog id, so a refusal alone does not say the batch
    // was too big (nor by how much), and learning from one wastes a call on the page.
    // GetInfo costs one round trip, on the Client's first page with targets.
    // A new connection may be to a server restarted with another max_batch or base URL:
    // the first page after it asks GetInfo again, without waiting for the answer.
    this.maxBatch = undefined;
    this.infoPending = null;
    this.infoGeneration = -1;
  }

  /**
   * Resolves paths in one ResolveBatch; a Map from each path as given to its answer.
   * A path that is not well-formed Unicode (a lone surrogate) is not sent: gRPC would
   * encode it as invalid UTF-8 and the server refuse the whole batch. It gets the
   * answer the server gives any invalid path, RESOLVE_STATUS_INVALID_PATH.
   */
  async resolve(blogId, paths, { deadlineMs = this.options.deadlineMs } = {}) {
    checkString('resolve', 'blogId', blogId);
    checkStrings('resolve', 'paths', paths);
    checkMs('deadlineMs', deadlineMs);
    const sent = paths.filter((p) => !malformed(p));
    const res = await this.conn.unary('resolver', 'ResolveBatch', { blogId, paths: sent }, { deadline: deadlineMs });
    const out = new Map();
    let i = 0;
    for (const p of paths) {
      if (malformed(p)) {
        out.set(p, { url: '', status: 'RESOLVE_STATUS_INVALID_PATH', cacheId: 0, contentHash: '' });
        continue;
      }
      const a = res.assets[i++];
      if (a) out.set(p, { url: a.url, status: a.status, cacheId: a.cacheId, contentHash: a.contentHash });
    }
    return out;
  }

  /** The server's Info: cdnBaseUrl, maxBatch, urlStyle, version. */
  async getInfo({ deadlineMs = this.options.publishDeadlineMs } = {}) {
    checkMs('deadlineMs', deadlineMs);
    return this.conn.unary('resolver', 'GetInfo', {}, { deadline: deadlineMs });
  }

  /**
   * Renders a Mustache template with CDN URLs: one ResolveBatch for the page.
   * Never fails because of the server: a target that does not resolve in time
   * renders as written. Rejects only for a template Mustache refuses.
   */
  async render(blogId, template, view, partials) {
    // A wrong blog id is the caller's bug, not the server's: said, not rendered as written.
    checkString('render', 'blogId', blogId);
    // One deadline for the whole page, whatever calls it needs, from the first call: the
    // collecting pass before it runs the template and the view's functions, which take what
    // they take whatever the server does. (On one thread, other pages' rendering meanwhile
    // still runs on this page's clock.)
    let deadline;
    const clock = () => {
      if (deadline === undefined) {
        deadline = new Date(Date.now() + this.options.deadlineMs);
        // Connected again since the server last said its Info (a restart, maybe with a
        // larger max_batch or another base URL): asked again, for the pages after this one,
        // within this page's bound (a page that needs the answer may share the call).
        const stale = this.maxBatch !== undefined && this.infoGeneration !== this.conn.transport.generation;
        if (stale && !this.infoPending) learnInfo(this, deadline);
      }
      return deadline;
    };
    // onRenderError hears of a page once, with the first error that left targets as written.
    let reported = false;
    const failed = (err) => {
      if (reported) return;
      reported = true;
      renderError(this, err, blogId);
    };
    return renderPage({
      writer: this.writer,
      template,
      view,
      partials,
      tags: this.options.tags,
      knownBase: () => this.baseUrl,
      // Unknown for this page when the server cannot say; asked again on the next one.
      learnBase: async () => {
        const info = await infoBy(this, clock());
        if (info instanceof Error) failed(info);
      },
      resolveAll: async (paths) => {
        if (this.maxBatch === undefined) await infoBy(this, clock());
        const max = this.maxBatch ?? DEFAULT_MAX_BATCH;
        // The server refuses a batch over max_batch whole: a page with more targets
        // is sent as several batches, all at once (within max_batch: one call).
        const batches = [];
        for (let i = 0; i < paths.length; i += max) batches.push(paths.slice(i, i + max));
        const urls = new Map();
        await Promise.all(
          batches.map(async (batch) => {
            try {
              const res = await this.conn.unary('resolver', 'ResolveBatch', { blogId, paths: batch }, { deadline: clock() });
              batch.forEach((p, i) => {
                const a = res.assets[i];
                if (a && a.status === 'RESOLVE_STATUS_OK' && a.url) urls.set(p, a.url);
              });
            } catch (err) {
              // Down, slow, refused or unauthorised: this batch's targets render as written.
              // A batch refused as over max_batch means the server restarted with a lower
              // one: the next page uses the one it names (or asks GetInfo). Not for any other
              // refusal (a blog id the server refuses, say).
              if (overMaxBatch(err)) this.maxBatch = maxBatchOf(err);
              failed(err);
            }
          }),
        );
        return urls;
      },
    });
  }

  // The publish side, for Node pipelines and dashboards. Arguments are checked first: a
  // wrong one rejects with a TypeError whose code is INVALID_ARGUMENT, and nothing is sent.

  /**
   * Raises the paths (none: the blog's floor); the new cache id. More paths than the
   * server's max_batch go as several calls, one after the other, each durable before the
   * next; the answer is the last one's. A list the server refuses as over its max_batch
   * (one it lowered since this client learned it) is split by the one it says now.
   */
  async invalidate(blogId, paths = []) {
    checkString('invalidate', 'blogId', blogId);
    checkStrings('invalidate', 'paths', paths);
    const opts = publishOpts(this);
    for (let tries = 0; ; tries++) {
      const max = this.maxBatch ?? DEFAULT_MAX_BATCH;
      try {
        if (paths.length <= max) return await publish.invalidate(this.conn, blogId, paths, opts);
        let cacheId;
        for (let i = 0; i < paths.length; i += max) {
          try {
            cacheId = await publish.invalidate(this.conn, blogId, paths.slice(i, i + max), opts);
          } catch (err) {
            throw i === 0 ? err : partFailed(err, i);
          }
        }
        return cacheId;
      } catch (err) {
        if (tries > 0 || !overMaxBatch(err)) throw err;
        // The refusal names the server's max_batch (a publisher token may not ask GetInfo).
        this.maxBatch = maxBatchOf(err);
        if (this.maxBatch === undefined) {
          const info = await learnInfo(this, new Date(Date.now() + this.options.publishDeadlineMs));
          if (info instanceof Error) throw err;
        }
      }
    }
  }

  async putAsset(blogId, header, data) {
    try {
      checkString('putAsset', 'blogId', blogId);
      if (header === null || typeof header !== 'object' || Array.isArray(header)) {
        throw badArgument(`putAsset: the header must be an object { filename, contentType?, path? }, not ${describe(header)}`);
      }
      checkString('putAsset', 'header.filename', header.filename);
      // Left out, undefined or null: not given (the type guessed, no path bound).
      for (const k of ['contentType', 'path']) {
        if (header[k] != null) checkString('putAsset', `header.${k}`, header[k]);
      }
    } catch (err) {
      // Not sent: a stream given is not read (its file would stay open).
      if (data instanceof Readable) data.destroy();
      throw err;
    }
    // No deadline: a large stream takes as long as it takes; back-pressure bounds memory.
    // It waits for a connection as the other publish calls do.
    const { filename, contentType, path } = header;
    const given = { filename, contentType: contentType ?? '', path: path ?? '' };
    return publish.putAsset(this.conn, blogId, given, data, {
      waitForReady: true,
      readyDeadline: this.options.publishDeadlineMs,
    });
  }

  async importFile(blogId, path) {
    checkString('importFile', 'blogId', blogId);
    checkString('importFile', 'path', path);
    return publish.importFile(this.conn, blogId, path, publishOpts(this));
  }

  async setDomain(domain, blogId) {
    checkString('setDomain', 'domain', domain);
    checkString('setDomain', 'blogId', blogId);
    return publish.setDomain(this.conn, domain, blogId, publishOpts(this));
  }

  async removeDomain(domain) {
    checkString('removeDomain', 'domain', domain);
    return publish.removeDomain(this.conn, domain, publishOpts(this));
  }

  async deleteBlog(blogId) {
    checkString('deleteBlog', 'blogId', blogId);
    return publish.deleteBlog(this.conn, blogId, publishOpts(this));
  }

  async deleteAsset(blogId, hash) {
    checkString('deleteAsset', 'blogId', blogId);
    checkString('deleteAsset', 'hash', hash);
    return publish.deleteAsset(this.conn, blogId, hash, publishOpts(this));
  }

  async purge(blogId, keys = []) {
    checkString('purge', 'blogId', blogId);
    checkStrings('purge', 'keys', keys);
    return publish.purge(this.conn, blogId, keys, publishOpts(this));
  }

  async getPurges() {
    return publish.getPurges(this.conn, publishOpts(this));
  }

  async getBlog(blogId) {
    checkString('getBlog', 'blogId', blogId);
    return this.conn.unary('resolver', 'GetBlog', { blogId }, publishOpts(this));
  }

  async lookupDomain(domain) {
    checkString('lookupDomain', 'domain', domain);
    const res = await this.conn.unary('resolver', 'LookupDomain', { domain }, publishOpts(this));
    return res.blogId;
  }

  close() {
    this.conn.close();
  }
}

module.exports = { Client, DEFAULTS };
