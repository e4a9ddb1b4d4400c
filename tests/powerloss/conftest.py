import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402


@pytest.fixture(scope="session")
def stubs(tmp_path_factory):
    return harness.generate_stubs(str(tmp_path_factory.mktemp("stubs")))


@pytest.fixture(scope="session")
def fuse_ok():
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is missing: the power-loss tests need FUSE")
    try:
        import fuse  # noqa: F401
    except (ImportError, EnvironmentError) as e:
        pytest.fail(f"fusepy or libfuse2 missing ({e}); run scripts/install-test-deps.sh")
    binary = harness.server_binary()
    if not os.access(binary, os.X_OK):
        pytest.fail(f"server binary {binary} missing: build it (cargo build) or set BLOTCDN_BIN")


class Env:
    """A lossy mount, servers whose data dir is on it, clients; all cleaned up."""

    def __init__(self, workdir, stubs, fs_args=()):
        self.workdir = workdir
        self.stubs = stubs
        self.fs = harness.LossyMount(workdir, fs_args)
        self.data_dir = os.path.join(self.fs.path, "data")
        self.servers = []
        self.clients = []

    def server(self):
        s = harness.Server(self.data_dir, self.workdir)
        self.servers.append(s)
        return s.start()

    def client(self, server):
        c = harness.Client(*self.stubs, server)
        self.clients.append(c)
        return c

    def crash(self, server):
        """Power cut: the server dies with kill -9, the filesystem drops what
        was not synced, and the server starts again on what is left."""
        server.kill()
        lost = self.fs.crash()
        server.start()
        return lost

    def close(self):
        for c in self.clients:
            c.close()
        for s in self.servers:
            s.kill()
        self.fs.close()


@pytest.fixture
def make_env(fuse_ok, stubs, tmp_path):
    envs = []

    def make(fs_args=()):
        d = tmp_path / f"env{len(envs)}"
        d.mkdir()
        e = Env(str(d), stubs, fs_args)
        envs.append(e)
        return e

    yield make
    for e in envs:
        e.close()


@pytest.fixture
def env(make_env):
    return make_env()
