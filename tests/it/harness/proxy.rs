//! A TCP proxy between duplex and a node or the broker that the test can stall (stop
//! forwarding without closing: no FIN, no data, as a dead route or a hung middlebox
//! does) for every connection, only those open now or only new ones, delay (each
//! chunk forwarded late) and cut (close every connection). It runs on a thread of its
//! own, so that it keeps forwarding while the test blocks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Proxy {
    pub port: u16,
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    stalled: AtomicBool,
    /// Bumped by `cut`: connections of an older generation close.
    generation: AtomicU64,
    /// Connections accepted, in order; those numbered below `frozen_below` stall, and
    /// those from `new_frozen_from` on while `new_frozen` holds.
    accepted: AtomicU64,
    frozen_below: AtomicU64,
    new_frozen: AtomicBool,
    new_frozen_from: AtomicU64,
    delay_ms: AtomicU64,
}

impl State {
    fn holds(&self, number: u64) -> bool {
        self.stalled.load(Ordering::SeqCst)
            || number < self.frozen_below.load(Ordering::SeqCst)
            || (self.new_frozen.load(Ordering::SeqCst)
                && number >= self.new_frozen_from.load(Ordering::SeqCst))
    }
}

impl Proxy {
    /// Forwards 127.0.0.1:`port` (returned) to 127.0.0.1:`upstream`.
    pub fn start(upstream: u16) -> Proxy {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let port = std_listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let st = state.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).unwrap();
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    let st = st.clone();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                            return;
                        };
                        let conn = Conn {
                            born: st.generation.load(Ordering::SeqCst),
                            number: st.accepted.fetch_add(1, Ordering::SeqCst),
                            state: st,
                        };
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        tokio::select! {
                            _ = pump(cr, sw, &conn) => {}
                            _ = pump(sr, cw, &conn) => {}
                        }
                    });
                }
            });
        });
        Proxy { port, state }
    }

    /// Stops (`true`) or resumes forwarding on every connection, keeping them open.
    pub fn stall(&self, on: bool) {
        self.state.stalled.store(on, Ordering::SeqCst);
    }

    /// Stops forwarding, for good, on the connections open now; new ones are served.
    pub fn stall_open_connections(&self) {
        let accepted = self.state.accepted.load(Ordering::SeqCst);
        self.state.frozen_below.store(accepted, Ordering::SeqCst);
    }

    /// Stops (`true`) forwarding on the connections accepted from now on, keeping the
    /// open ones going, or resumes (`false`) those.
    pub fn stall_new_connections(&self, on: bool) {
        if on {
            let accepted = self.state.accepted.load(Ordering::SeqCst);
            self.state.new_frozen_from.store(accepted, Ordering::SeqCst);
        }
        self.state.new_frozen.store(on, Ordering::SeqCst);
    }

    /// Forwards each chunk `ms` late, in both directions.
    pub fn delay(&self, ms: u64) {
        self.state.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Closes every open connection; new ones are served.
    pub fn cut(&self) {
        self.state.generation.fetch_add(1, Ordering::SeqCst);
    }
}

/// One proxied connection.
struct Conn {
    state: Arc<State>,
    born: u64,
    number: u64,
}

impl Conn {
    fn is_cut(&self) -> bool {
        self.state.generation.load(Ordering::SeqCst) != self.born
    }

    /// Waits while the connection is held; false once it is cut.
    async fn wait_while_held(&self) -> bool {
        while self.state.holds(self.number) {
            if self.is_cut() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        !self.is_cut()
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    conn: &Conn,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if !conn.wait_while_held().await {
            return;
        }
        let read = tokio::time::timeout(Duration::from_millis(100), from.read(&mut buf)).await;
        if conn.is_cut() {
            return;
        }
        let n = match read {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => n,
        };
        let delay = conn.state.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        // Held, not forwarded, if a stall began while it was read.
        if !conn.wait_while_held().await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
