//! The origin's connections: one thread per core, each with its own
//! runtime and listener, as nginx's workers.

use std::convert::Infallible;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::{splice, Origin};

/// The most a request's head may take (hyper's smallest setting is 8 KiB):
/// an edge's requests carry a few hundred bytes of headers; nginx's default
/// allows 32 KiB.
const MAX_HEAD: usize = 32 << 10;

impl Origin {
    /// Serves HTTP/1.1 until `stop` turns true, then lets open requests
    /// finish. Like nginx's workers: one thread per core, each with its own
    /// single-threaded runtime and its own listener on the same address
    /// (`SO_REUSEPORT`, the kernel spreading connections), so a request is
    /// read, answered and written on one thread, with no hand-off between
    /// threads (on this machine those wake-ups cost more than the request).
    pub async fn serve(self: Arc<Self>, listener: TcpListener, stop: tokio::sync::watch::Receiver<bool>) {
        let threads = self.threads;
        if threads == 0 {
            // On the shared multi-threaded runtime, with gRPC.
            return self.serve_on(listener, stop).await;
        }
        let addr = listener.local_addr().expect("bound");
        let mut listeners = vec![listener.into_std().expect("a tokio listener")];
        for _ in 1..threads {
            match crate::listen::bind(addr, true).and_then(|l| l.into_std()) {
                Ok(l) => listeners.push(l),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot add an origin thread's listener; fewer threads");
                    break;
                }
            }
        }
        let mut done = Vec::new();
        for (i, l) in listeners.into_iter().enumerate() {
            let (this, stop) = (self.clone(), stop.clone());
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let blocking = (512 / threads).max(16);
            let slice = self.slice;
            let spawned = std::thread::Builder::new().name(format!("blotcdn-http-{i}")).spawn(move || {
                if let Some(slice) = slice {
                    match super::slice::ask(slice) {
                        Ok(super::slice::Slice::Taken) => tracing::debug!(?slice, "origin thread's scheduler slice"),
                        Ok(super::slice::Slice::NotTaken) => tracing::debug!(
                            "the kernel keeps its own slice for the origin threads (before Linux 6.12, or not on the fair scheduler)"
                        ),
                        Err(e) => tracing::info!(error = %e, "cannot set the origin threads' scheduler slice"),
                    }
                }
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    // The blocking pool (file reads, hashing) runs longer at
                    // a time: the kernel's slice, not this thread's.
                    .on_thread_start(move || {
                        if slice.is_some() {
                            let _ = super::slice::reset();
                        }
                    })
                    .max_blocking_threads(blocking)
                    .build();
                let rt = match rt {
                    Ok(rt) => rt,
                    // Out of descriptors or threads: this thread serves
                    // nothing, the others go on (said, not a panic).
                    Err(e) => {
                        tracing::error!(error = %e, "cannot start an origin thread's runtime; fewer threads");
                        return;
                    }
                };
                rt.block_on(async move {
                    match TcpListener::from_std(l) {
                        Ok(l) => this.serve_on(l, stop).await,
                        Err(e) => tracing::error!(error = %e, "origin listener lost"),
                    }
                });
                let _ = tx.send(());
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start an origin thread");
                continue;
            }
            done.push(rx);
        }
        for rx in done {
            let _ = rx.await;
        }
    }

    /// Accepts connections on one listener until `stop` turns true.
    async fn serve_on(self: Arc<Self>, listener: TcpListener, mut stop: tokio::sync::watch::Receiver<bool>) {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(hyper_util::rt::TokioTimer::new());
        // A slow or idle client (keep-alive included: the timer runs while
        // hyper waits for the next request's head) may not hold a connection
        // slot forever.
        builder.header_read_timeout(self.idle_timeout);
        // What a request's head may take (past it: 431), and hyper takes a
        // body's next chunk while less than this is queued (one large file's
        // chunk at a time per connection; its default, 400 KiB, is three).
        // A head a byte short of 128 KiB, never finished, held 290 KB of a
        // connection for its 30 s: 10,000 connections, 2.9 GB.
        builder.max_buf_size(MAX_HEAD);
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        crate::listen::accept_failed(e, "http").await;
                        continue;
                    }
                },
                _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            };
            // A response's last segment leaves at once, not when the
            // previous one is acknowledged (Nagle): like nginx's
            // `tcp_nodelay`. Measured here: 1 MiB answers cost a quarter
            // less CPU, 50 KiB ones a tenth.
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY not set");
            }
            // At the cap, this thread stops accepting (one connection, the
            // one just taken, waits for a slot; the rest wait in the listen
            // backlog), and the descriptors kept in reserve stay free for
            // files, uploads and the store. Accepting first means an idle
            // thread holds no slot.
            let permit = tokio::select! {
                p = self.connections.clone().acquire_owned() => p.expect("never closed"),
                _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            };
            {
                {
                    let this = self.clone();
                    let svc = hyper::service::service_fn(move |req| {
                        let this = this.clone();
                        async move { Ok::<_, Infallible>(this.handle(req).await) }
                    });
                    let conn = graceful.watch(
                        builder
                            .serve_connection(TokioIo::new(splice::SpliceStream::new(stream, self.idle_timeout)), svc),
                    );
                    tokio::spawn(async move {
                        let _ = conn.await;
                        drop(permit);
                    });
                }
            }
        }
        drop(listener);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(30), graceful.shutdown()).await;
    }
}
