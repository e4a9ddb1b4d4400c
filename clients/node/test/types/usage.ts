// Compiled by test/package.test.js with `tsc --noEmit --strict`: the declarations fit real use.
import { Client, Resolved, Asset, BlotcdnError, PurgeQueue } from '../..';
import { Readable } from 'node:stream';

async function use(): Promise<void> {
  const client = new Client({ address: '127.0.0.1:50051', token: 't', deadlineMs: 250, tags: ['cdn'], cdnBaseUrl: 'https://blotcdn.com', templateCacheSize: 500 });
  const html: string = await client.render('blog', '{{#cdn}}/a.css{{/cdn}}', { x: 1 }, { p: '' });
  const answers: Map<string, Resolved> = await client.resolve('blog', ['/a.css']);
  const cacheId: number = await client.invalidate('blog', ['/a.css']);
  const a: Asset = await client.putAsset('blog', { filename: 'a.png', path: '/a.png' }, Buffer.from('x'));
  const b: Asset = await client.putAsset('blog', { filename: 'a.png' }, Readable.from([Buffer.from('x')]));
  const d: Asset = await client.putAsset('blog', { filename: 'a.png' }, new ArrayBuffer(8));
  const e: Asset = await client.putAsset('blog', { filename: 'a.png' }, new DataView(new ArrayBuffer(8)));
  async function* text(): AsyncGenerator<string> {
    yield 'x';
  }
  const f: Asset = await client.putAsset('blog', { filename: 'a.txt' }, text());
  const hooked = new Client({ onRenderError: (err, blogId) => console.warn(blogId, err.code) });
  hooked.close();
  const c: Asset = await client.importFile('blog', '/a.png');
  await client.setDomain('example.com', 'blog');
  const owner: string = await client.lookupDomain('example.com');
  await client.removeDomain('example.com');
  const blog = await client.getBlog('blog');
  const n: number = blog.cacheId + blog.pathCount;
  await client.deleteBlog('blog');
  await client.deleteAsset('blog', a.hash);
  await client.purge('blog');
  await client.purge('blog', ['blog/pages']);
  const queues: PurgeQueue[] = await client.getPurges();
  const waiting: number = queues[0].length + queues[0].oldestMs + queues[0].sent;
  const info = await client.getInfo();
  try {
    await client.getBlog('x');
  } catch (e) {
    const code: string = (e as BlotcdnError).code;
    void code;
  }
  client.close();
  void [html, answers, cacheId, a, b, c, d, e, f, owner, n, info.cdnBaseUrl, waiting, queues[0].lastError];
}
void use;
