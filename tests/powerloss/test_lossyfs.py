"""The model of lossyfs itself: what survives a simulated power cut."""

import os

import pytest

import harness


@pytest.fixture
def fs(tmp_path):
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing: lossyfs needs FUSE")
    m = harness.LossyMount(str(tmp_path))
    yield m
    m.close()


def fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fdatasync(path):
    fd = os.open(path, os.O_RDWR)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def read(path):
    with open(path, "rb") as f:
        return f.read()


def test_a_file_never_synced_in_its_directory_vanishes(fs):
    m = fs.path
    write(f"{m}/a", b"x")
    fsync(f"{m}/a")
    lost = fs.crash()
    assert not os.path.exists(f"{m}/a")
    assert lost["lost_names"] == ["/a"]


def test_data_is_durable_only_once_fsynced(fs):
    m = fs.path
    write(f"{m}/f", b"one")
    fdatasync(f"{m}/f")
    fsync(m)
    with open(f"{m}/f", "ab") as f:
        f.write(b" two")
    fs.crash()
    assert read(f"{m}/f") == b"one"
    with open(f"{m}/f", "r+b") as f:
        f.seek(10)
        f.write(b"Z")  # a hole, then a byte
        f.flush()
        os.fdatasync(f.fileno())
    fs.crash()
    assert read(f"{m}/f") == b"one" + bytes(7) + b"Z"


def test_truncate_then_regrow_is_zeros_after_fsync(fs):
    m = fs.path
    write(f"{m}/f", b"abcdefgh")
    fsync(f"{m}/f")
    fsync(m)
    os.truncate(f"{m}/f", 2)
    os.truncate(f"{m}/f", 6)
    fsync(f"{m}/f")
    os.truncate(f"{m}/f", 1)  # not synced
    fs.crash()
    assert read(f"{m}/f") == b"ab" + bytes(4)


def test_rename_reverts_unless_the_directories_are_synced(fs):
    m = fs.path
    write(f"{m}/tmp", b"data")
    fsync(f"{m}/tmp")
    fsync(m)
    os.mkdir(f"{m}/d")
    os.rename(f"{m}/tmp", f"{m}/d/final")
    fs.crash()
    # d itself was never synced in the root: gone; tmp keeps its old name.
    assert sorted(os.listdir(m)) == ["tmp"]

    os.mkdir(f"{m}/d")
    fsync(m)
    os.rename(f"{m}/tmp", f"{m}/d/final")
    fsync(f"{m}/d")
    fs.crash()
    # The new name is durable; the old one was never removed durably.
    assert read(f"{m}/d/final") == b"data"
    assert read(f"{m}/tmp") == b"data"
    assert os.stat(f"{m}/tmp").st_ino == os.stat(f"{m}/d/final").st_ino

    os.unlink(f"{m}/tmp")
    fsync(m)
    fs.crash()
    assert sorted(os.listdir(m)) == ["d"]


def test_rename_over_an_existing_file(fs):
    m = fs.path
    write(f"{m}/cur", b"old")
    fsync(f"{m}/cur")
    write(f"{m}/cur.tmp", b"new")
    fsync(f"{m}/cur.tmp")
    fsync(m)
    os.rename(f"{m}/cur.tmp", f"{m}/cur")
    assert read(f"{m}/cur") == b"new"
    fs.crash()
    assert read(f"{m}/cur") == b"old" and read(f"{m}/cur.tmp") == b"new"
    os.rename(f"{m}/cur.tmp", f"{m}/cur")
    fsync(m)
    fs.crash()
    assert sorted(os.listdir(m)) == ["cur"] and read(f"{m}/cur") == b"new"


def test_links_unlinks_and_open_unlinked_files(fs):
    m = fs.path
    write(f"{m}/a", b"A")
    fsync(f"{m}/a")
    fsync(m)
    os.link(f"{m}/a", f"{m}/b")
    assert os.stat(f"{m}/a").st_nlink == 2
    f = open(f"{m}/b", "r+b")
    os.unlink(f"{m}/b")
    f.write(b"B")
    f.flush()
    f.seek(0)
    assert f.read() == b"B"
    f.close()
    assert read(f"{m}/a") == b"B"
    fs.crash()
    assert os.listdir(m) == ["a"] and read(f"{m}/a") == b"A"


def test_directories_and_sync_all(fs):
    m = fs.path
    os.makedirs(f"{m}/x/y/z")
    write(f"{m}/x/y/z/f", b"1")
    fs.sync()
    os.unlink(f"{m}/x/y/z/f")
    os.rmdir(f"{m}/x/y/z")
    with pytest.raises(OSError):
        os.rmdir(f"{m}/x")
    fs.crash()
    assert read(f"{m}/x/y/z/f") == b"1"


def test_ignored_fsync(tmp_path):
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing: lossyfs needs FUSE")
    fs = harness.LossyMount(str(tmp_path), ["--ignore-fsync", r"\.wal$"])
    try:
        m = fs.path
        for name in ("db.wal", "other"):
            write(f"{m}/{name}", b"")
        fs.sync()
        for name in ("db.wal", "other"):
            write(f"{m}/{name}", b"payload")
            fdatasync(f"{m}/{name}")
        fs.crash()
        assert read(f"{m}/db.wal") == b"" and read(f"{m}/other") == b"payload"
        assert fs.stats()["ignored_fsync"] == 1
    finally:
        fs.close()


def test_journaled_names_and_trust(tmp_path):
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing: lossyfs needs FUSE")
    fs = harness.LossyMount(str(tmp_path), ["--journaled-names", "--trust-at-log-reset", "^/sled/"])
    try:
        m = fs.path
        os.mkdir(f"{m}/sled")
        os.makedirs(f"{m}/cas/ab/cd")
        write(f"{m}/cas/ab/cd/blob", b"blob")
        fsync(f"{m}/cas/ab/cd/blob")  # commits every name so far, but not other files' data
        write(f"{m}/sled/db", b"flushed")
        write(f"{m}/log", b"records")
        fsync(f"{m}/log")
        with open(f"{m}/log", "r+b") as f:  # the log is emptied: sled counts as flushed
            f.write(bytes(4))
            f.flush()
            os.fdatasync(f.fileno())
        write(f"{m}/sled/late", b"not flushed")
        os.mkdir(f"{m}/late")  # after the last fsync: lost
        fs.crash()
        assert sorted(os.listdir(m)) == ["cas", "log", "sled"]
        assert read(f"{m}/cas/ab/cd/blob") == b"blob"
        assert read(f"{m}/sled/db") == b"flushed"
        assert os.listdir(f"{m}/sled") == ["db"]
        assert fs.stats()["zero_head_syncs"] == {"/log": 1}
    finally:
        fs.close()


def test_freeze_after_the_nth_fsync(fs):
    """freeze-after-fsync: the durable state is what it was when the n-th
    matching fsync completed; later fsyncs are answered but change nothing."""
    m = fs.path
    os.mkdir(f"{m}/d")
    write(f"{m}/d/log", b"")
    fs.sync()
    with pytest.raises(RuntimeError):
        fs.freeze_after_fsync(r"^/d/log$", 0)
    t = fs.freeze_after_fsync(r"^/d/log$", 2, r"^/d/$")
    assert t["armed"] is False and t["fired"] is None
    with open(f"{m}/d/log", "r+b") as f:
        f.write(b"one")
        f.flush()
        os.fdatasync(f.fileno())  # before the arming fsync: not counted
        fsync(f"{m}/d")  # arms
        f.write(b" two")
        f.flush()
        os.fdatasync(f.fileno())  # 1st
        assert not fs.frozen()
        f.write(b" three")
        f.flush()
        os.fdatasync(f.fileno())  # 2nd: durable, then frozen
        assert fs.frozen()
        f.write(b" four")
        f.flush()
        os.fdatasync(f.fileno())  # answered, not durable
    write(f"{m}/d/new", b"x")
    fsync(f"{m}/d/new")
    fsync(f"{m}/d")
    st = fs.stats()
    assert st["freezes"] == 1
    fired = st["trigger"]["fired"]
    assert (fired["path"], fired["op"], st["trigger"]["seen"]) == ("/d/log", "fdatasync", 2)
    assert [(a["path"], a["op"]) for a in st["trigger"]["after"]] == [
        ("/d/log", "fdatasync"), ("/d/new", "fsync"), ("/d/", "fsyncdir")]
    assert read(f"{m}/d/log") == b"one two three four"
    fs.crash()
    assert read(f"{m}/d/log") == b"one two three"
    assert os.listdir(f"{m}/d") == ["log"]
    # The power is back: the trigger is gone and fsyncs count again.
    assert not fs.frozen() and fs.stats()["trigger"] is None
    with open(f"{m}/d/log", "ab") as f:
        f.write(b" five")
        f.flush()
        os.fdatasync(f.fileno())
    fs.crash()
    assert read(f"{m}/d/log") == b"one two three five"
