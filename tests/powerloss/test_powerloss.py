"""Power-loss tests: the real server on lossyfs, which forgets on a simulated
power cut whatever was not fsynced (file data) or dir-fsynced (names).

Every test checks the same promise: what the server acknowledged is there
after the power comes back (see harness.Ledger.check for the list).

Each test runs on one or more models of the disk (lossyfs options):

* ``posix``: the minimum POSIX promises. A file's data is durable after its
  fsync, a name after an fsync of its directory, nothing else.
* ``journal``: names are journaled (any fsync makes every earlier create,
  mkdir, rename and unlink durable, as ext4 and XFS do in practice); file
  data still needs the file's own fsync. sled, which syncs its file with
  sync_file_range (no FUSE request, no durability promise), is not trusted.
* ``wal``: ``journal``, and sled's flush is taken on trust: sled's files
  become durable when the server ends a checkpoint (its log emptied and
  synced). This isolates the server's own part: its log's fdatasync and the
  CAS's fsyncs. These tests pass on a correct server; removing the log's
  sync makes them fail.

Any loss fails, with the list of what was lost. (The harness first found
three bugs — sled's flush taken as durable, new CAS folders never fsynced in
their parents, the folders of a first start never fsynced — all fixed; on
every model, ``posix`` included, a correct server loses nothing.)
"""

import os
import random
import time

import pytest

from harness import Ledger, Storm, corrupt_blobs, wait_until

WAL = "/data/db.wal"

MODELS = {
    "posix": [],
    "journal": ["--journaled-names"],
    "wal": ["--journaled-names", "--trust-at-log-reset", r"^/data/db/"],
}

def report(problems, lost, ledger, env=None):
    """The failure message: which acknowledged writes were lost, and what
    the power cut dropped on the filesystem."""
    lines = [f"{len(problems)} acknowledged write(s) lost or wrong after the power cut:"]
    lines += ["  - " + p for p in problems[:40]]
    if len(problems) > 40:
        lines.append(f"  ... and {len(problems) - 40} more")
    lines.append(ledger.summary())
    if lost is not None:
        names = lost.get("lost_names", [])
        data = lost.get("lost_data", [])
        lines.append(f"the power cut dropped {len(names)} unsynced name(s) and unsynced data of {len(data)} file(s):")
        lines += ["  name: " + n for n in names[:20]]
        if len(names) > 20:
            lines.append(f"  ... and {len(names) - 20} more names")
        lines += [f"  data: {d['path']}: {d['unsynced_bytes']} unsynced bytes (size {d['size']},"
                  f" durable size {d['durable_size']})" for d in data[:20]]
    if env is not None and env.servers:
        s = env.servers[-1]
        lines.append(f"server log: {s.log_path}")
    return "\n".join(lines)


def check(env, client, ledger, lost, context):
    problems = ledger.check(client, context)
    if problems:
        pytest.fail(report(problems, lost, ledger, env), pytrace=False)


def settled_env(env):
    """A server that has run once with everything it created on disk, as on
    a machine that has been up for a while (sync(1)); the power cut comes later."""
    srv = env.server()
    env.fs.sync()
    return srv


def resets(env):
    """(log emptied, log emptied and synced): how many checkpoints began to
    end, and ended."""
    st = env.fs.stats()
    return st["zero_head_writes"].get(WAL, 0), st["zero_head_syncs"].get(WAL, 0)


def wait_for_checkpoint(env, timeout, what):
    """Returns once the next checkpoint has emptied the log and synced that
    (or, for a server that does not sync it, 1 s after the emptying)."""
    (w0, s0) = resets(env)
    wait_until(lambda: resets(env)[0] > w0, timeout, what, step=0.003)
    try:
        wait_until(lambda: resets(env)[1] > s0, 1.0, "the sync of the emptied log", step=0.002)
    except TimeoutError:
        pass


def model_env(make_env, model):
    return make_env(MODELS[model])


# ---- a. a storm of writes, then a power cut -------------------------------------------

@pytest.mark.parametrize("model", ["posix", "journal", "wal"])
def test_storm_of_writes_survives_a_power_cut(make_env, model):
    """Publishes, uploads, domains and deletions from 4 threads; the power
    goes mid-storm, twice (the second time soon after the restart, whose
    start-up replays the log and checkpoints)."""
    env = model_env(make_env, model)
    srv = settled_env(env)
    led = Ledger()
    for round_ in range(2):
        storm = Storm(env.client(srv), led, threads=4, seed=10 + round_, prefix=f"a{round_}x").start()
        time.sleep(3.0)
        lost = env.crash(srv)
        storm.stop()
        assert not storm.errors, storm.errors
        assert storm.ops > 20, f"the storm made only {storm.ops} writes before the cut"
        check(env, env.client(srv), led, lost, f"{model}, round {round_}")
    print(led.summary())


# ---- b. crash windows around checkpoints -------------------------------------------------

@pytest.mark.parametrize("model", ["posix", "wal"])
def test_power_cuts_around_checkpoints(make_env, model):
    """The store checkpoints (flushes sled, empties the log) every 10 s under
    load, after 64 MiB of log, and when idle. The power goes right after
    each kind, and once between checkpoints."""
    env = model_env(make_env, model)
    srv = settled_env(env)
    led = Ledger()

    def storm(tag, threads=2, mix=None, **kw):
        mix = mix or {"floor": 2, "paths": 4, "asset": 2, "domain": 1, "delete": 1}
        return Storm(env.client(srv), led, threads=threads, seed=sum(map(ord, tag)), prefix=f"b{tag}x",
                     mix=mix, **kw).start()

    def cut_after_next_checkpoint(s, timeout, what):
        t0 = time.monotonic()
        wait_for_checkpoint(env, timeout, what)
        st = env.fs.stats()
        wal_mib = os.path.getsize(env.data_dir + "/db.wal") >> 20
        print(f"{model}: {what} after {time.monotonic() - t0:.1f} s (log file {wal_mib} MiB);"
              f" {st['bytes_written'] >> 20} MiB written so far;"
              f" fsyncs of sled's files: { {p: n for p, n in st['fsync_by_path'].items() if p.startswith('/data/db/')} }")
        lost = env.crash(srv)
        s.stop()
        assert not s.errors, s.errors
        return lost

    # 1. Writes for more than 10 s: the timed checkpoint comes under load.
    s = storm("timed")
    lost = cut_after_next_checkpoint(s, 25, "a timed checkpoint under load")
    check(env, env.client(srv), led, lost, f"{model}: cut right after a timed checkpoint")

    # 2. Between checkpoints: what was acknowledged lives in the log only.
    s = storm("between")
    time.sleep(2.0)
    lost = env.crash(srv)
    s.stop()
    assert not s.errors, s.errors
    check(env, env.client(srv), led, lost, f"{model}: cut between checkpoints")

    # 3. Big batches (10,000 paths of ~300 bytes a call): 64 MiB of log
    #    force a checkpoint before the 10 s are up (the log file, grown in
    #    16 MiB steps, then holds over 64 MiB).
    s = storm("big", threads=3, mix={"paths": 1}, batch_paths=10000, path_len=300)
    lost = cut_after_next_checkpoint(s, 60, "a checkpoint after 64 MiB of log")
    check(env, env.client(srv), led, lost, f"{model}: cut right after a size checkpoint")

    # 4. Idle: writes stop; after 10 s of quiet sled is flushed and the log emptied.
    s = storm("idle")
    time.sleep(1.0)
    s.stop()
    lost = cut_after_next_checkpoint(s, 25, "an idle checkpoint")
    check(env, env.client(srv), led, lost, f"{model}: cut right after an idle checkpoint")
    print(led.summary())


# ---- b2. power cuts inside a checkpoint ----------------------------------------------------
#
# A checkpoint, in order: sled flushed; sled's files and db/ fsynced; the
# marker written (db.checkpoint.tmp fdatasynced, renamed, data/ fsynced);
# the log emptied (8 zero bytes at its head, fdatasynced). lossyfs's
# freeze-after-fsync cuts the power right after one of these fsyncs: the
# durable state stops there, the server goes on (its later fsyncs answered
# but without effect) until it is killed and the filesystem crashes.

MARKER_TMP = r"^/data/db\.checkpoint\.tmp$"
CHECKPOINT_TAIL = ("/data/db.checkpoint.tmp", "/data/", WAL)  # the fsyncs after sled's

WINDOWS = {
    # (a) sled's files and folder are durable, the marker is not written yet.
    #     Only the checkpoint fsyncs db/ (sled fsyncs its files, never its folder).
    "sled-synced": dict(regex=r"^/data/db/$", arm=None, tail=CHECKPOINT_TAIL),
    # (b) the marker's rename is durable (data/ fsynced), the log not emptied yet.
    "marker-durable": dict(regex=r"^/data/$", arm=MARKER_TMP, tail=(WAL,)),
    # (c) the log's zeroed head is durable: the checkpoint is complete. Armed by
    #     the marker's fdatasync, so that it is the reset's fdatasync, not a group
    #     commit's (the writer thread runs the checkpoint: no commit in between).
    "log-emptied": dict(regex=r"^/data/db\.wal$", arm=MARKER_TMP, tail=()),
}


def start_or_fail(srv, what):
    """Starts the server; a refusal to start is a finding, reported as such."""
    try:
        srv.start()
    except (RuntimeError, TimeoutError) as e:
        if "older than its last checkpoint" in str(e):
            why = ("refused to start, calling sled older than the marker: in these windows sled's files were"
                   " fsynced before the marker was written, so either a false alarm or a lost sled fsync")
        else:
            why = "did not start"
        pytest.fail(f"{what}: the server {why} after the power cut:\n{e}", pytrace=False)


LOADS = {
    # all kinds of writes; the timed checkpoint comes 10 s after the last one
    "timed": dict(threads=3, mix={"floor": 2, "paths": 4, "asset": 2, "domain": 1, "delete": 1}),
    # batches of 10,000 paths of ~300 bytes: 64 MiB of log bring a checkpoint in ~7 s
    "size": dict(threads=3, mix={"paths": 1}, batch_paths=10000, path_len=300),
}


@pytest.mark.parametrize("window", list(WINDOWS))
@pytest.mark.parametrize("model,load", [("posix", "timed"), ("wal", "size")])
def test_power_cut_inside_a_checkpoint(make_env, model, load, window):
    """A storm of writes; a checkpoint comes under load (timed: after 10 s;
    size: after 64 MiB of log) and the power goes at an exact instant inside
    it (see WINDOWS). Every write answered before that instant must be
    there, and the server must start."""
    w = WINDOWS[window]
    env = model_env(make_env, model)
    srv = settled_env(env)
    led = Ledger()
    led.gate = lambda: not env.fs.frozen()
    env.fs.freeze_after_fsync(w["regex"], 1, w["arm"])
    t0 = time.monotonic()
    s = Storm(env.client(srv), led, seed=sum(map(ord, window)), prefix=f"k{window[:3]}x", **LOADS[load]).start()
    wait_until(env.fs.frozen, 30, f"the power cut in the window {window} of a checkpoint", step=0.02)
    fired_after = time.monotonic() - t0
    want = [(p, p == WAL) for p in w["tail"]]

    def tail():
        after = env.fs.stats()["trigger"]["after"]
        return [(a["path"], a["zero_head"]) for a in after if a["path"] in CHECKPOINT_TAIL]

    # The server goes on (answers heard now are not acknowledgements) until
    # the checkpoint's remaining fsyncs came: its end may write a snapshot
    # first, which takes a while on this filesystem.
    time.sleep(0.5)
    try:
        wait_until(lambda: tail()[:len(want)] == want, 30, "the checkpoint's remaining fsyncs", step=0.05)
    except TimeoutError:
        pass  # reported below, with what came instead
    srv.kill()
    s.stop()
    assert not s.errors, s.errors
    st = env.fs.stats()
    trig = st["trigger"]
    assert st["freezes"] == 1 and trig["fired"] is not None, f"the trigger never fired: {trig}"
    fired = trig["fired"]
    # The freeze landed where it was meant to: the checkpoint's next fsyncs
    # came after it (answered, without effect).
    tail = [(a["path"], a["zero_head"]) for a in trig["after"] if a["path"] in CHECKPOINT_TAIL]
    assert tail[:len(want)] == want, f"the freeze is not in the window {window}: froze after {fired}, then {trig['after']}"
    if window == "log-emptied":
        assert fired["zero_head"], f"froze after a group commit's fdatasync, not the log's reset: {fired}"
    print(f"{model}/{load}/{window}: log file grown to {os.path.getsize(env.data_dir + '/db.wal') >> 20} MiB; froze after {fired['op']} {fired['path']} {fired_after:.1f} s into the storm;"
          f" {led.summary()}; {led.late} answers after the freeze; {trig['after_count']} fsyncs without effect")
    assert led.acks > (20 if load == "timed" else 5), f"only {led.acks} writes acknowledged before the cut"
    lost = env.fs.crash()
    start_or_fail(srv, f"{model}/{load}: cut in a checkpoint, window {window}")
    check(env, env.client(srv), led, lost, f"{model}/{load}: cut in a checkpoint, window {window}")


@pytest.mark.parametrize("model", ["posix", "wal"])
def test_two_power_cuts_in_a_row(make_env, model):
    """Writes live in the log only; the power goes; the restart replays them
    and checkpoints; the power goes again at once. Nothing may be lost."""
    env = model_env(make_env, model)
    srv = settled_env(env)
    led = Ledger()
    s = Storm(env.client(srv), led, threads=4, seed=5, prefix="twox").start()
    time.sleep(2.0)
    lost = env.crash(srv)
    s.stop()
    assert not s.errors, s.errors
    check(env, env.client(srv), led, lost, f"{model}: first cut")
    srv.kill()
    lost = env.fs.crash()
    srv.start()
    check(env, env.client(srv), led, lost, f"{model}: second cut, right after the restart")


@pytest.mark.parametrize("model", ["posix", "wal"])
def test_writes_shown_after_a_kill_survive_a_power_cut(make_env, model):
    """A process killed between writing groups to its log and syncing them
    leaves them in the page cache only (here: the log's syncs stop taking
    effect, the process is killed, and they take effect again, with no power
    cut). A start that reads the index from the snapshot and leaves the
    log's records in the log (the start after a crash, "from snapshot and
    log") shows those groups: it must make them durable before it answers.
    What a client saw after that restart must still be there after a power
    cut that follows, with no write between."""
    env = model_env(make_env, model)
    srv = settled_env(env)
    led = Ledger()
    # The first checkpoint writes the snapshot such starts read.
    s = Storm(env.client(srv), led, threads=2, seed=11, prefix="seedx", mix={"floor": 1}).start()
    time.sleep(0.5)
    wait_for_checkpoint(env, 25, "the first checkpoint (it writes the snapshot)")
    s.stop()
    assert not s.errors, s.errors
    deferred = 0
    for round_ in range(3):
        blogs = [f"k{round_}x{t}g0" for t in range(4)]
        env.fs.freeze_after_fsync(r"^/data/db\.wal$", 1)
        s = Storm(env.client(srv), led, threads=4, seed=40 + round_, prefix=f"k{round_}x", mix={"floor": 1}).start()
        time.sleep(1.0)
        srv.kill()
        s.stop()
        assert env.fs.stats()["frozen_fsync"] > 0, "no sync of the log was left without effect"
        env.fs.thaw()
        srv.start()
        with open(srv.log_path, "rb") as f:
            deferred += b'from="snapshot and log"' in f.read()
        c = env.client(srv)
        seen = {b: getattr(c.get_blog(b), "cache_id", 0) for b in blogs}
        srv.kill()
        lost = env.fs.crash()
        srv.start()
        c = env.client(srv)
        after = {b: getattr(c.get_blog(b), "cache_id", 0) for b in blogs}
        gone = {b: (seen[b], after[b]) for b in blogs if after[b] != seen[b]}
        assert not gone, (f"{model}, round {round_}: what the restart showed (cache id seen, then after the power"
                          f" cut) did not survive: {gone}\n" + report([], lost, led, env))
        check(env, c, led, lost, f"{model}: power cut after a restart that followed a kill, round {round_}")
    assert deferred, "no restart read its index from the snapshot and left the log's records in the log"


# ---- c. uploads in flight -------------------------------------------------------------------

@pytest.mark.parametrize("model", ["posix", "wal"])
def test_uploads_in_flight_at_a_power_cut(make_env, model):
    """Uploads from 4 threads, cut at random moments: acknowledged blobs
    serve their bytes; no blob (acknowledged or not) is corrupt under its name."""
    env = model_env(make_env, model)
    srv = settled_env(env)
    led = Ledger()
    rnd = random.Random(7)
    for round_ in range(4):
        s = Storm(env.client(srv), led, threads=4, seed=100 + round_, prefix=f"c{round_}x",
                  mix={"asset": 1}, asset_sizes=(20_000, 700_000)).start()
        time.sleep(0.8 + rnd.random() * 1.5)
        srv.kill()
        s.stop()
        assert not s.errors, s.errors
        lost = env.fs.crash()
        bad = corrupt_blobs(env.data_dir)
        assert not bad, "blobs whose bytes do not match their name after the power cut:\n" + "\n".join(bad)
        srv.start()
        check(env, env.client(srv), led, lost, f"{model}: uploads, round {round_}")
    assert led.assets, "no upload was acknowledged"
    print(led.summary())


# ---- the very first start -------------------------------------------------------------------

@pytest.mark.parametrize("model", ["posix", "wal"])
def test_power_cut_soon_after_the_first_start(make_env, model):
    """No sync(1) after the install: whatever the server needs on disk (its
    folders, the log, sled's files) it must make durable itself before it
    acknowledges writes."""
    env = model_env(make_env, model)
    srv = env.server()
    c = env.client(srv)
    led = Ledger()
    i = c.invalidate("first")
    led.ack("floor", blog="first", id=i)
    paths = ["/index.html", "/style.css"]
    i = c.invalidate("first", paths)
    led.ack("paths", blog="first", id=i, paths=paths)
    data = b"first bytes " * 1000
    a = c.put_asset("first", "first.bin", data, path="/a/first.bin")
    led.ack("asset", blog="first", url=f"/first/_assets/{a.hash}/first.bin", hash=a.hash, data=data,
            path="/a/first.bin")
    c.set_domain("first.powerloss.example", "first")
    led.ack("domain", blog="first", domain="first.powerloss.example")
    lost = env.crash(srv)
    check(env, env.client(srv), led, lost, f"{model}: first start")


# ---- d. the harness catches a missing fsync ------------------------------------------------

@pytest.mark.parametrize("model", ["posix", "journal", "wal"])
def test_harness_detects_a_log_that_is_not_synced(make_env, model):
    """Self-test: lossyfs ignores the fdatasync of the write-ahead log, which
    is what a server without that sync looks like to a disk. The checks of
    test a must then fail, listing what was lost. No deletions in this
    storm: a blog whose deletion is in flight at the cut is not checked, and
    a deletion (it runs the blob collector) is the slowest write, so now and
    then all four threads were deleting at the cut and nothing was left to
    check."""
    env = make_env(MODELS[model] + ["--ignore-fsync", r"^/data/db\.wal$"])
    srv = settled_env(env)
    led = Ledger()
    mix = {"floor": 3, "paths": 3, "asset": 3, "domain": 1}
    s = Storm(env.client(srv), led, threads=4, seed=99, prefix="dx", mix=mix).start()
    time.sleep(2.0)
    lost = env.crash(srv)
    s.stop()
    print(f"{model}: {s.ops} writes, {led.summary()}, errors: {s.errors}")
    assert not s.errors, s.errors
    assert s.ops > 20, f"the storm made only {s.ops} writes before the cut"
    assert env.fs.stats()["ignored_fsync"] > 0, "no fsync of the log was seen"
    with pytest.raises(pytest.fail.Exception) as failed:
        check(env, env.client(srv), led, lost, f"{model}, log sync ignored")
    print(failed.value)


# ---- h. the purge outbox ------------------------------------------------------------------

@pytest.mark.parametrize("model", ["posix", "wal"])
def test_acknowledged_purges_survive_power_cuts(make_env, model, monkeypatch):
    """Purges wait for an edge that is down (nothing listens on its port):
    those of acknowledged deletions and Purge calls must all still wait after
    a power cut between checkpoints, and after one right after a checkpoint
    moved them from the log into sled."""
    monkeypatch.setenv("BLOTCDN_PURGE_URLS", "http=http://127.0.0.1:9/")
    env = model_env(make_env, model)
    srv = settled_env(env)
    c = env.client(srv)
    pb2 = c.pb2
    want = set()

    def purges(client, n):
        for i in range(n):
            blog = f"p{len(want)}x{i}"
            client.invalidate(blog)
            client.delete_blog(blog)
            want.add(blog)
            client.pub.Purge(pb2.PurgeRequest(blog_id=f"q{len(want)}", keys=[f"q{len(want)}/page"]),
                             timeout=client.timeout)
            want.add(f"q{len(want) - 1}/page")

    def waiting(client):
        queues = client.pub.GetPurges(pb2.GetPurgesRequest(), timeout=client.timeout).queues
        assert len(queues) == 1, queues
        return queues[0].length

    purges(c, 20)
    assert waiting(c) == len(want)
    lost = env.crash(srv)
    c = env.client(srv)
    got = waiting(c)
    assert got == len(want), f"{model}: {got} purge keys wait after the cut, {len(want)} were acknowledged; {lost}"

    # Right after a checkpoint (the log emptied into sled), then the cut.
    purges(c, 10)
    wait_for_checkpoint(env, 30, "a checkpoint")
    lost = env.crash(srv)
    c = env.client(srv)
    got = waiting(c)
    assert got == len(want), f"{model}: {got} purge keys wait after the cut, {len(want)} were acknowledged; {lost}"
