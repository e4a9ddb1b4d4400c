'use strict';
// Arguments checked before a call, with the error the server gives a bad one: protobuf
// would send `String(x)` for anything, so a pipeline's `undefined` path would invalidate
// "/undefined" and report success.

/** A TypeError with the code the server gives a bad argument, naming what was wrong. */
function badArgument(message) {
  const err = new TypeError(`blotcdn-client: ${message}`);
  err.code = 'INVALID_ARGUMENT';
  return err;
}

/** What a value is, for a message: never the whole of a large value. */
function describe(v) {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  if (typeof v === 'string') return `the string ${JSON.stringify(v.length > 40 ? `${v.slice(0, 40)}…` : v)}`;
  if (typeof v === 'number') return `the number ${v}`;
  return typeof v === 'object' ? 'an object' : typeof v;
}

/** A deadline option: a number (not a string from the environment), more than 0. */
function checkMs(name, v) {
  if (typeof v !== 'number' || !(v > 0)) {
    throw badArgument(`${name} must be a positive number of milliseconds, not ${describe(v)}`);
  }
}

function checkString(method, name, v) {
  if (typeof v !== 'string') throw badArgument(`${method}: ${name} must be a string, not ${describe(v)}`);
}

function checkStrings(method, name, list) {
  if (!Array.isArray(list)) throw badArgument(`${method}: ${name} must be an array of strings, not ${describe(list)}`);
  for (let i = 0; i < list.length; i++) {
    if (typeof list[i] !== 'string') throw badArgument(`${method}: ${name}[${i}] must be a string, not ${describe(list[i])}`);
  }
}

module.exports = { badArgument, describe, checkMs, checkString, checkStrings };
