'use strict';
// The Mustache integration. Mustache helpers are synchronous and a page needs
// every URL at once, so a page is rendered twice:
//   1. a collecting pass: each {{#cdn}}…{{/cdn}} section records its target and
//      the output is thrown away (a section's text is split into the path and
//      a ?query or #fragment before it is rendered, so that a `?` or `#` from
//      the view stays in the path);
//   2. the targets go to the server in one ResolveBatch (duplicates once);
//   3. the real pass: each section looks its target up in the answers.
// No stand-in ever enters the page, so nothing a template or a view contains
// can be mistaken for one. Knows nothing of gRPC: `resolveAll` is given.

const Mustache = require('mustache');

// What Mustache's HTML escaping produces, the named forms of what splits or walks a path, and
// the numeric forms of anything (a browser reads those without their `;` too).
const NAMED = {
  amp: '&',
  lt: '<',
  gt: '>',
  quot: '"',
  apos: "'",
  num: '#',
  quest: '?',
  sol: '/',
  period: '.',
  percnt: '%',
};

// A numeric entity (its `;` optional) or one of NAMED.
const ENTITY = new RegExp(`&(?:#(\\d+)|#[xX]([0-9a-fA-F]+));?|&(${Object.keys(NAMED).join('|')});`, 'g');

/** Reads HTML text as a browser would for the entities that matter in a URL. */
function htmlDecode(s) {
  if (!s.includes('&')) return s;
  return s.replace(ENTITY, (m, dec, hex, name) => {
    if (name) return NAMED[name];
    const cp = dec !== undefined ? Number(dec) : parseInt(hex, 16);
    return cp > 0 && cp <= 0x10ffff ? String.fromCodePoint(cp) : m;
  });
}

/** Escapes a URL for an HTML attribute or text: safe in either. */
function htmlEscape(s) {
  return s.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]);
}

// A `?` or `#`, or an entity (which may stand for one): where a query or fragment can start.
const MARK = new RegExp(`${ENTITY.source}|[?#]`, 'g');

/** The index of the first `?` or `#` in HTML text (`&#63;` and `&#35;` are one), or -1. */
function firstMark(s) {
  for (const m of s.matchAll(MARK)) {
    if (m[0].length === 1) return m.index;
    const c = htmlDecode(m[0]);
    if (c === '?' || c === '#') return m.index;
  }
  return -1;
}

/**
 * Where a section's template text splits into the path and what is kept after
 * the URL: at the first `?` or `#` written in the section's own text, outside
 * any tag, or before a section inside it whose text starts with one
 * (`{{#v}}?v={{v}}{{/v}}`). A `?` or `#` from the view (or a partial) is part
 * of the path. Returns null when the text does not split. `delimiters` is the
 * raw text of the set-delimiter tags before the split, for the suffix to be
 * parsed as the whole was; `checked` asks for the suffix to be seen to start
 * with `?` or `#` once rendered (a section can render anything).
 */
function findSplit(writer, text) {
  let delimiters = '';
  // Mustache's own parse, with the tags the lambda's `render` uses: each section's
  // text is parsed (and cached) for that render anyway.
  for (const token of writer.parse(text)) {
    const [type, , start, end] = token;
    if (type === 'text') {
      const i = firstMark(text.slice(start, end));
      if (i !== -1) return { at: start + i, delimiters, checked: false };
    } else if (type === '#' || type === '^') {
      const first = token[4][0];
      if (first && first[0] === 'text' && firstMark(text.slice(first[2], first[3])) === 0) {
        return { at: start, delimiters, checked: true };
      }
    } else if (type === '=') {
      delimiters += text.slice(start, end);
    }
  }
  return null;
}

/**
 * Renders a section as the path and the suffix kept after the URL, each as
 * Mustache renders it (HTML-escaped). `split` is findSplit's answer.
 */
function renderSection(text, render, split) {
  if (!split) return { path: render(text), suffix: '' };
  const path = render(text.slice(0, split.at));
  const suffix = render(split.delimiters + text.slice(split.at));
  // Split before a section, which rendered something else than a `?` or `#` first
  // (a view function, say): all of it is the path.
  if (split.checked && suffix !== '' && firstMark(suffix) !== 0) return { path: path + suffix, suffix: '' };
  return { path, suffix };
}

// What template formatting puts around a target: ASCII whitespace only. Any other
// space (NBSP, U+3000, U+FEFF…) is part of the file's name. Loops, not regular
// expressions: /\s+$/ is quadratic on a long run of spaces before a non-space.
const isSpace = (c) => c === 32 || c === 9 || c === 10 || c === 13;

function trimStart(s) {
  let i = 0;
  while (i < s.length && isSpace(s.charCodeAt(i))) i += 1;
  return s.slice(i);
}

function trimEnd(s) {
  let i = s.length;
  while (i > 0 && isSpace(s.charCodeAt(i - 1))) i -= 1;
  return s.slice(0, i);
}

/**
 * Reads a section's rendered path and suffix as a browser would (entities
 * decoded), trims the ASCII whitespace around the target and adds a missing
 * leading `/`. Returns null when there is nothing to resolve, or when the path
 * is not well-formed Unicode (a lone surrogate, as a string cut in the middle
 * of an emoji has): it could not be sent, and alone renders as written.
 */
function parseTarget(renderedPath, renderedSuffix = '') {
  let path = trimStart(htmlDecode(renderedPath));
  let suffix = htmlDecode(renderedSuffix);
  if (suffix === '') path = trimEnd(path);
  else suffix = trimEnd(suffix);
  if (path === '') return null;
  if (!path.startsWith('/')) path = `/${path}`;
  if (!path.isWellFormed()) return null;
  return { path, suffix };
}

/**
 * A Mustache context in which the tag names are always the client's, at any
 * depth: Mustache looks a name up from the innermost section's object outwards,
 * so a post with an `asset` or `cdn` field (even one set to undefined, or
 * inherited) would otherwise take the tag's place inside `{{#posts}}`.
 */
class TagContext extends Mustache.Context {
  constructor(view, parent, helpers) {
    super(view, parent);
    this.helpers = helpers;
  }

  push(view) {
    return new TagContext(view, this, this.helpers);
  }

  lookup(name) {
    return this.helpers.get(name) ?? super.lookup(name);
  }
}

/**
 * The view seen by the template: the caller's view, with the tag names taken
 * by the client whatever the view holds. Each tag is a Mustache lambda for
 * sections (`onSection` gets the section's template text and Mustache's
 * `render`), and prints `baseUrl()` when used as a variable ({{cdn}} / {{{cdn}}}).
 */
function withTags(view, tags, onSection, baseUrl) {
  const helpers = new Map();
  for (const tag of tags) {
    const section = (text, render) => onSection(text, render);
    // A function Mustache finds is called as a lambda for a section, and printed
    // (through its toString) as a variable.
    section.toString = baseUrl;
    helpers.set(tag, section);
  }
  return new TagContext(view === undefined ? {} : view, undefined, helpers);
}

/**
 * Renders `template` with CDN URLs. `resolveAll(paths)` answers a Map from
 * path to URL (a missing entry renders as written) and never rejects.
 * `knownBase()` is the CDN base URL or undefined; `learnBase()` (never rejects)
 * is called only when a template prints {{cdn}} and the base is not known yet.
 */
async function renderPage({ writer, template, view, partials, tags, resolveAll, knownBase, learnBase }) {
  // Both passes see the same sections: split each section's text, and read each
  // rendered target, once per page.
  const splits = new Map();
  const sectionOf = (text, render) => {
    let split = splits.get(text);
    if (split === undefined) {
      split = findSplit(writer, text);
      splits.set(text, split);
    }
    return renderSection(text, render, split);
  };
  const parsed = new Map();
  const parse = ({ path, suffix }) => {
    const key = `${path.length}:${path}${suffix}`;
    let t = parsed.get(key);
    if (t === undefined) {
      t = parseTarget(path, suffix);
      parsed.set(key, t);
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
    (text, render) => {
      sections += 1;
      const t = parse(sectionOf(text, render));
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
    (text, render) => {
      const section = sectionOf(text, render);
      const t = parse(section);
      const url = t && urls.get(t.path);
      // As written: the section as Mustache rendered it.
      return url ? htmlEscape(url + t.suffix) : section.path + section.suffix;
    },
    () => baseText,
  );
  return writer.render(template, final, partials);
}

module.exports = { renderPage, parseTarget, findSplit, htmlDecode, htmlEscape };
