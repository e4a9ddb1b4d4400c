//! Accepting connections for the gRPC and metrics listeners (the HTTP
//! origin has its own loop, `Origin::serve_on`): at most so many open at
//! once, and a connection that sends nothing at all within a deadline is
//! closed, so silent clients cannot take every descriptor.
//!
//! tonic's own `TcpIncoming` has neither, and on an accept error such as
//! EMFILE it polls `accept` again at once, spinning a core for as long as
//! the descriptors are gone.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;
use futures_util::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Like nginx's (511) and unlike std's (128): past the cap, this many
/// connections wait in the kernel for a slot before new ones are refused.
pub const BACKLOG: u32 = 1024;

/// A listener on `addr` with a backlog of [`BACKLOG`]; `shared`: other
/// listeners may bind the same address (`SO_REUSEPORT`, the origin's
/// threads).
pub fn bind(addr: std::net::SocketAddr, shared: bool) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    if shared {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// The connections of one listener: each holds a slot until it closes.
/// With every slot taken, nothing is accepted: new connections wait in the
/// kernel's listen backlog. `lifetime`: past it, a connection's reads and
/// writes fail, whatever it is doing (on gRPC: the age at which it was sent
/// GOAWAY plus the grace its calls had to finish). `conns`: where each
/// connection is listed, for whoever may cut one ([`Conn::cut`]).
pub fn incoming(
    listener: TcpListener,
    max: usize,
    first_bytes: Duration,
    needed: usize,
    lifetime: Option<Duration>,
    conns: Option<Arc<Conns>>,
    what: &'static str,
) -> impl Stream<Item = io::Result<Guarded>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(max));
    futures_util::stream::unfold((listener, slots), move |(listener, slots)| {
        let conns = conns.clone();
        async move {
            let permit = slots.clone().acquire_owned().await.expect("never closed");
            let (stream, peer) = loop {
                match listener.accept().await {
                    Ok(s) => break s,
                    Err(e) => accept_failed(e, what).await,
                }
            };
            // Small answers must not wait for a delayed ACK (Nagle): 40 ms otherwise.
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY not set");
            }
            let deadline = Some(Box::pin(tokio::time::sleep(first_bytes)));
            let end = lifetime.map(|l| Box::pin(tokio::time::sleep(l)));
            let conn = Arc::new(Conn::new(peer));
            if let Some(conns) = &conns {
                conns.add(&conn);
            }
            let guarded = Guarded { stream, _slot: permit, first_bytes: deadline, needed, end, conn };
            Some((Ok(guarded), (listener, slots)))
        }
    })
}

/// The connections of a listener, listed for whoever may have to cut one
/// (the gRPC memory budget: a connection whose answers are not taken).
#[derive(Default)]
pub struct Conns(Mutex<Vec<Weak<Conn>>>);

impl Conns {
    fn add(&self, conn: &Arc<Conn>) {
        let mut list = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Closed ones go before the list would grow: it stays within about
        // twice the connections open.
        if list.len() == list.capacity() {
            list.retain(|c| c.strong_count() > 0);
        }
        list.push(Arc::downgrade(conn));
    }

    /// Each connection still open.
    pub fn each(&self, mut f: impl FnMut(&Conn)) {
        let list: Vec<Arc<Conn>> =
            self.0.lock().unwrap_or_else(|p| p.into_inner()).iter().filter_map(Weak::upgrade).collect();
        list.iter().for_each(|c| f(c));
    }
}

/// One connection, as its calls see it (in their requests' extensions, by
/// way of [`ConnInfo`]): the answers it holds unsent and since when, and a
/// way to cut it.
pub struct Conn {
    pub peer: std::net::SocketAddr,
    cut: AtomicBool,
    /// Woken when the connection is cut, to fail its next read or write.
    waker: AtomicWaker,
    answers: Mutex<Answers>,
}

/// When each answer held was ready: slots, reused.
#[derive(Default)]
struct Answers {
    ready: Vec<Option<Instant>>,
    free: Vec<usize>,
}

impl Conn {
    fn new(peer: std::net::SocketAddr) -> Self {
        Conn { peer, cut: AtomicBool::new(false), waker: AtomicWaker::new(), answers: Mutex::default() }
    }

    /// An answer is ready to send: held until [`Conn::answer_gone`] with the
    /// slot this returns.
    pub fn answer_ready(&self) -> usize {
        let mut a = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        let now = Some(Instant::now());
        match a.free.pop() {
            Some(slot) => {
                a.ready[slot] = now;
                slot
            }
            None => {
                a.ready.push(now);
                a.ready.len() - 1
            }
        }
    }

    /// The answer in `slot` was sent whole, or dropped.
    pub fn answer_gone(&self, slot: usize) {
        let mut a = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        a.ready[slot] = None;
        a.free.push(slot);
    }

    /// How long the oldest answer held has waited to be taken.
    pub fn oldest_answer(&self) -> Option<Duration> {
        let a = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        a.ready.iter().flatten().min().map(|t| t.elapsed())
    }

    /// Fails the connection's next read or write (at once if it waits for
    /// one): its calls end and what they held is dropped.
    pub fn cut(&self) {
        self.cut.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn is_cut(&self, cx: &Context<'_>) -> bool {
        if self.cut.load(Ordering::Acquire) {
            return true;
        }
        self.waker.register(cx.waker());
        // Cut between the look and the registration: its wake may be lost.
        self.cut.load(Ordering::Acquire)
    }
}

/// What a gRPC call knows of its connection (`Request::extensions`).
#[derive(Clone)]
pub struct ConnInfo {
    pub tcp: tonic::transport::server::TcpConnectInfo,
    pub conn: Arc<Conn>,
}

/// The process's (EMFILE) or the system's (ENFILE) descriptors are all in
/// use: a passing shortage, to be answered as such (RESOURCE_EXHAUSTED, 503),
/// never as the server's fault.
pub fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// After a failed `accept`: out of descriptors or memory, waits 50 ms
/// (the error would come back at once: a spin); anything else is one
/// connection's trouble (reset before it was taken), and the next is taken
/// at once. Warns at most once a second.
pub async fn accept_failed(e: io::Error, listener: &'static str) {
    static WARNED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    if crate::telemetry::once_a_second(&WARNED) {
        tracing::warn!(error = %e, listener, "accept failed");
    }
    if out_of_descriptors(&e) || matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::ENOMEM)) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An accepted connection holding its slot. Reading fails with `TimedOut`
/// if the peer has not sent `needed` bytes by the deadline; after them the
/// protocol's own timers take over (on gRPC, hyper's HTTP/2 handshake and
/// then its keep-alive pings, which start only once the 24-byte preface is
/// in, so a part of one would otherwise hold the slot forever; on metrics,
/// the header read timeout, from the first byte).
pub struct Guarded {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    first_bytes: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Bytes still to come before the deadline no longer applies.
    needed: usize,
    /// When the connection is cut, busy or not.
    end: Option<Pin<Box<tokio::time::Sleep>>>,
    conn: Arc<Conn>,
}

impl Guarded {
    /// Past its lifetime: polled while waiting to read, so the timer wakes
    /// an idle connection; elsewhere the deadline is compared with the
    /// clock (a busy connection may never wait).
    fn over(&mut self, cx: Option<&mut Context<'_>>) -> bool {
        match (self.end.as_mut(), cx) {
            (None, _) => false,
            (Some(end), Some(cx)) => end.as_mut().poll(cx).is_ready(),
            (Some(end), None) => end.deadline() <= tokio::time::Instant::now(),
        }
    }

    /// Past its lifetime (by the clock), or cut: what every read and write
    /// fails with from then on.
    fn ended(&mut self) -> Option<io::Error> {
        if self.over(None) {
            return Some(outlived());
        }
        self.conn.cut.load(Ordering::Acquire).then(was_cut)
    }
}

fn outlived() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "the connection outlived its age and grace")
}

fn was_cut() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionAborted, "the connection was cut: its answers were not taken")
}

/// The client's connection preface of HTTP/2, which gRPC speaks.
pub const H2_PREFACE: usize = 24;

impl AsyncRead for Guarded {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.ended() {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.stream).poll_read(cx, buf);
        match r {
            Poll::Pending if self.over(Some(cx)) => Poll::Ready(Err(outlived())),
            Poll::Pending if self.conn.is_cut(cx) => Poll::Ready(Err(was_cut())),
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                self.needed = self.needed.saturating_sub(buf.filled().len() - before);
                if self.needed == 0 {
                    self.first_bytes = None;
                }
                r
            }
            Poll::Pending => match self.first_bytes.as_mut().map(|d| d.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the client sent nothing before the deadline",
                ))),
                _ => Poll::Pending,
            },
            r => r,
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if let Some(e) = self.ended() {
            return Poll::Ready(Err(e));
        }
        match Pin::new(&mut self.stream).poll_write(cx, buf) {
            Poll::Pending if self.conn.is_cut(cx) => Poll::Ready(Err(was_cut())),
            r => r,
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.ended() {
            return Poll::Ready(Err(e));
        }
        match Pin::new(&mut self.stream).poll_write_vectored(cx, bufs) {
            Poll::Pending if self.conn.is_cut(cx) => Poll::Ready(Err(was_cut())),
            r => r,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Guarded {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo { tcp: self.stream.connect_info(), conn: self.conn.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A silent client, or one that sent less than it must, is closed at
    /// the deadline and its slot freed for the next; one that talks is not.
    #[tokio::test]
    async fn silent_connections_are_closed_and_free_their_slot() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut conns = Box::pin(incoming(listener, 1, Duration::from_millis(300), 2, None, None, "test"));
        let mut short = TcpStream::connect(addr).await.unwrap();
        short.write_all(b"P").await.unwrap();
        let mut first = conns.next().await.unwrap().unwrap();
        // The only slot is taken: the next connection is not accepted yet.
        let mut talker = TcpStream::connect(addr).await.unwrap();
        assert!(tokio::time::timeout(Duration::from_millis(100), conns.next()).await.is_err(), "accepted past the cap");
        let mut buf = [0u8; 8];
        assert_eq!(first.read(&mut buf).await.unwrap(), 1);
        let err = tokio::time::timeout(Duration::from_secs(5), first.read(&mut buf)).await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(first);
        // Its slot went to the waiting connection, which talks and is kept
        // past the deadline.
        let mut second = tokio::time::timeout(Duration::from_secs(5), conns.next()).await.unwrap().unwrap().unwrap();
        talker.write_all(b"hi").await.unwrap();
        assert_eq!(second.read(&mut buf).await.unwrap(), 2);
        tokio::time::sleep(Duration::from_millis(500)).await;
        talker.write_all(b"again").await.unwrap();
        assert_eq!(second.read(&mut buf).await.unwrap(), 5);
    }

    /// Past its lifetime a connection fails whether it waits to read or
    /// keeps talking, and its slot goes to the next.
    #[tokio::test]
    async fn a_connection_is_cut_at_the_end_of_its_lifetime_busy_or_idle() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let life = Duration::from_millis(400);
        let mut conns = Box::pin(incoming(listener, 1, Duration::from_secs(5), 1, Some(life), None, "test"));
        // Idle: waiting to read, woken by the deadline.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"x").await.unwrap();
        let mut first = conns.next().await.unwrap().unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(first.read(&mut buf).await.unwrap(), 1);
        let err = tokio::time::timeout(Duration::from_secs(5), first.read(&mut buf)).await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        drop(first);
        // Busy: the peer never stops sending, so reads never wait; writes fail too.
        let mut busy = TcpStream::connect(addr).await.unwrap();
        let mut second = tokio::time::timeout(Duration::from_secs(5), conns.next()).await.unwrap().unwrap().unwrap();
        let talk = tokio::spawn(async move { while busy.write_all(&[7u8; 4096]).await.is_ok() {} });
        let started = tokio::time::Instant::now();
        let err = loop {
            match second.read(&mut buf).await {
                Ok(0) => panic!("the peer closed first"),
                Ok(_) => assert!(started.elapsed() < Duration::from_secs(10), "still reading after 10 s"),
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(second.write(b"late").await.unwrap_err().kind(), io::ErrorKind::TimedOut);
        drop(second);
        talk.abort();
        drop(idle);
    }
}
