'use strict';
// The demo blog: its files, and the home page rendered through blotcdn-client.
// Every asset URL on the page comes from one ResolveBatch per request.

const fs = require('node:fs');
const http = require('node:http');
const path = require('node:path');

const POSTS = Array.from({ length: 20 }, (_, i) => ({
  slug: `post-${i + 1}`,
  title: i === 0 ? 'Tom & Jerry’s <first> post' : `Post number ${i + 1}`,
  hue: (i * 37) % 360,
}));

const TEMPLATE = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{title}}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{{#cdn}}/style.css{{/cdn}}">
<style>
@font-face { font-family: "Blog"; src: url("{{#cdn}}/fonts/blog.ttf{{/cdn}}") format("truetype"); }
</style>
<script src="{{#cdn}}/app.js{{/cdn}}" defer></script>
</head>
<body>
<h1>{{title}}</h1>
{{#posts}}{{> post}}{{/posts}}
</body>
</html>
`;

const PARTIALS = {
  post: `<article id="{{slug}}">
  <img class="thumb" src="{{#cdn}}/thumbs/{{slug}}.svg{{/cdn}}" alt="{{title}}" width="64" height="64">
  <h2>{{title}}</h2>
</article>
`,
};

function thumbnail(post) {
  return `<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64" viewBox="0 0 64 64">` +
    `<rect width="64" height="64" fill="hsl(${post.hue},60%,50%)"/></svg>`;
}

/**
 * Puts the blog in place: the template's files in the blog's folder (then one
 * invalidation), and each post's thumbnail as a permanent asset.
 * `fontFile`: a TrueType font to serve as the blog's web font.
 */
async function seed({ client, blogsDir, blogId, fontFile }) {
  const dir = path.join(blogsDir, blogId);
  fs.mkdirSync(path.join(dir, 'fonts'), { recursive: true });
  fs.writeFileSync(path.join(dir, 'style.css'), 'body { font-family: "Blog", serif; color: rgb(40, 40, 40); }\n.thumb { float: left; margin-right: 1em; }\narticle { clear: both; }\n');
  fs.writeFileSync(path.join(dir, 'app.js'), 'document.documentElement.dataset.app = "ran";\n');
  fs.copyFileSync(fontFile, path.join(dir, 'fonts', 'blog.ttf'));
  await client.invalidate(blogId);
  for (const post of POSTS) {
    await client.putAsset(blogId, { filename: `${post.slug}.svg`, path: `/thumbs/${post.slug}.svg` }, Buffer.from(thumbnail(post)));
  }
}

/** The blog's web server: GET / renders the home page. */
function createServer({ client, blogId }) {
  return http.createServer(async (req, res) => {
    if (req.method !== 'GET' || req.url !== '/') {
      res.writeHead(404, { 'content-type': 'text/plain' }).end('not found\n');
      return;
    }
    try {
      const html = await client.render(blogId, TEMPLATE, { title: 'A blog on blotcdn', posts: POSTS }, PARTIALS);
      res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' }).end(html);
    } catch (err) {
      res.writeHead(500, { 'content-type': 'text/plain' }).end(`${err.message}\n`);
    }
  });
}

module.exports = { seed, createServer, POSTS };
