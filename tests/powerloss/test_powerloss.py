"""Power-loss tests: the real server on lossyfs, which forgets on a simulated
power cut whatever was not fsynced (file data) or dir-fsynced (names).

Every test checks the same promise: what the server acknowledged is there
after the power comes back (see harness.Ledger.check for the list)."""

import os
import random
import time

import pytest

from harness import Ledger, Storm, content_hash, corrupt_blobs, wait_until

WAL = "/data/db.wal"


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
        lines += [f"  data: {d['path']}: {d['unsynced_bytes']} unsynced bytes (size {d['size']},"
                  f" durable size {d['durable_size']})" for d in data[:20]]
    if env is not None:
        for s in env.servers:
            lines.append(f"server log ({s.log_path}), tail:\n{s.log_tail(1500)}")
    return "\n".join(lines)


def check(env, client, ledger, lost, context):
    problems = ledger.check(client, context)
    assert not problems, report(problems, lost, ledger, env)


def settled_env(env):
    """A server that has run once with everything it created on disk, as on
    a machine that has been up for a while (sync(1)); the power cut comes later."""
    srv = env.server()
    env.fs.sync()
    return srv


def checkpoints(env):
    """How many times sled's files were fsynced (each checkpoint flushes sled)."""
    by = env.fs.stats()["fsync_by_path"]
    return sum(n for p, n in by.items() if p.startswith("/data/db/"))


def wal_syncs(env):
    return env.fs.stats()["fsync_by_path"].get(WAL, 0)


def wal_reset(env):
    """True when the log's first record slot is empty (just after a checkpoint)."""
    try:
        with open(env.data_dir + "/db.wal", "rb") as f:
            return f.read(8) == bytes(8)
    except OSError:
        return False


# ---- a. a storm of writes, then a power cut -------------------------------------------

def test_storm_of_writes_survives_a_power_cut(env):
    srv = settled_env(env)
    led = Ledger()
    for round_ in range(2):
        c = env.client(srv)
        storm = Storm(c, led, threads=4, seed=10 + round_, prefix=f"a{round_}x").start()
        time.sleep(3.0)
        lost = env.crash(srv)
        storm.stop()
        assert not storm.errors, storm.errors
        assert storm.ops > 20, f"the storm made only {storm.ops} writes before the cut"
        check(env, env.client(srv), led, lost, f"round {round_}")
    print(led.summary())


# ---- b. crash windows around checkpoints -------------------------------------------------

def test_power_cuts_around_checkpoints(env):
    srv = settled_env(env)
    led = Ledger()

    def storm(tag, **kw):
        return Storm(env.client(srv), led, threads=2, seed=hash(tag) % 1000, prefix=f"b{tag}x",
                     mix={"floor": 2, "paths": 4, "asset": 2, "domain": 1, "delete": 1}, **kw).start()

    # 1. Writes for more than 10 s: a timed checkpoint starts while writes go
    #    on; the power goes as soon as sled's flush reaches the disk.
    s = storm("timed")
    base = checkpoints(env)
    wait_until(lambda: checkpoints(env) > base, 25, "a timed checkpoint under load", step=0.005)
    lost = env.crash(srv)
    s.stop()
    assert not s.errors, s.errors
    check(env, env.client(srv), led, lost, "cut during a timed checkpoint")

    # 2. Between checkpoints: everything lives in the log only.
    s = storm("between")
    time.sleep(2.0)
    lost = env.crash(srv)
    s.stop()
    assert not s.errors, s.errors
    check(env, env.client(srv), led, lost, "cut between checkpoints")

    # 3. Big batches (10,000 paths of ~100 bytes a call) past the 64 MiB of
    #    log that force a checkpoint; the cut comes right after it is done.
    s = storm("big", batch_paths=10000)
    base = checkpoints(env)
    wait_until(lambda: checkpoints(env) > base, 60, "a checkpoint after 64 MiB of log", step=0.005)
    # The store thread checkpoints between groups: the next sync of the log
    # is the reset that ends the checkpoint.
    resets = wal_syncs(env)
    wait_until(lambda: wal_syncs(env) > resets, 20, "the log reset", step=0.002)
    lost = env.crash(srv)
    s.stop()
    assert not s.errors, s.errors
    check(env, env.client(srv), led, lost, "cut right after a size checkpoint")

    # 4. An idle checkpoint: writes stop, sled is flushed after 10 s of quiet
    #    and the log emptied; the power goes right after that.
    s = storm("idle")
    time.sleep(1.0)
    s.stop()
    base = checkpoints(env)
    wait_until(lambda: checkpoints(env) > base, 25, "an idle checkpoint", step=0.01)
    wait_until(lambda: wal_reset(env), 10, "the log reset after the idle checkpoint", step=0.002)
    lost = env.crash(srv)
    assert not s.errors, s.errors
    check(env, env.client(srv), led, lost, "cut right after an idle checkpoint")
    print(led.summary())


# ---- c. uploads in flight -------------------------------------------------------------------

def test_uploads_in_flight_at_a_power_cut(env):
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
        check(env, env.client(srv), led, lost, f"uploads, round {round_}")
    assert led.assets, "no upload was acknowledged"
    print(led.summary())


# ---- the very first start -------------------------------------------------------------------

def test_power_cut_soon_after_the_first_start(env):
    """No sync(1) after the install: whatever the server needs on disk (its
    folders, the log, sled's files) it must have made durable itself before
    it acknowledges writes."""
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
    led.ack("asset", blog="first", url="/first/_assets/%s/first.bin" % a.hash, hash=a.hash, data=data,
            path="/a/first.bin")
    c.set_domain("first.powerloss.example", "first")
    led.ack("domain", blog="first", domain="first.powerloss.example")
    srv.kill()
    lost = env.fs.crash()
    try:
        srv.start()
    except Exception as e:  # a server that cannot start has lost everything
        pytest.fail(report([f"the server does not start after the power cut: {e}"], lost, led))
    check(env, env.client(srv), led, lost, "first start")


# ---- d. the harness catches a missing fsync ------------------------------------------------

def test_harness_detects_a_log_that_is_not_synced(make_env):
    """Self-test: lossyfs ignores the fdatasync of the write-ahead log, which
    is what a server without that sync looks like to a disk. The same checks
    as in test a must then find lost acknowledged writes."""
    env = make_env(["--ignore-fsync", r"\.wal$"])
    srv = settled_env(env)
    led = Ledger()
    s = Storm(env.client(srv), led, threads=4, seed=99, prefix="dx").start()
    time.sleep(2.0)
    lost = env.crash(srv)
    s.stop()
    problems = led.check(env.client(srv), "log sync ignored")
    print(report(problems, lost, led))
    assert env.fs.stats()["ignored_fsync"] > 0, "no fsync of the log was seen"
    assert problems, "the harness did not notice that acknowledged writes were never synced"
