#!/usr/bin/env python3
"""lossyfs: an in-memory FUSE filesystem that forgets what was never synced.

It keeps two states side by side:

* the *visible* state: what processes see now;
* the *durable* state: what a power cut would leave on the disk.

What becomes durable, and when:

* a regular file's data and size: on ``fsync``/``fdatasync`` of that file
  (FUSE ``fsync``; ``fdatasync`` arrives as ``fsync`` with ``datasync=1``);
* a directory's entries (names created by create, mkdir, link, symlink,
  rename-in, and names removed by unlink, rmdir, rename-out or rename-over):
  on ``fsync`` of that directory (FUSE ``fsyncdir``), all of its entries at
  once, and only that directory's: a new directory's own entry in its parent
  needs an fsync of the parent;
* modes, owners and times are not modelled as losable (they follow the inode).

A *crash* throws away everything that is not durable: every directory's
entries become its durable entries, every file's bytes its durable bytes,
and inodes no durable name reaches any more are gone. So a file never
fsynced in its directory vanishes; a file renamed into a directory that was
not fsynced gets its old name back (and, if only the new directory was
fsynced, it answers to both names, like a hard link: a rename is two
directory updates here, each made durable by its own directory's fsync).

Control: a unix socket (``--control PATH``), one command per connection,
one line in, one JSON line out:

* ``crash``: unmount (lazily), drop everything not durable, mount again;
  answers with what was lost. Kill the processes using the mount first.
* ``sync``: make everything durable, like sync(1) on a healthy machine.
* ``stats``: counters (fsyncs by path, bytes written, fsyncs that made a
  zeroed file head durable (how the server empties its log), ...).
* ``quit``: unmount and exit.
* ``freeze-after-fsync REGEX N [ARM_REGEX]``: a power cut at an exact
  instant of the program's sequence. When the N-th fsync/fdatasync/fsyncdir
  whose path matches REGEX completes (counted from this command; with
  ARM_REGEX, counted only after a later fsync matching ARM_REGEX, which
  itself does not count), the durable state freezes: every fsync after it is
  acknowledged to the caller but makes nothing durable. Kill the program and
  ``crash`` afterwards, and the disk is as a power cut at that instant left
  it. A directory's path is matched with a trailing ``/`` (``^/data/db/$``),
  a file's without (``^/data/db\.wal$``); regexes cannot hold spaces. One
  trigger at a time (a new one replaces it); ``crash`` clears it.
  ``stats`` reports it under ``trigger`` (``fired``: the fsync it froze
  after; ``after``: the first fsyncs acknowledged without effect), and
  ``freezes`` counts the triggers that fired.
* ``thaw``: the trigger goes, and fsyncs take effect again, without a power
  cut: what was written while frozen is still there, not durable until the
  next fsync of its file. With a kill before it, this is a program that
  died after writing but before its syncs reached the disk, on a machine
  that kept running (its page cache holds the writes).
* ``frozen``: whether the durable state is frozen now (cheap: a test asks
  it after each acknowledgement, to know whether the acknowledged write was
  made durable before the freeze).

Fault injection: ``--ignore-fsync REGEX`` makes fsync of matching files a
no-op, which is what a program that forgot that fsync looks like to a disk.

Gentler models, to isolate one component's promise from another's:
``--journaled-names`` makes every namespace change durable, in order, at
the next fsync or fsyncdir of anything (a metadata journal, as ext4 and XFS
have in practice); ``--trust-at-log-reset REGEX`` makes the files and
directories at matching paths durable whenever a file's zeroed head is
synced, which is how blotcdn ends a checkpoint (sled flushed, then its log
emptied): it takes sled's flush on trust, which on Linux is only
sync_file_range and never reaches FUSE.

Usage: lossyfs.py MOUNTPOINT --control SOCKET [--log FILE]
"""

import argparse
import errno
import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time
import traceback

try:
    from fuse import FUSE, FuseOSError, Operations
except ImportError as e:  # pragma: no cover - reported to the caller
    sys.stderr.write(f"lossyfs: cannot import fusepy ({e}); install the 'fusepy' pip package and libfuse2\n")
    sys.exit(3)


def now_ns():
    return time.time_ns()


class Inode:
    __slots__ = (
        "ino", "mode", "uid", "gid", "atime", "mtime", "ctime", "nlink", "opens", "dlinks",
        # regular files
        "data", "ddata", "dirty",
        # directories
        "entries", "dentries",
        # symbolic links
        "target",
    )

    def __init__(self, ino, mode, uid=0, gid=0):
        self.ino = ino
        self.mode = mode
        self.uid, self.gid = uid, gid
        t = now_ns()
        self.atime = self.mtime = self.ctime = t
        self.nlink = 0  # visible names
        self.opens = 0  # open handles
        self.dlinks = 0  # durable names (from any directory's durable entries)
        self.data = self.ddata = self.dirty = None
        self.entries = self.dentries = None
        self.target = None
        if stat.S_ISREG(mode):
            self.data = bytearray()
            self.ddata = bytearray()
            self.dirty = []  # [start, end) ranges written since the last fsync
        elif stat.S_ISDIR(mode):
            self.entries = {}
            self.dentries = {}

    def is_dir(self):
        return self.entries is not None

    def is_file(self):
        return self.data is not None

    def mark(self, start, end):
        """Records that [start, end) changed since the last fsync."""
        if start >= end:
            return
        d = self.dirty
        if d:
            last = d[-1]
            # The common case: appends and rewrites next to the last write.
            if start <= last[1] and end >= last[0]:
                last[0] = min(last[0], start)
                last[1] = max(last[1], end)
                return
        d.append([start, end])
        if len(d) > 256:
            d.sort()
            merged = [d[0]]
            for s, e in d[1:]:
                if s <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], e)
                else:
                    merged.append([s, e])
            self.dirty = merged

    def sync_data(self):
        """fsync: the visible bytes and size become the durable ones."""
        data, dd = self.data, self.ddata
        n = len(data)
        for s, e in self.dirty:
            e = min(e, n)
            if s >= e:
                continue
            if len(dd) < s:
                dd.extend(bytes(s - len(dd)))
            dd[s:e] = data[s:e]
        if len(dd) > n:
            del dd[n:]
        elif len(dd) < n:  # cannot happen when every change was marked; be safe
            dd.extend(data[len(dd):])
        self.dirty = []


class FreezeTrigger:
    """``freeze-after-fsync``: the N-th fsync matching `pattern` (after one
    matching `arm`, if given) freezes the durable state."""

    def __init__(self, pattern, n, arm=None):
        self.source = (pattern, n, arm)
        self.pattern = re.compile(pattern)
        self.n = n
        self.arm = re.compile(arm) if arm else None
        self.armed = self.arm is None
        self.seen = 0  # matching fsyncs since armed
        self.fired = None  # the fsync the durable state froze after
        self.after = []  # the first fsyncs acknowledged while frozen
        self.after_count = 0

    def describe(self):
        pattern, n, arm = self.source
        return {"regex": pattern, "n": n, "arm": arm, "armed": self.armed, "seen": self.seen,
                "fired": self.fired, "after": list(self.after), "after_count": self.after_count}


class LossyFS(Operations):
    use_ns = True
    # Not provided, so that the kernel keeps POSIX locks local (flock is
    # always local with libfuse2): sled's lock on its db file just works.
    lock = None
    bmap = None
    # Reads, writes, fsync and getattr on a file that is open but unlinked
    # come with no path; the handle says which inode.
    flag_nullpath_ok = True

    def __init__(self, log=None, ignore_fsync=None, journaled_names=False, trust=None):
        self.mu = threading.RLock()
        self.journaled_names = journaled_names
        self.trust = re.compile(trust) if trust else None
        self.dirty_dirs = set()  # directories whose entries changed since their last sync
        self.ignore_fsync = re.compile(ignore_fsync) if ignore_fsync else None
        self.trigger = None  # a FreezeTrigger, or None
        self.fsync_by_path = {}
        # A write of zeros at offset 0 then an fsync: how blotcdn's log is
        # emptied after a checkpoint. Counted so tests can cut right after one.
        self.zero_head = set()
        self.zero_head_syncs = {}
        self.zero_head_writes = {}
        self.inodes = {}
        self.next_ino = 1
        self.handles = {}
        self.next_fh = 1
        self.log = log
        self.mounted = threading.Event()
        self.counts = {
            "fsync": 0, "fdatasync": 0, "fsyncdir": 0, "writes": 0, "bytes_written": 0,
            "crashes": 0, "syncs": 0, "ignored_fsync": 0, "freezes": 0, "frozen_fsync": 0,
        }
        root = self._new(stat.S_IFDIR | 0o755)
        root.nlink = 1
        root.dlinks = 1  # the root is always there
        assert root.ino == 1

    # ---- helpers -------------------------------------------------------

    def _new(self, mode):
        ino = self.next_ino
        self.next_ino += 1
        node = Inode(ino, mode)
        self.inodes[ino] = node
        return node

    def _lookup(self, path):
        node = self.inodes[1]
        for part in path.split("/"):
            if not part:
                continue
            if not node.is_dir():
                raise FuseOSError(errno.ENOTDIR)
            ino = node.entries.get(part)
            if ino is None:
                raise FuseOSError(errno.ENOENT)
            node = self.inodes[ino]
        return node

    def _parent(self, path):
        head, _, name = path.rstrip("/").rpartition("/")
        if not name:
            raise FuseOSError(errno.EINVAL)
        parent = self._lookup(head)
        if not parent.is_dir():
            raise FuseOSError(errno.ENOTDIR)
        if len(name.encode()) > 255:
            raise FuseOSError(errno.ENAMETOOLONG)
        return parent, name

    def _node(self, path, fh):
        if fh is not None and fh in self.handles:
            return self.inodes[self.handles[fh]]
        return self._lookup(path)

    def _maybe_free(self, node):
        if node.ino != 1 and node.nlink == 0 and node.opens == 0 and node.dlinks == 0 and not node.is_dir():
            self.inodes.pop(node.ino, None)

    def _unlink_entry(self, parent, name):
        ino = parent.entries.pop(name)
        self.dirty_dirs.add(parent.ino)
        node = self.inodes[ino]
        node.nlink -= 1
        node.ctime = now_ns()
        parent.mtime = parent.ctime = now_ns()
        self._maybe_free(node)

    def _link_entry(self, parent, name, node):
        parent.entries[name] = node.ino
        self.dirty_dirs.add(parent.ino)
        node.nlink += 1
        parent.mtime = parent.ctime = now_ns()

    def _sync_dir(self, node):
        old, new = node.dentries, dict(node.entries)
        for name, ino in old.items():
            if new.get(name) != ino:
                other = self.inodes.get(ino)
                if other is not None:
                    other.dlinks -= 1
                    self._maybe_free(other)
        for name, ino in new.items():
            if old.get(name) != ino:
                self.inodes[ino].dlinks += 1
        node.dentries = new
        self.dirty_dirs.discard(node.ino)

    def _commit_names(self):
        """--journaled-names: every namespace change so far becomes durable."""
        for ino in list(self.dirty_dirs):
            node = self.inodes.get(ino)
            if node is not None and node.is_dir():
                self._sync_dir(node)
        self.dirty_dirs.clear()

    def _trusted(self, path):
        return self.trust is not None and path is not None and self.trust.search(path) is not None

    def _names_changed(self, parent, path):
        pass

    def _sync_trusted(self):
        """--trust-at-log-reset: the trusted files and directories become durable."""
        for ino, path in self._paths("entries").items():
            node = self.inodes[ino]
            if node.is_dir() and self._trusted(path + "/"):
                self._sync_dir(node)
            elif node.is_file() and self._trusted(path):
                node.sync_data()

    def frozen(self):
        t = self.trigger
        return t is not None and t.fired is not None

    def _synced(self, key, kind, zero_head):
        """Called once an fsync took effect: counts it for the trigger."""
        t = self.trigger
        if t is None or t.fired is not None or key is None:
            return
        if not t.armed:
            if t.arm.search(key):
                t.armed = True
            return
        if t.pattern.search(key):
            t.seen += 1
            if t.seen == t.n:
                t.fired = {"path": key, "op": kind, "zero_head": zero_head, "time": time.time()}
                self.counts["freezes"] += 1

    def _frozen_sync(self, key, kind, zero_head):
        """An fsync after the freeze: acknowledged, nothing made durable."""
        t = self.trigger
        t.after_count += 1
        if len(t.after) < 50:
            t.after.append({"path": key, "op": kind, "zero_head": zero_head})
        self.counts["frozen_fsync"] += 1
        return 0

    # ---- control -------------------------------------------------------

    def _paths(self, which):
        """Maps ino -> one path, walking the visible or the durable entries."""
        out = {1: ""}
        todo = [1]
        while todo:
            d = self.inodes[todo.pop()]
            for name, ino in getattr(d, which).items():
                if ino in out or ino not in self.inodes:
                    continue
                out[ino] = out[d.ino] + "/" + name
                if self.inodes[ino].is_dir():
                    todo.append(ino)
        return out

    def crash(self):
        """Drops everything not durable; returns a summary of what was lost."""
        with self.mu:
            vis = self._paths("entries")
            lost_names, lost_data = [], []
            for ino, node in self.inodes.items():
                if node.is_dir() and ino in vis:
                    for name, target in node.entries.items():
                        if node.dentries.get(name) != target:
                            lost_names.append(vis[ino] + "/" + name)
                elif node.is_file() and ino in vis and node.dirty:
                    changed = sum(e - s for s, e in node.dirty)
                    lost_data.append({"path": vis[ino], "size": len(node.data), "durable_size": len(node.ddata),
                                      "unsynced_bytes": changed})
            for node in self.inodes.values():
                if node.is_dir():
                    node.entries = dict(node.dentries)
                elif node.is_file():
                    node.data = bytearray(node.ddata)
                    node.dirty = []
                node.opens = 0
            self.handles.clear()
            self.dirty_dirs.clear()
            self.trigger = None  # the power is back: nothing is frozen any more
            # Keep only what durable names reach; recount the links.
            reach = self._paths("dentries")
            self.inodes = {ino: n for ino, n in self.inodes.items() if ino in reach}
            for node in self.inodes.values():
                node.nlink = node.dlinks = 0
            for node in self.inodes.values():
                if node.is_dir():
                    for ino in node.entries.values():
                        self.inodes[ino].nlink += 1
                        self.inodes[ino].dlinks += 1
            self.inodes[1].nlink = self.inodes[1].dlinks = 1
            self.counts["crashes"] += 1
            return {"lost_names": sorted(lost_names), "lost_data": sorted(lost_data, key=lambda x: x["path"])}

    def sync_all(self):
        with self.mu:
            for node in list(self.inodes.values()):
                if node.is_dir():
                    self._sync_dir(node)
                elif node.is_file():
                    node.sync_data()
            self.counts["syncs"] += 1

    def stats(self):
        with self.mu:
            out = dict(self.counts)
            out["inodes"] = len(self.inodes)
            out["fsync_by_path"] = dict(self.fsync_by_path)
            out["zero_head_syncs"] = dict(self.zero_head_syncs)
            out["zero_head_writes"] = dict(self.zero_head_writes)
            out["trigger"] = self.trigger.describe() if self.trigger is not None else None
            out["bytes_held"] = sum(len(n.data) + len(n.ddata) for n in self.inodes.values() if n.is_file())
            return out

    # ---- FUSE operations -----------------------------------------------

    def init(self, path):
        self.mounted.set()

    def destroy(self, path):
        self.mounted.clear()

    def getattr(self, path, fh=None):
        with self.mu:
            n = self._node(path, fh)
            if n.is_file():
                size = len(n.data)
            elif n.is_dir():
                size = 4096
            else:
                size = len(n.target.encode())
            nlink = n.nlink
            if n.is_dir():
                nlink = 2 + sum(1 for i in n.entries.values() if self.inodes[i].is_dir())
            return {
                "st_ino": n.ino, "st_mode": n.mode, "st_nlink": nlink, "st_uid": n.uid, "st_gid": n.gid,
                "st_size": size, "st_blocks": (size + 511) // 512, "st_blksize": 4096,
                "st_atime": n.atime, "st_mtime": n.mtime, "st_ctime": n.ctime,
            }

    def access(self, path, amode):
        with self.mu:
            self._lookup(path)
        return 0

    def statfs(self, path):
        return {"f_bsize": 4096, "f_frsize": 4096, "f_blocks": 1 << 24, "f_bfree": 1 << 23,
                "f_bavail": 1 << 23, "f_files": 1 << 20, "f_ffree": 1 << 19, "f_favail": 1 << 19,
                "f_namemax": 255}

    def readdir(self, path, fh):
        with self.mu:
            n = self._lookup(path)
            if not n.is_dir():
                raise FuseOSError(errno.ENOTDIR)
            return [".", ".."] + list(n.entries)

    def opendir(self, path):
        with self.mu:
            if not self._lookup(path).is_dir():
                raise FuseOSError(errno.ENOTDIR)
        return 0

    def releasedir(self, path, fh):
        return 0

    def fsyncdir(self, path, datasync, fh):
        with self.mu:
            n = self._lookup(path)
            key = path.rstrip("/") + "/"
            if self.frozen():
                return self._frozen_sync(key, "fsyncdir", False)
            self._sync_dir(n)
            if self.journaled_names:
                self._commit_names()
            self.counts["fsyncdir"] += 1
            self._synced(key, "fsyncdir", False)
        return 0

    def mkdir(self, path, mode):
        with self.mu:
            parent, name = self._parent(path)
            if name in parent.entries:
                raise FuseOSError(errno.EEXIST)
            self._link_entry(parent, name, self._new(stat.S_IFDIR | (mode & 0o7777)))
            self._names_changed(parent, path)
        return 0

    def rmdir(self, path):
        with self.mu:
            parent, name = self._parent(path)
            ino = parent.entries.get(name)
            if ino is None:
                raise FuseOSError(errno.ENOENT)
            n = self.inodes[ino]
            if not n.is_dir():
                raise FuseOSError(errno.ENOTDIR)
            if n.entries:
                raise FuseOSError(errno.ENOTEMPTY)
            self._unlink_entry(parent, name)
            self._names_changed(parent, path)
        return 0

    def mknod(self, path, mode, dev):
        if not stat.S_ISREG(mode):
            raise FuseOSError(errno.EPERM)
        with self.mu:
            parent, name = self._parent(path)
            if name in parent.entries:
                raise FuseOSError(errno.EEXIST)
            self._link_entry(parent, name, self._new(mode))
            self._names_changed(parent, path)
        return 0

    def create(self, path, mode, fi=None):
        with self.mu:
            parent, name = self._parent(path)
            if name in parent.entries:
                n = self.inodes[parent.entries[name]]
                if n.is_dir():
                    raise FuseOSError(errno.EISDIR)
            else:
                n = self._new(stat.S_IFREG | (mode & 0o7777))
                self._link_entry(parent, name, n)
                self._names_changed(parent, path)
            return self._open_handle(n)

    def _open_handle(self, n):
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = n.ino
        n.opens += 1
        return fh

    def open(self, path, flags):
        with self.mu:
            n = self._lookup(path)
            if n.is_file() and flags & os.O_TRUNC and (flags & os.O_ACCMODE) != os.O_RDONLY:
                self._truncate(n, 0)
            return self._open_handle(n)

    def release(self, path, fh):
        with self.mu:
            ino = self.handles.pop(fh, None)
            n = self.inodes.get(ino) if ino is not None else None
            if n is not None:
                n.opens -= 1
                self._maybe_free(n)
        return 0

    def flush(self, path, fh):
        return 0

    def read(self, path, size, offset, fh):
        with self.mu:
            n = self._node(path, fh)
            if not n.is_file():
                raise FuseOSError(errno.EISDIR)
            return bytes(n.data[offset:offset + size])

    def write(self, path, data, offset, fh):
        with self.mu:
            n = self._node(path, fh)
            if not n.is_file():
                raise FuseOSError(errno.EISDIR)
            buf = n.data
            old = len(buf)
            if offset > old:
                buf.extend(bytes(offset - old))
            buf[offset:offset + len(data)] = data
            n.mark(min(offset, old), offset + len(data))
            if offset == 0 and data.count(0) == len(data):
                self.zero_head.add(n.ino)
                if path:
                    self.zero_head_writes[path] = self.zero_head_writes.get(path, 0) + 1
            n.mtime = n.ctime = now_ns()
            self.counts["writes"] += 1
            self.counts["bytes_written"] += len(data)
            return len(data)

    def _truncate(self, n, length):
        if not n.is_file():
            raise FuseOSError(errno.EISDIR)
        old = len(n.data)
        if length < old:
            del n.data[length:]
        elif length > old:
            n.data.extend(bytes(length - old))
        n.mark(min(old, length), max(old, length))
        n.mtime = n.ctime = now_ns()

    def truncate(self, path, length, fh=None):
        with self.mu:
            n = self._node(path, fh)
            self._truncate(n, length)
        return 0

    def fsync(self, path, datasync, fh):
        with self.mu:
            n = self._node(path, fh)
            if self.ignore_fsync is not None and path and self.ignore_fsync.search(path):
                # Fault injection: as if the caller had not made this fsync.
                self.counts["ignored_fsync"] += 1
                return 0
            kind = "fdatasync" if datasync else "fsync"
            key = (path.rstrip("/") + "/" if n.is_dir() else path) if path else None
            zero_head = n.ino in self.zero_head
            if self.frozen():
                return self._frozen_sync(key, kind, zero_head)
            if path:
                self.fsync_by_path[path] = self.fsync_by_path.get(path, 0) + 1
            if n.is_file():
                n.sync_data()
                if zero_head:
                    self.zero_head.discard(n.ino)
                    if path:
                        self.zero_head_syncs[path] = self.zero_head_syncs.get(path, 0) + 1
                    if self.trust is not None:
                        self._sync_trusted()
            elif n.is_dir():
                self._sync_dir(n)
            if self.journaled_names:
                self._commit_names()
            self.counts[kind] += 1
            self._synced(key, kind, zero_head)
        return 0

    def unlink(self, path):
        with self.mu:
            parent, name = self._parent(path)
            ino = parent.entries.get(name)
            if ino is None:
                raise FuseOSError(errno.ENOENT)
            if self.inodes[ino].is_dir():
                raise FuseOSError(errno.EISDIR)
            self._unlink_entry(parent, name)
            self._names_changed(parent, path)
        return 0

    def rename(self, old, new):
        with self.mu:
            op, oname = self._parent(old)
            np, nname = self._parent(new)
            ino = op.entries.get(oname)
            if ino is None:
                raise FuseOSError(errno.ENOENT)
            src = self.inodes[ino]
            # A directory cannot move below itself.
            if src.is_dir():
                paths = self._paths("entries")
                where, moved = paths.get(np.ino, ""), paths.get(ino, "")
                if np.ino == ino or where.startswith(moved + "/"):
                    raise FuseOSError(errno.EINVAL)
            existing = np.entries.get(nname)
            if existing == ino:
                return 0
            if existing is not None:
                dst = self.inodes[existing]
                if dst.is_dir():
                    if not src.is_dir():
                        raise FuseOSError(errno.EISDIR)
                    if dst.entries:
                        raise FuseOSError(errno.ENOTEMPTY)
                elif src.is_dir():
                    raise FuseOSError(errno.ENOTDIR)
                self._unlink_entry(np, nname)
            op.entries.pop(oname)
            self.dirty_dirs.add(op.ino)
            src.nlink -= 1
            op.mtime = op.ctime = now_ns()
            self._link_entry(np, nname, src)
            src.ctime = now_ns()
            self._names_changed(op, old)
            self._names_changed(np, new)
        return 0

    def link(self, target, source):
        # fusepy: creates `target` as a new name of the existing `source`.
        with self.mu:
            n = self._lookup(source)
            if n.is_dir():
                raise FuseOSError(errno.EPERM)
            parent, name = self._parent(target)
            if name in parent.entries:
                raise FuseOSError(errno.EEXIST)
            self._link_entry(parent, name, n)
            n.ctime = now_ns()
            self._names_changed(parent, target)
        return 0

    def symlink(self, target, source):
        # fusepy: creates `target` as a symbolic link whose content is `source`.
        with self.mu:
            parent, name = self._parent(target)
            if name in parent.entries:
                raise FuseOSError(errno.EEXIST)
            n = self._new(stat.S_IFLNK | 0o777)
            n.target = source
            self._link_entry(parent, name, n)
            self._names_changed(parent, target)
        return 0

    def readlink(self, path):
        with self.mu:
            n = self._lookup(path)
            if n.target is None:
                raise FuseOSError(errno.EINVAL)
            return n.target

    def chmod(self, path, mode):
        with self.mu:
            n = self._lookup(path)
            n.mode = (n.mode & ~0o7777) | (mode & 0o7777)
            n.ctime = now_ns()
        return 0

    def chown(self, path, uid, gid):
        with self.mu:
            n = self._lookup(path)
            if uid != -1 and uid != 0xFFFFFFFF:
                n.uid = uid
            if gid != -1 and gid != 0xFFFFFFFF:
                n.gid = gid
            n.ctime = now_ns()
        return 0

    def utimens(self, path, times=None):
        with self.mu:
            n = self._lookup(path)
            if times is None:
                t = now_ns()
                times = (t, t)
            n.atime, n.mtime = int(times[0]), int(times[1])
            n.ctime = now_ns()
        return 0

    def getxattr(self, path, name, position=0):
        raise FuseOSError(errno.ENODATA)

    def listxattr(self, path):
        return []


# ---- process: mount loop and control socket -----------------------------

def unmount(mountpoint):
    """Lazily unmounts; tries the usual tools in turn."""
    for cmd in (["fusermount", "-u", "-z", mountpoint], ["fusermount3", "-u", "-z", mountpoint],
                ["umount", "-l", mountpoint]):
        try:
            r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=20)
        except (FileNotFoundError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            return True
    return False


class Server:
    def __init__(self, fs, mountpoint, control, log):
        self.fs = fs
        self.mountpoint = mountpoint
        self.control = control
        self.log = log
        self.want_crash = False
        self.quit = False
        self.last_crash = None
        self.remounted = threading.Event()

    def say(self, msg):
        if self.log:
            self.log.write(time.strftime("%H:%M:%S ") + msg + "\n")
            self.log.flush()

    def serve_control(self):
        try:
            os.unlink(self.control)
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(self.control)
        s.listen(8)
        while True:
            conn, _ = s.accept()
            try:
                with conn:
                    f = conn.makefile("rwb")
                    cmd = f.readline().decode().strip()
                    reply = self.handle(cmd)
                    f.write((json.dumps(reply) + "\n").encode())
                    f.flush()
            except Exception:  # keep serving
                self.say("control error: " + traceback.format_exc())
            if self.quit:
                return

    def handle(self, cmd):
        self.say("control: " + cmd)
        if cmd == "ping":
            return {"ok": True, "mounted": self.fs.mounted.is_set()}
        if cmd == "stats":
            return {"ok": True, "stats": self.fs.stats()}
        if cmd == "sync":
            self.fs.sync_all()
            return {"ok": True}
        if cmd == "frozen":
            return {"ok": True, "frozen": self.fs.frozen()}
        if cmd == "thaw":
            with self.fs.mu:
                self.fs.trigger = None
            return {"ok": True}
        if cmd.startswith("freeze-after-fsync"):
            parts = cmd.split()
            if len(parts) not in (3, 4) or not parts[2].isdigit() or int(parts[2]) < 1:
                return {"ok": False, "error": "usage: freeze-after-fsync REGEX N [ARM_REGEX] (N >= 1)"}
            try:
                t = FreezeTrigger(parts[1], int(parts[2]), parts[3] if len(parts) == 4 else None)
            except re.error as e:
                return {"ok": False, "error": f"bad regex: {e}"}
            with self.fs.mu:
                self.fs.trigger = t
            return {"ok": True, "trigger": t.describe()}
        if cmd == "crash":
            self.remounted.clear()
            self.want_crash = True
            if not unmount(self.mountpoint):
                return {"ok": False, "error": "unmount failed"}
            if not self.remounted.wait(60):
                return {"ok": False, "error": "not mounted again within 60 s"}
            return {"ok": True, "lost": self.last_crash}
        if cmd == "quit":
            self.quit = True
            unmount(self.mountpoint)
            return {"ok": True}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def run(self):
        threading.Thread(target=self.serve_control, daemon=True).start()
        opts = dict(foreground=True, nothreads=False, fsname="lossyfs", subtype="lossyfs",
                    hard_remove=True, use_ino=True, big_writes=True, max_write=131072, max_read=131072)
        while True:
            self.fs.mounted.clear()
            self.say("mounting " + self.mountpoint)
            # The FUSE call returns once the mount is gone.
            threading.Thread(target=self._announce, daemon=True).start()
            FUSE(self.fs, self.mountpoint, **opts)
            self.say("unmounted")
            if self.quit:
                return
            if self.want_crash:
                self.want_crash = False
                self.last_crash = self.fs.crash()
                self.say("crash: lost " + json.dumps(self.last_crash))
            else:
                self.say("unmounted from outside; exiting")
                return

    def _announce(self):
        if self.fs.mounted.wait(60):
            self.remounted.set()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mountpoint")
    ap.add_argument("--control", required=True, help="unix socket for crash/sync/stats/quit")
    ap.add_argument("--log", help="append a log of control commands and crashes here")
    ap.add_argument("--ignore-fsync", metavar="REGEX",
                    help="fault injection: fsync/fdatasync of files whose path matches does nothing")
    ap.add_argument("--journaled-names", action="store_true",
                    help="namespace changes become durable all together, in order, at any fsync or fsyncdir"
                         " (a metadata journal, as on ext4 or XFS); the default needs each directory's own fsync")
    ap.add_argument("--trust-at-log-reset", metavar="REGEX",
                    help="files and directories (path + '/') that match become durable whenever a file's zeroed"
                         " head is synced: blotcdn's checkpoint; takes sled's flush (sync_file_range) on trust")
    a = ap.parse_args()
    log = open(a.log, "a") if a.log else None
    fs = LossyFS(log, a.ignore_fsync, a.journaled_names, a.trust_at_log_reset)
    Server(fs, os.path.abspath(a.mountpoint), a.control, log).run()


if __name__ == "__main__":
    main()
