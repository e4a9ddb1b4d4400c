'use strict';
// `npm pack` ships a copy of the server's proto (the package cannot reach
// ../../proto once installed); `postpack` removes it so the repository keeps one copy.
const fs = require('node:fs');
const path = require('node:path');

const here = path.join(__dirname, '..');
const dest = path.join(here, 'proto');
if (process.argv.includes('--remove')) {
  fs.rmSync(dest, { recursive: true, force: true });
} else {
  fs.rmSync(dest, { recursive: true, force: true });
  fs.cpSync(path.join(here, '..', '..', 'proto'), dest, { recursive: true });
}
