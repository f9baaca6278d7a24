//! A TCP proxy between duplex and a node or the broker that the test can stall (stop
//! forwarding without closing: no FIN, no data, as a dead route or a hung middlebox
//! does) and cut (close every connection). It runs on a thread of its own, so that it
//! keeps forwarding while the test blocks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Proxy {
    pub port: u16,
    stalled: Arc<AtomicBool>,
    /// Bumped by `cut`: connections of an older generation close.
    generation: Arc<AtomicU64>,
}

impl Proxy {
    /// Forwards 127.0.0.1:`port` (returned) to 127.0.0.1:`upstream`.
    pub fn start(upstream: u16) -> Proxy {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let port = std_listener.local_addr().unwrap().port();
        let stalled = Arc::new(AtomicBool::new(false));
        let generation = Arc::new(AtomicU64::new(0));
        let (s, g) = (stalled.clone(), generation.clone());
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
                    let (s, g) = (s.clone(), g.clone());
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                            return;
                        };
                        let born = g.load(Ordering::SeqCst);
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        tokio::select! {
                            _ = pump(cr, sw, s.clone(), g.clone(), born) => {}
                            _ = pump(sr, cw, s, g, born) => {}
                        }
                    });
                }
            });
        });
        Proxy {
            port,
            stalled,
            generation,
        }
    }

    /// Stops (`true`) or resumes forwarding on every connection, keeping them open.
    pub fn stall(&self, on: bool) {
        self.stalled.store(on, Ordering::SeqCst);
    }

    /// Closes every open connection; new ones are served.
    pub fn cut(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    stalled: Arc<AtomicBool>,
    generation: Arc<AtomicU64>,
    born: u64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while stalled.load(Ordering::SeqCst) {
            if generation.load(Ordering::SeqCst) != born {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let read = tokio::time::timeout(Duration::from_millis(100), from.read(&mut buf)).await;
        if generation.load(Ordering::SeqCst) != born {
            return;
        }
        match read {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => {
                // Held, not forwarded, if a stall began while it was read.
                while stalled.load(Ordering::SeqCst) {
                    if generation.load(Ordering::SeqCst) != born {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
