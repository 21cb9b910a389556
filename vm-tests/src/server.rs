//! The accept loop the test's own services share (the metadata emulator,
//! the fault proxy): one thread per connection, until the handle drops.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Serves a listener in the background; stops accepting when dropped.
#[derive(Debug)]
pub struct Acceptor {
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
}

impl Acceptor {
    /// Hands every connection on `listener` to `handle` with `state`, each
    /// on its own thread. A connection that fails (a client or upstream
    /// hanging up) fails only itself.
    pub fn spawn<S: Send + Sync + 'static>(
        listener: TcpListener,
        state: Arc<S>,
        handle: fn(&S, TcpStream) -> std::io::Result<()>,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(s) = stream {
                    let st = Arc::clone(&state);
                    std::thread::spawn(move || {
                        let _ = handle(&st, s);
                    });
                }
            }
        });
        Ok(Self { stop, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}
