//! A real etcd cluster (Debian's `etcd-server`) on 127.0.0.1 for the cluster
//! tests: members on free ports with data dirs in a temporary folder, killed
//! and restarted one by one, all stopped on drop.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct EtcdCluster {
    pub dir: tempfile::TempDir,
    members: Vec<Member>,
    /// Flags given to every member.
    extra: Vec<String>,
}

struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<Child>,
}

impl EtcdCluster {
    /// `n` members, healthy when this returns.
    pub fn start(n: usize) -> EtcdCluster {
        Self::start_with(n, &[])
    }

    /// With `extra` flags for each member.
    pub fn start_with(n: usize, extra: &[&str]) -> EtcdCluster {
        for attempt in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let members: Vec<Member> = (0..n)
                .map(|i| Member {
                    name: format!("m{i}"),
                    client: super::free_port(),
                    peer: super::free_port(),
                    child: None,
                })
                .collect();
            let mut c = EtcdCluster { dir, members, extra: extra.iter().map(|s| s.to_string()).collect() };
            for i in 0..n {
                c.spawn(i, "new");
            }
            if c.wait_healthy(Duration::from_secs(20)) {
                return c;
            }
            eprintln!("etcd cluster did not become healthy (attempt {attempt}); trying other ports");
        }
        panic!("etcd did not start; run ./scripts/install-test-deps.sh (etcd-server)");
    }

    fn spawn(&mut self, i: usize, state: &str) {
        let cluster: Vec<String> =
            self.members.iter().map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer)).collect();
        let m = &self.members[i];
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", m.name))).unwrap();
        let child = Command::new("etcd")
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(self.dir.path().join(&m.name))
            .args(["--listen-client-urls", &format!("http://127.0.0.1:{}", m.client)])
            .args(["--advertise-client-urls", &format!("http://127.0.0.1:{}", m.client)])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{}", m.peer)])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{}", m.peer)])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-state", state, "--initial-cluster-token", "blotcdn-test"])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start etcd ({e}); run ./scripts/install-test-deps.sh"));
        self.members[i].child = Some(child);
    }

    /// Every member answers `/health` with true.
    pub fn wait_healthy(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let up = self.members.iter().filter(|m| m.child.is_some()).all(|m| {
                let addr: SocketAddr = ([127, 0, 0, 1], m.client).into();
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                    && String::from_utf8_lossy(&super::get(addr, "/health", &[]).body).contains("\"health\":\"true\"")
            });
            if up {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// The client URLs, comma-separated (`BLOTCDN_ETCD_ENDPOINTS`).
    pub fn endpoints(&self) -> String {
        self.members.iter().map(|m| format!("http://127.0.0.1:{}", m.client)).collect::<Vec<_>>().join(",")
    }

    /// A POST of `json` to member `i`'s HTTP gateway (`/v3/...`): its answer.
    pub fn post(&self, i: usize, path: &str, json: &str) -> String {
        let addr: SocketAddr = ([127, 0, 0, 1], self.members[i].client).into();
        let req = format!(
            "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{json}",
            json.len()
        );
        let r = super::raw_request(addr, req.as_bytes());
        assert_eq!(r.status, 200, "{path}: {}", String::from_utf8_lossy(&r.body));
        String::from_utf8_lossy(&r.body).into_owned()
    }

    /// Member `i`'s data dir.
    pub fn member_dir(&self, i: usize) -> std::path::PathBuf {
        self.dir.path().join(&self.members[i].name)
    }

    /// The client URL of member `i` alone.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client)
    }

    /// The member that is the leader now (from each member's `/metrics`).
    pub fn leader(&self) -> Option<usize> {
        self.members.iter().position(|m| {
            m.child.is_some()
                && String::from_utf8_lossy(&super::get(([127, 0, 0, 1], m.client).into(), "/metrics", &[]).body)
                    .lines()
                    .any(|l| l.trim() == "etcd_server_is_leader 1")
        })
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops member `i` where it is (SIGSTOP): it still takes connections,
    /// and answers nothing, as a member in a long pause or on a stalled
    /// disk does.
    pub fn pause(&self, i: usize) {
        self.signal(i, libc::SIGSTOP);
    }

    pub fn resume(&self, i: usize) {
        self.signal(i, libc::SIGCONT);
    }

    fn signal(&self, i: usize, sig: i32) {
        let pid = self.members[i].child.as_ref().expect("a running member").id();
        assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
    }

    /// The flags each member is started with from now on.
    pub fn set_extra(&mut self, extra: &[&str]) {
        self.extra = extra.iter().map(|s| s.to_string()).collect();
    }

    /// Starts member `i` again on its data dir.
    pub fn restart(&mut self, i: usize) {
        self.spawn(i, "existing");
    }

    pub fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    pub fn restart_all(&mut self) {
        for i in 0..self.members.len() {
            self.restart(i);
        }
        assert!(self.wait_healthy(Duration::from_secs(30)), "etcd did not come back");
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.kill_all();
    }
}
