'use strict';
// A bounded cache of parsed templates, for a Mustache.Writer's `templateCache`.
// Mustache's own keeps every template it ever parsed: a renderer serving many
// blogs (each with its own templates) grew by about 64 KB per template seen,
// without end. This one keeps the templates used most recently, at most `max`
// of them and at most `maxChars` characters of template text between them: a
// parsed template takes some 20-25 times its text (a hostile test held 2.5 GB
// in 1,000 templates of 100 KB under a bound on their number alone). A template
// longer than `maxChars` is parsed for each page and not kept. A hot blog's
// templates stay parsed, a blog seen once is forgotten. Mustache 4.2 asks only
// for set, get and clear; its key is the template's text and its tags.

class TemplateCache {
  /**
   * @param {number} max templates kept; 0 keeps none (every render parses).
   * @param {number} maxChars characters of template text kept, all templates together.
   */
  constructor(max, maxChars = Infinity) {
    this.max = max;
    this.maxChars = maxChars;
    this.chars = 0;
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
    if (this.max === 0 || key.length > this.maxChars) return;
    if (this.map.delete(key)) this.chars -= key.length;
    this.map.set(key, tokens);
    this.chars += key.length;
    while (this.map.size > this.max || this.chars > this.maxChars) {
      const oldest = this.map.keys().next().value;
      this.map.delete(oldest);
      this.chars -= oldest.length;
    }
  }

  clear() {
    this.map.clear();
    this.chars = 0;
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
