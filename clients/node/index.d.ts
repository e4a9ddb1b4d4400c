// Type declarations for blotcdn-client; they describe what index.js exports.
import type { Readable } from 'node:stream';

export type ResolveStatus =
  | 'RESOLVE_STATUS_UNSPECIFIED'
  | 'RESOLVE_STATUS_OK'
  | 'RESOLVE_STATUS_UNKNOWN_BLOG'
  | 'RESOLVE_STATUS_INVALID_PATH';

export interface ClientOptions {
  /** host:port of blotcdn's gRPC listener. Default '127.0.0.1:50051'. */
  address?: string;
  /** Sent as `authorization: Bearer <token>` on every call. */
  token?: string;
  /** Deadline of render() (the whole page, from its first call) and resolve(), in ms. Default 250. */
  deadlineMs?: number;
  /** Mustache section names that become CDN URLs. Default ['cdn', 'asset']. */
  tags?: string[];
  /** What {{cdn}} prints; learned from Resolver.GetInfo when not given (again after a reconnection). */
  cdnBaseUrl?: string;
  /** Deadline of the publish side's unary calls and of getBlog/lookupDomain/getInfo, in ms. Default 30000. */
  publishDeadlineMs?: number;
  /** Parsed templates (and partials) kept, least recently used out first; 0 keeps none. Default 1000. */
  templateCacheSize?: number;
  /** Characters of template text those may hold together; a longer template is not kept. Default 2000000. */
  templateCacheChars?: number;
  /** Called with each error that left a page's targets as written (a wrong token, the server down or late). */
  onRenderError?: (err: BlotcdnError, blogId: string) => void;
}

export interface Resolved {
  url: string;
  status: ResolveStatus;
  /** Set for a versioned URL, else 0. */
  cacheId: number;
  /** Set for a permanent URL, else ''. */
  contentHash: string;
}

export interface Asset {
  hash: string;
  url: string;
  size: number;
  contentType: string;
  filename: string;
}

export interface Blog {
  blogId: string;
  cacheId: number;
  domains: string[];
  pathCount: number;
  assetCount: number;
}

export interface Info {
  cdnBaseUrl: string;
  maxBatch: number;
  urlStyle: string;
  version: string;
}

/** Bytes, or a stream or async iterable of bytes or strings. */
export type AssetSource =
  | ArrayBufferView
  | ArrayBuffer
  | SharedArrayBuffer
  | Readable
  | AsyncIterable<ArrayBufferView | ArrayBuffer | SharedArrayBuffer | string>;

export interface AssetHeader {
  filename: string;
  /** Guessed by the server from the filename when empty. */
  contentType?: string;
  /** Binds this blog path to the asset. */
  path?: string;
}

/** How calls fail: `code` is the gRPC status name, the message the server's. */
export interface BlotcdnError extends Error {
  code: string;
  /** `invalidate` split into several calls: how many paths, from the start, are done. */
  pathsDone?: number;
}

export interface PurgeQueue {
  target: string;
  /** Keys waiting. */
  length: number;
  /** When the oldest waiting key was enqueued (ms since the epoch), 0 when none waits. */
  oldestMs: number;
  lastError: string;
  /** Keys the target took since the server started (a key dropped, refused for good, is not counted). */
  sent: number;
}

export class Client {
  constructor(options?: ClientOptions);
  readonly options: Readonly<Required<Omit<ClientOptions, 'token' | 'cdnBaseUrl' | 'onRenderError'>>> &
    Pick<ClientOptions, 'token' | 'cdnBaseUrl' | 'onRenderError'>;

  /** One ResolveBatch; a Map from each path as given to its answer (a path with a lone surrogate is not sent: RESOLVE_STATUS_INVALID_PATH). */
  resolve(blogId: string, paths: string[], options?: { deadlineMs?: number }): Promise<Map<string, Resolved>>;
  /** The page, with one ResolveBatch for all its targets (several at once past the server's max_batch); never fails because of the server. */
  render(blogId: string, template: string, view?: unknown, partials?: Record<string, string> | ((name: string) => string | undefined)): Promise<string>;
  getInfo(options?: { deadlineMs?: number }): Promise<Info>;
  getBlog(blogId: string): Promise<Blog>;
  /** The blog id a domain belongs to. */
  lookupDomain(domain: string): Promise<string>;

  /** No paths: raise the blog's floor. Returns the new cache id (past the server's max_batch: several calls, the last one's). */
  invalidate(blogId: string, paths?: string[]): Promise<number>;
  putAsset(blogId: string, header: AssetHeader, data: AssetSource): Promise<Asset>;
  importFile(blogId: string, path: string): Promise<Asset>;
  setDomain(domain: string, blogId: string): Promise<void>;
  removeDomain(domain: string): Promise<void>;
  deleteBlog(blogId: string): Promise<void>;
  /** Takes one permanent asset down: its URL answers 404 and is purged at the edges. */
  deleteAsset(blogId: string, hash: string): Promise<void>;
  /** Purges keys (the blog id, or `${blogId}/...`; none: the blog id) at every edge target, durably. */
  purge(blogId: string, keys?: string[]): Promise<void>;
  /** Each edge target's purge queue. */
  getPurges(): Promise<PurgeQueue[]>;
  close(): void;
}
