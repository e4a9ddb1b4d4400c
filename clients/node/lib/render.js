'use strict';
// The Mustache integration. Mustache helpers are synchronous and a page needs
// every URL at once, so a page is rendered twice:
//   1. a collecting pass: each {{#cdn}}…{{/cdn}} section records its target and
//      the output is thrown away;
//   2. the targets go to the server in one ResolveBatch (duplicates once);
//   3. the real pass: each section looks its target up in the answers.
// No stand-in ever enters the page, so nothing a template or a view contains
// can be mistaken for one. Knows nothing of gRPC: `resolveAll` is given.

const Mustache = require('mustache');

// What Mustache's HTML escaping produces, and the numeric forms of anything.
const NAMED = { amp: '&', lt: '<', gt: '>', quot: '"', apos: "'" };

/** Reads HTML text as a browser would for the entities that matter in a URL. */
function htmlDecode(s) {
  if (!s.includes('&')) return s;
  return s.replace(/&(?:#(\d+)|#[xX]([0-9a-fA-F]+)|(amp|lt|gt|quot|apos));/g, (m, dec, hex, name) => {
    if (name) return NAMED[name];
    const cp = dec !== undefined ? Number(dec) : parseInt(hex, 16);
    return cp > 0 && cp <= 0x10ffff ? String.fromCodePoint(cp) : m;
  });
}

/** Escapes a URL for an HTML attribute or text: safe in either. */
function htmlEscape(s) {
  return s.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]);
}

/**
 * Splits a section's rendered text into the blog path to resolve and what is
 * kept after the URL. Returns null when there is nothing to resolve.
 */
function parseTarget(rendered) {
  const text = htmlDecode(rendered).trim();
  if (text === '') return null;
  const cut = text.search(/[?#]/);
  let pathPart = cut === -1 ? text : text.slice(0, cut);
  const suffix = cut === -1 ? '' : text.slice(cut);
  if (pathPart === '') return null;
  if (!pathPart.startsWith('/')) pathPart = `/${pathPart}`;
  return { path: pathPart, suffix };
}

/**
 * The view seen by the template: the tag names on top of the caller's view.
 * Each tag is a Mustache lambda for sections, and prints `baseUrl()` when used
 * as a variable ({{cdn}} / {{{cdn}}}).
 */
function withTags(view, tags, onSection, baseUrl) {
  const helpers = {};
  for (const tag of tags) {
    const section = (text, render) => onSection(render(text));
    // Mustache calls a function found in the view first: for a section the
    // result is called again as a lambda, for a variable it is printed.
    section.toString = baseUrl;
    helpers[tag] = () => section;
  }
  return new Mustache.Context(helpers, new Mustache.Context(view === undefined ? {} : view));
}

/**
 * Renders `template` with CDN URLs. `resolveAll(paths)` answers a Map from
 * path to URL (a missing entry renders as written) and never rejects.
 * `knownBase()` is the CDN base URL or undefined; `learnBase()` (never rejects)
 * is called only when a template prints {{cdn}} and the base is not known yet.
 */
async function renderPage({ writer, template, view, partials, tags, resolveAll, knownBase, learnBase }) {
  // Both passes see the same section texts: parse each once per page.
  const parsed = new Map();
  const parse = (rendered) => {
    let t = parsed.get(rendered);
    if (t === undefined) {
      t = parseTarget(rendered);
      parsed.set(rendered, t);
    }
    return t;
  };

  // Pass 1: collect.
  const targets = new Set();
  let sections = 0;
  let wantsBase = false;
  const collecting = withTags(
    view,
    tags,
    (rendered) => {
      sections += 1;
      const t = parse(rendered);
      if (t) targets.add(t.path);
      return '';
    },
    () => {
      wantsBase = true;
      return '';
    },
  );
  // A template Mustache refuses throws here, before any call to the server.
  const draft = writer.render(template, collecting, partials);
  // Nothing of ours on the page: the draft is the page.
  if (sections === 0 && !wantsBase) return draft;

  const [urls] = await Promise.all([
    targets.size ? resolveAll([...targets]) : new Map(),
    wantsBase && knownBase() === undefined ? learnBase() : null,
  ]);
  const baseText = knownBase() ?? '';

  // Pass 2: the page.
  const final = withTags(
    view,
    tags,
    (rendered) => {
      const t = parse(rendered);
      const url = t && urls.get(t.path);
      return url ? htmlEscape(url + t.suffix) : rendered;
    },
    () => baseText,
  );
  return writer.render(template, final, partials);
}

module.exports = { renderPage, parseTarget, htmlDecode, htmlEscape };
