"""Pieces of the power-loss tests: the lossy mount, the server process, a
gRPC/HTTP client, and a record of acknowledged writes that can be checked
against a restarted server."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PROTO_ROOT = os.path.join(REPO, "proto")
PROTO = os.path.join("blotcdn", "v1", "blotcdn.proto")


def server_binary():
    path = os.environ.get("BLOTCDN_BIN") or os.path.join(REPO, "target", "debug", "blotcdn")
    if not os.path.isabs(path):
        path = os.path.join(REPO, path)
    return path


def generate_stubs(out_dir):
    """Generates the Python gRPC modules from the proto; returns (pb2, pb2_grpc)."""
    from grpc_tools import protoc
    import importlib

    args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={out_dir}", f"--grpc_python_out={out_dir}", PROTO]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    if out_dir not in sys.path:
        sys.path.insert(0, out_dir)
    pb2 = importlib.import_module("blotcdn.v1.blotcdn_pb2")
    pb2_grpc = importlib.import_module("blotcdn.v1.blotcdn_pb2_grpc")
    return pb2, pb2_grpc


def _die_with_parent(sig, argv):
    """argv, run so that the child gets `sig` when the test process dies.
    setpriv (util-linux) sets it; a preexec_fn would run Python in the forked
    child, which gRPC's threads do not survive."""
    import shutil

    if shutil.which("setpriv"):
        return ["setpriv", f"--pdeathsig={sig}", "--", *argv]
    return argv


def wait_until(cond, timeout, what, step=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


# ---- the lossy filesystem ---------------------------------------------------

class LossyMount:
    """One lossyfs process, mounted at `path`; its state lives across crashes."""

    def __init__(self, workdir, extra_args=()):
        self.workdir = workdir
        self.path = os.path.join(workdir, "mnt")
        self.control = os.path.join(workdir, "lossyfs.sock")
        self.log = os.path.join(workdir, "lossyfs.log")
        os.makedirs(self.path, exist_ok=True)
        self.errlog = open(os.path.join(workdir, "lossyfs.stderr"), "ab")
        argv = [sys.executable, os.path.join(HERE, "lossyfs.py"), self.path, "--control", self.control,
                "--log", self.log, *extra_args]
        # TERM: fusepy unmounts and lossyfs exits if the tests die.
        self.proc = subprocess.Popen(_die_with_parent("TERM", argv), stdout=self.errlog, stderr=self.errlog,
                                     start_new_session=True)
        try:
            wait_until(self._ready, 30, "lossyfs to mount")
        except Exception:
            self.close()
            raise

    def _ready(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"lossyfs exited with {self.proc.returncode}: {self.stderr_tail()}")
        try:
            return self.command("ping", timeout=2).get("mounted") and os.path.ismount(self.path)
        except OSError:
            return False

    def stderr_tail(self):
        try:
            with open(os.path.join(self.workdir, "lossyfs.stderr"), "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def command(self, cmd, timeout=90):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(self.control)
            s.sendall((cmd + "\n").encode())
            line = s.makefile("rb").readline()
        finally:
            s.close()
        if not line:
            raise RuntimeError(f"lossyfs gave no answer to {cmd!r}: {self.stderr_tail()}")
        return json.loads(line)

    def crash(self):
        """Power cut: drops what was never synced, then mounts again. Every
        process using the mount must be dead already. Returns what was lost."""
        r = self.command("crash")
        if not r.get("ok"):
            raise RuntimeError(f"lossyfs crash failed: {r}")
        wait_until(lambda: os.path.ismount(self.path), 30, "the mount to come back")
        return r["lost"]

    def sync(self):
        r = self.command("sync")
        assert r.get("ok"), r

    def stats(self):
        return self.command("stats", timeout=10)["stats"]

    def thaw(self):
        """Fsyncs take effect again (see lossyfs's docstring)."""
        r = self.command("thaw", timeout=10)
        assert r.get("ok"), r

    def freeze_after_fsync(self, regex, n=1, arm=None):
        """Sets the trigger: the durable state freezes when the n-th fsync
        of a path matching `regex` completes (counted once an fsync matching
        `arm` was seen, if given). See lossyfs's docstring."""
        cmd = f"freeze-after-fsync {regex} {n}" + (f" {arm}" if arm else "")
        r = self.command(cmd, timeout=10)
        if not r.get("ok"):
            raise RuntimeError(f"lossyfs refused {cmd!r}: {r}")
        return r["trigger"]

    def frozen(self):
        return self.command("frozen", timeout=10)["frozen"]

    def mounted(self):
        """In the mount table (a dead FUSE mount fails os.path.ismount)."""
        with open("/proc/self/mounts") as f:
            return any(line.split()[1] == self.path for line in f if len(line.split()) > 1)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.command("quit", timeout=10)
            except Exception:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.mounted():
            for cmd in (["fusermount", "-u", "-z", self.path], ["fusermount3", "-u", "-z", self.path],
                        ["umount", "-l", self.path]):
                try:
                    if subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      timeout=20).returncode == 0:
                        break
                except (FileNotFoundError, subprocess.TimeoutExpired):
                    pass
        self.errlog.close()


# ---- the server ---------------------------------------------------------------

class Server:
    """The real blotcdn binary as a child process."""

    def __init__(self, data_dir, run_dir, name="server"):
        self.data_dir = data_dir
        self.run_dir = run_dir
        self.name = name
        self.proc = None
        self.starts = 0

    def start(self, timeout=60):
        self.starts += 1
        self.addr_file = os.path.join(self.run_dir, f"{self.name}-{self.starts}-addrs.json")
        self.log_path = os.path.join(self.run_dir, f"{self.name}-{self.starts}.log")
        log = open(self.log_path, "wb")
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        argv = [server_binary(), "serve", "--data-dir", self.data_dir, "--grpc-addr", "127.0.0.1:0",
                "--http-addr", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0", "--addr-file", self.addr_file]
        self.proc = subprocess.Popen(_die_with_parent("KILL", argv), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        log.close()

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during start:\n{self.log_tail()}")
            if os.path.exists(self.addr_file):
                with open(self.addr_file) as f:
                    try:
                        return json.load(f)
                    except ValueError:
                        return None
            return None

        try:
            addrs = wait_until(ready, timeout, f"{self.addr_file} (server start)")
        except TimeoutError:
            self.kill()
            raise TimeoutError(f"server did not start within {timeout} s:\n{self.log_tail()}")
        self.grpc_addr, self.http_addr = addrs["grpc"], addrs["http"]
        return self

    def log_tail(self, n=3000):
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def kill(self):
        """kill -9, and wait for the process to be gone."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(30)
        self.proc = None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None


# ---- the client -------------------------------------------------------------

class Client:
    def __init__(self, pb2, pb2_grpc, server, timeout=60):
        self.pb2 = pb2
        self.timeout = timeout
        self.http_addr = server.http_addr
        # A channel of its own: gRPC shares connections between channels to
        # the same address, and a restarted server may get the port of the
        # one killed before it, whose failed connection is then still
        # backing off (an RPC fails at once with "connection refused").
        self.channel = grpc.insecure_channel(server.grpc_addr, options=[("grpc.use_local_subchannel_pool", 1)])
        self.pub = pb2_grpc.PublisherStub(self.channel)
        self.res = pb2_grpc.ResolverStub(self.channel)

    def close(self):
        self.channel.close()

    def invalidate(self, blog, paths=()):
        return self.pub.Invalidate(self.pb2.InvalidateRequest(blog_id=blog, paths=list(paths)),
                                   timeout=self.timeout).cache_id

    def put_asset(self, blog, filename, data, path="", chunk=64 * 1024):
        pb2 = self.pb2

        def chunks():
            yield pb2.PutAssetChunk(header=pb2.PutAssetHeader(blog_id=blog, filename=filename, path=path))
            for i in range(0, len(data), chunk):
                yield pb2.PutAssetChunk(data=data[i:i + chunk])

        return self.pub.PutAsset(chunks(), timeout=self.timeout)

    def delete_blog(self, blog):
        self.pub.DeleteBlog(self.pb2.DeleteBlogRequest(blog_id=blog), timeout=self.timeout)

    def set_domain(self, domain, blog):
        self.pub.SetDomain(self.pb2.SetDomainRequest(domain=domain, blog_id=blog), timeout=self.timeout)

    def get_blog(self, blog):
        """The Blog message, or None for NOT_FOUND."""
        try:
            return self.res.GetBlog(self.pb2.GetBlogRequest(blog_id=blog), timeout=self.timeout)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def lookup_domain(self, domain):
        try:
            return self.res.LookupDomain(self.pb2.LookupDomainRequest(domain=domain), timeout=self.timeout).blog_id
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise

    def resolve(self, blog, paths):
        out = []
        for i in range(0, len(paths), 5000):
            r = self.res.ResolveBatch(self.pb2.ResolveBatchRequest(blog_id=blog, paths=paths[i:i + 5000]),
                                      timeout=self.timeout)
            out.extend(r.assets)
        return out

    def http_get(self, url_or_path):
        """(status, body) for a URL path, asked of the current HTTP origin."""
        path = urllib.parse.urlsplit(url_or_path).path if "://" in url_or_path else url_or_path
        try:
            with urllib.request.urlopen(f"http://{self.http_addr}{path}", timeout=self.timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()


def content_hash(data):
    """The CAS name: the first 128 bits of BLAKE3, in hex."""
    import blake3

    return blake3.blake3(data).hexdigest()[:32]


# ---- acknowledged writes ----------------------------------------------------

class Ledger:
    """What the server acknowledged (and what was in flight when it died),
    checked against the server after a crash. Each blog is written by one
    thread only, so the order of a blog's writes is known."""

    def __init__(self):
        self.mu = threading.Lock()
        self.floors = {}  # blog -> highest acknowledged floor (Invalidate with no paths)
        self.versions = {}  # (blog, path) -> highest acknowledged cache id for the path
        self.max_id = {}  # blog -> highest cache id acknowledged for the blog (any write)
        self.assets = {}  # url path -> (blog, hash, bytes)
        self.bound = {}  # (blog, path) -> hash
        self.domains = {}  # domain -> blog
        self.deleted = set()  # blogs whose deletion was acknowledged
        self.maybe_deleted = set()  # blogs whose deletion was in flight
        self.inflight_assets = {}  # url path -> bytes, uploads not acknowledged
        self.acks = 0
        # Optional: a callable asked after each answer, False once the disk's
        # durable state is frozen (lossyfs's freeze-after-fsync). An answer
        # heard after the freeze may rest on an fsync that made nothing
        # durable, which a real power cut at that instant would never have
        # answered: it is kept as in flight, not as acknowledged. An answer
        # heard before it rests on an fsync that completed before it.
        self.gate = None
        self.late = 0  # answers heard after the freeze

    def ack(self, kind, **kw):
        if self.gate is not None and not self.gate():
            with self.mu:
                self.late += 1
            return
        with self.mu:
            self.acks += 1
            blog = kw.get("blog")
            if "id" in kw:
                self.max_id[blog] = max(self.max_id.get(blog, 0), kw["id"])
            if kind == "floor":
                self.floors[blog] = max(self.floors.get(blog, 0), kw["id"])
            elif kind == "paths":
                for p in kw["paths"]:
                    self.versions[(blog, p)] = max(self.versions.get((blog, p), 0), kw["id"])
            elif kind == "asset":
                self.assets[kw["url"]] = (blog, kw["hash"], kw["data"])
                if kw.get("path"):
                    self.bound[(blog, kw["path"])] = kw["hash"]
            elif kind == "domain":
                self.domains[kw["domain"]] = blog
            elif kind == "delete":
                self.deleted.add(blog)
                self.maybe_deleted.discard(blog)

    def check(self, client, context=""):
        """Asks the server for every acknowledged write; returns a list of
        human-readable losses (empty when all is well)."""
        lost = []
        with self.mu:
            gone = self.deleted | self.maybe_deleted
            # Deletions stay deleted.
            for blog in sorted(self.deleted):
                b = client.get_blog(blog)
                if b is not None:
                    lost.append(f"acknowledged DeleteBlog({blog}) undone: GetBlog answers cache_id={b.cache_id}")
            # Floors.
            for blog, floor in sorted(self.floors.items()):
                if blog in gone:
                    continue
                b = client.get_blog(blog)
                if b is None:
                    lost.append(f"blog {blog} unknown, but Invalidate({blog}) was acknowledged with cache_id={floor}")
                elif b.cache_id < floor:
                    lost.append(f"blog {blog}: floor cache_id {b.cache_id} < acknowledged Invalidate cache_id {floor}")
            # Path versions and bindings, one ResolveBatch per blog.
            per_blog = {}
            for (blog, path), v in self.versions.items():
                per_blog.setdefault(blog, {})[path] = ("version", v)
            for (blog, path), h in self.bound.items():
                per_blog.setdefault(blog, {})[path] = ("hash", h)
            for blog, want in sorted(per_blog.items()):
                if blog in gone:
                    continue
                paths = sorted(want)
                got = client.resolve(blog, paths)
                for p, a in zip(paths, got):
                    kind, v = want[p]
                    if a.status != 1:  # RESOLVE_STATUS_OK
                        lost.append(f"{blog}{p}: resolves with status {a.status}, but a write to it was acknowledged"
                                    f" ({kind} {v})")
                    elif kind == "version" and a.cache_id < v:
                        lost.append(f"{blog}{p}: cache_id {a.cache_id} < acknowledged Invalidate cache_id {v}")
                    elif kind == "hash" and a.content_hash != v:
                        lost.append(f"{blog}{p}: bound to {a.content_hash or a.url!r}, acknowledged PutAsset bound {v}")
            # Assets serve their exact bytes; a deleted blog's assets are gone.
            for url, (blog, h, data) in sorted(self.assets.items()):
                status, body = client.http_get(url)
                if blog in self.deleted:
                    if status == 200:
                        lost.append(f"GET {url}: 200 after an acknowledged DeleteBlog({blog})")
                    continue
                if blog in self.maybe_deleted and status == 404:
                    continue
                if status != 200:
                    lost.append(f"GET {url}: {status}, but PutAsset({blog}, {len(data)} bytes) was acknowledged")
                elif body != data:
                    lost.append(f"GET {url}: {len(body)} bytes that differ from the {len(data)} acknowledged"
                                f" (BLAKE3 {content_hash(body)})")
            # Uploads in flight: either absent or whole.
            for url, data in sorted(self.inflight_assets.items()):
                if url in self.assets:
                    continue
                status, body = client.http_get(url)
                if status == 200 and content_hash(body) != content_hash(data):
                    lost.append(f"GET {url} (upload in flight at the crash): 200 with corrupt bytes"
                                f" (BLAKE3 {content_hash(body)})")
            # Domains.
            for domain, blog in sorted(self.domains.items()):
                got = client.lookup_domain(domain)
                if blog in self.deleted:
                    if got == blog:
                        lost.append(f"domain {domain} still maps to {blog} after an acknowledged DeleteBlog")
                elif blog in self.maybe_deleted:
                    continue
                elif got != blog:
                    lost.append(f"domain {domain} maps to {got!r}, acknowledged SetDomain({domain}, {blog})")
            # New ids go above every acknowledged one.
            for blog, top in sorted(self.max_id.items()):
                if blog in gone:
                    continue
                nid = client.invalidate(blog, ["/_powerloss_probe"])
                if nid <= top:
                    lost.append(f"blog {blog}: next cache id {nid} is not above the acknowledged {top}")
                self.versions[(blog, "/_powerloss_probe")] = nid
                self.max_id[blog] = nid
        if context:
            lost = [f"[{context}] {x}" for x in lost]
        return lost

    def summary(self):
        with self.mu:
            return (f"{self.acks} acknowledged writes: {len(self.floors)} floors, {len(self.versions)} path versions,"
                    f" {len(self.assets)} assets, {len(self.domains)} domains, {len(self.deleted)} deletions")


def cas_blobs(data_dir):
    """(name, path) of every blob under {data_dir}/cas/ab/cd/."""
    root = os.path.join(data_dir, "cas")
    out = []
    if not os.path.isdir(root):
        return out
    for a in os.listdir(root):
        pa = os.path.join(root, a)
        if len(a) != 2 or not os.path.isdir(pa):
            continue
        for b in os.listdir(pa):
            pb = os.path.join(pa, b)
            if not os.path.isdir(pb):
                continue
            for name in os.listdir(pb):
                out.append((name, os.path.join(pb, name)))
    return out


def corrupt_blobs(data_dir):
    """Blobs whose bytes do not hash to their name."""
    bad = []
    for name, path in cas_blobs(data_dir):
        with open(path, "rb") as f:
            data = f.read()
        if content_hash(data) != name:
            bad.append(f"{path}: {len(data)} bytes hash to {content_hash(data)}")
    return bad


class Storm:
    """Writers on several threads, each on its own blogs, until stopped or
    until the server goes away. Every answer is written into the ledger."""

    def __init__(self, client, ledger, threads=4, seed=1, prefix="s", mix=None, batch_paths=20,
                 asset_sizes=(1, 64 * 1024), path_len=30):
        self.client = client
        self.ledger = ledger
        self.nthreads = threads
        self.seed = seed
        self.prefix = prefix
        self.mix = mix or {"floor": 3, "paths": 3, "asset": 3, "domain": 1, "delete": 1}
        self.batch_paths = batch_paths
        self.path_len = path_len
        self.asset_sizes = asset_sizes
        self.stop_flag = threading.Event()
        self.threads = []
        self.errors = []
        self.ops = 0

    def start(self):
        for t in range(self.nthreads):
            th = threading.Thread(target=self._run, args=(t,), daemon=True)
            th.start()
            self.threads.append(th)
        return self

    def stop(self, timeout=60):
        self.stop_flag.set()
        for th in self.threads:
            th.join(timeout)

    def _run(self, t):
        rnd = random.Random(self.seed * 1000 + t)
        kinds = [k for k, w in self.mix.items() for _ in range(w)]
        gen = 0
        blog = f"{self.prefix}{t}g{gen}"
        n = 0
        led, c = self.ledger, self.client
        transient = 0
        # After a transient failure the same kind of write is tried again: a
        # new random one would be a delete one time in eleven, and a thread
        # retrying a dead server for a while would mark its blog as maybe
        # deleted (so never checked) for a delete it never sent.
        retry = None
        while not self.stop_flag.is_set():
            n += 1
            kind = retry or rnd.choice(kinds)
            retry = None
            try:
                if kind == "floor":
                    i = c.invalidate(blog)
                    led.ack("floor", blog=blog, id=i)
                elif kind == "paths":
                    pad = "x" * max(1, self.path_len - 20)
                    paths = [f"/p/{n}/{rnd.randrange(1 << 30)}/{pad[:rnd.randrange(1, 2 * len(pad))]}.html"
                             for _ in range(self.batch_paths)]
                    i = c.invalidate(blog, paths)
                    led.ack("paths", blog=blog, id=i, paths=paths)
                elif kind == "asset":
                    size = rnd.randint(*self.asset_sizes)
                    data = rnd.randbytes(size)
                    fname = f"f{t}-{n}.bin"
                    path = f"/a/{t}/{n}.bin" if rnd.random() < 0.5 else ""
                    url = f"/{blog}/_assets/{content_hash(data)}/{fname}"
                    with led.mu:
                        led.inflight_assets[url] = data
                    a = c.put_asset(blog, fname, data, path=path)
                    if a.hash != content_hash(data):
                        self.errors.append(f"PutAsset answered hash {a.hash}, expected {content_hash(data)}")
                    led.ack("asset", blog=blog, url=urllib.parse.urlsplit(a.url).path, hash=a.hash, data=data,
                            path=path)
                elif kind == "domain":
                    d = f"{blog}-{n}.powerloss.example"
                    c.set_domain(d, blog)
                    led.ack("domain", blog=blog, domain=d)
                elif kind == "delete":
                    if blog not in led.max_id and not any(b == blog for b in led.domains.values()):
                        continue  # nothing to delete yet
                    with led.mu:
                        led.maybe_deleted.add(blog)
                    c.delete_blog(blog)
                    led.ack("delete", blog=blog)
                    gen += 1
                    blog = f"{self.prefix}{t}g{gen}"
                self.ops += 1
            except grpc.RpcError as e:
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED,
                                grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN,
                                grpc.StatusCode.INTERNAL):
                    # Most likely the server is gone (the cut). The write was not
                    # acknowledged, which the ledger allows for (in flight); keep
                    # trying until stopped, in case it was a passing failure.
                    transient += 1
                    if transient > 400:
                        return
                    retry = kind
                    time.sleep(0.05)
                    continue
                self.errors.append(f"{kind} on {blog}: {e.code()} {e.details()}")
                return
            except ValueError:  # the channel was closed: the test is over
                return
            transient = 0
