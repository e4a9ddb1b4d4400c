'use strict';
// `npm pack` ships a copy of the server's proto (the package cannot reach
// ../../proto once installed); `postpack` removes it so the repository keeps one copy.
//   node scripts/copy-proto.js [dest]     copy (dest defaults to ./proto)
//   node scripts/copy-proto.js --remove   remove ./proto
const fs = require('node:fs');
const path = require('node:path');

const here = path.join(__dirname, '..');
const own = path.join(here, 'proto');
if (process.argv.includes('--remove')) {
  fs.rmSync(own, { recursive: true, force: true });
} else {
  const dest = path.resolve(process.argv[2] || own);
  // Copied beside the destination, then renamed: a reader never sees half a file.
  const tmp = `${dest}.tmp-${process.pid}`;
  fs.cpSync(path.join(here, '..', '..', 'proto'), tmp, { recursive: true });
  fs.rmSync(dest, { recursive: true, force: true });
  fs.renameSync(tmp, dest);
}
