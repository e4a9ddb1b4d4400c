'use strict';
// A bounded cache of parsed templates, for a Mustache.Writer's `templateCache`.
// Mustache's own keeps every template it ever parsed: a renderer serving many
// blogs (each with its own templates) grew by about 64 KB per template seen,
// without end. This one keeps the `max` templates used most recently: a hot
// blog's templates stay parsed, a blog seen once is forgotten. Mustache 4.2
// asks only for set, get and clear.

class TemplateCache {
  /** @param {number} max templates kept; 0 keeps none (every render parses). */
  constructor(max) {
    this.max = max;
    // A Map iterates in insertion order: the first key is the least recently used.
    this.map = new Map();
  }

  get(key) {
    const tokens = this.map.get(key);
    if (tokens !== undefined) {
      // Used again: move it to the end, so eviction is least recently used, not oldest first.
      this.map.delete(key);
      this.map.set(key, tokens);
    }
    return tokens;
  }

  set(key, tokens) {
    if (this.max === 0) return;
    this.map.delete(key);
    this.map.set(key, tokens);
    while (this.map.size > this.max) this.map.delete(this.map.keys().next().value);
  }

  clear() {
    this.map.clear();
  }

  get size() {
    return this.map.size;
  }

  /** The keys held, least recently used first (Mustache's key: the template, then its tags). */
  keys() {
    return this.map.keys();
  }
}

module.exports = { TemplateCache };
