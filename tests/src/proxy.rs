//! A TCP proxy on loopback for the fault suites: forwards every connection to a target
//! address, counts the bytes the target sends back, and can cut every open connection at once
//! (both directions shut: the peer sees a connection closed in the middle of a request or a
//! response, as when a load balancer or a NAT drops it).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running proxy (it lives as long as the test process).
#[derive(Clone)]
pub struct Proxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    /// Bytes the target sent back through the proxy (response bodies and their headers).
    from_target: AtomicU64,
    /// Both ends of every open connection, by connection number.
    open: Mutex<BTreeMap<u64, (TcpStream, TcpStream)>>,
    /// The next connection's number.
    next: AtomicU64,
    /// Connections cut by [`Proxy::abort_all`].
    aborted: AtomicU64,
    /// The most bytes per second the target may send back (0: no limit).
    rate: AtomicU64,
}

impl Proxy {
    /// Starts a proxy on 127.0.0.1 (a free port) in front of `target` (`host:port`).
    pub fn start(target: &str) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = l.local_addr().expect("proxy address");
        let shared = Arc::new(Shared {
            from_target: AtomicU64::new(0),
            open: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(0),
            aborted: AtomicU64::new(0),
            rate: AtomicU64::new(0),
        });
        let (s, target) = (shared.clone(), target.to_string());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { continue };
                // the target down: the client sees its connection closed at once
                let Ok(t) = TcpStream::connect(&target) else {
                    let _ = c.shutdown(Shutdown::Both);
                    continue;
                };
                splice(c, t, &s);
            }
        });
        Proxy { addr, shared }
    }

    /// `http://ADDR`, the URL to give clients instead of the target's.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Bytes the target has sent back through this proxy so far.
    pub fn bytes_from_target(&self) -> u64 {
        self.shared.from_target.load(Ordering::SeqCst)
    }

    /// Cuts every connection open now; returns how many there were. New connections are
    /// accepted as before.
    pub fn abort_all(&self) -> usize {
        let open = std::mem::take(&mut *lock(&self.shared.open));
        for (c, t) in open.values() {
            let _ = c.shutdown(Shutdown::Both);
            let _ = t.shutdown(Shutdown::Both);
        }
        self.shared
            .aborted
            .fetch_add(open.len() as u64, Ordering::SeqCst);
        open.len()
    }

    /// Limits what the target sends back to `bytes_per_sec` for each connection (0: no limit),
    /// to make a small job last long enough for faults to land in the middle of it.
    pub fn throttle(&self, bytes_per_sec: u64) {
        self.shared.rate.store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Connections cut by [`Proxy::abort_all`] so far.
    pub fn aborted(&self) -> u64 {
        self.shared.aborted.load(Ordering::SeqCst)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Copies `c` to `t` and `t` back to `c` on two threads, counting what `t` sends.
fn splice(c: TcpStream, t: TcpStream, s: &Arc<Shared>) {
    let (Ok(c2), Ok(t2), Ok(c3), Ok(t3)) =
        (c.try_clone(), t.try_clone(), c.try_clone(), t.try_clone())
    else {
        return;
    };
    let id = s.next.fetch_add(1, Ordering::SeqCst);
    lock(&s.open).insert(id, (c3, t3));
    std::thread::spawn(move || pump(c, t, None));
    let s = s.clone();
    std::thread::spawn(move || {
        pump(t2, c2, Some(&s));
        // the response side ended: the connection is over (or cut); forget it
        lock(&s.open).remove(&id);
    });
}

/// Copies `from` to `to` until either ends, then closes `to`'s writing half. With `back`
/// (the target's direction) the bytes are counted and held to the rate limit.
fn pump(mut from: TcpStream, mut to: TcpStream, back: Option<&Shared>) {
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(k) = from.read(&mut buf) {
        if k == 0 || to.write_all(&buf[..k]).is_err() {
            break;
        }
        if let Some(s) = back {
            s.from_target.fetch_add(k as u64, Ordering::SeqCst);
            let rate = s.rate.load(Ordering::SeqCst);
            if rate > 0 {
                std::thread::sleep(Duration::from_secs_f64(k as f64 / rate as f64));
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
