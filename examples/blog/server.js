'use strict';
// Runs the demo blog against a running blotcdn:
//   BLOTCDN_ADDRESS=127.0.0.1:50051 BLOTCDN_BLOGS_DIR=./data/blogs PORT=3000 node server.js
// Seeds the blog first (files, invalidation, thumbnails), then serves http://127.0.0.1:PORT/.
const { Client } = require('blotcdn-client');
const { seed, createServer } = require('./blog');

async function main() {
  const blogId = process.env.BLOG_ID || 'demo';
  const client = new Client({ address: process.env.BLOTCDN_ADDRESS || '127.0.0.1:50051' });
  await seed({
    client,
    blogId,
    blogsDir: process.env.BLOTCDN_BLOGS_DIR || 'data/blogs',
    fontFile: process.env.FONT_FILE || '/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf',
  });
  const port = Number(process.env.PORT || 3000);
  createServer({ client, blogId }).listen(port, '127.0.0.1', () => console.log(`http://127.0.0.1:${port}/`));
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
