'use strict';
// blotcdn-client: CDN URLs for Mustache pages (one ResolveBatch per page) and
// the publish side of blotcdn, over node:http2.
const { Client } = require('./lib/client');

module.exports = { Client };
