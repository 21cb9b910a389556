//! An instance metadata service emulator: IMDSv2 only (a session token from
//! `PUT /latest/api/token` is required on every read), serving whatever
//! paths the test gives it. It plays the EC2 instance a test pretends to
//! be; slipway-init's own client talks to it exactly as to the real one.
//!
//! Plain HTTP/1.1 over std threads, one request per connection: enough for
//! a metadata client, small enough to read in one sitting.

use crate::faults::SplitMix64;
use crate::server::Acceptor;
use anyhow::Result;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The session token the emulator hands out and insists on.
pub const TOKEN: &str = "slipway-test-imds-token";

#[derive(Debug, Default)]
struct State {
    paths: Mutex<BTreeMap<String, String>>,
    /// Paths answered only to one client address: on a shared network each
    /// VM sees the instance it plays.
    by_client: Mutex<BTreeMap<IpAddr, BTreeMap<String, String>>>,
    /// Requests to refuse (503) before answering, to exercise retries.
    unavailable_for: AtomicUsize,
    /// Refuse (503) everything until then, as a service that comes up late.
    unavailable_until: Mutex<Option<Instant>>,
    /// Answer this share of requests with 500, picked by the generator.
    server_errors: Mutex<Option<(f64, SplitMix64)>>,
    requests: AtomicUsize,
}

/// A running emulator on a loopback port; stops when dropped.
#[derive(Debug)]
pub struct Imds {
    state: Arc<State>,
    pub endpoint: String,
    _server: Acceptor,
}

impl Imds {
    /// Serves `paths` (e.g. `/latest/user-data`) on a free loopback port.
    pub fn start(paths: impl IntoIterator<Item = (String, String)>) -> Result<Self> {
        Self::serve(TcpListener::bind("127.0.0.1:0")?, paths)
    }

    /// Serves `paths` on a listener the caller bound (inside a test network,
    /// on 169.254.169.254:80).
    pub fn serve(
        listener: TcpListener,
        paths: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self> {
        let state = Arc::new(State {
            paths: Mutex::new(paths.into_iter().collect()),
            ..State::default()
        });
        // A client that hangs up mid-request is its own problem.
        let server = Acceptor::spawn(listener, Arc::clone(&state), serve)?;
        Ok(Self {
            state,
            endpoint: format!("http://{}", server.addr()),
            _server: server,
        })
    }

    /// The usual instance: identity, placement and user data.
    pub fn instance(instance_id: &str, az: &str, user_data: &str) -> Result<Self> {
        Self::start([
            ("/latest/meta-data/instance-id".into(), instance_id.into()),
            (
                "/latest/meta-data/placement/availability-zone".into(),
                az.into(),
            ),
            ("/latest/user-data".into(), user_data.into()),
        ])
    }

    /// Answers the next `n` requests with 503, as a service still starting.
    pub fn unavailable_for(&self, n: usize) {
        self.state.unavailable_for.store(n, Ordering::SeqCst);
    }

    /// Answers every request with 503 until `deadline`, as a metadata
    /// service that comes up late.
    pub fn unavailable_until(&self, deadline: Instant) {
        if let Ok(mut u) = self.state.unavailable_until.lock() {
            *u = Some(deadline);
        }
    }

    /// Answers a `rate` share (0.0 to 1.0) of requests with 500, picked by
    /// a generator seeded with `seed`, as a flaky service.
    pub fn server_errors(&self, rate: f64, seed: u64) {
        if let Ok(mut e) = self.state.server_errors.lock() {
            *e = Some((rate, SplitMix64::new(seed)));
        }
    }

    pub fn set(&self, path: &str, body: &str) {
        if let Ok(mut p) = self.state.paths.lock() {
            p.insert(path.to_owned(), body.to_owned());
        }
    }

    /// Answers `path` with `body` to requests from `client` only.
    pub fn set_for(&self, client: IpAddr, path: &str, body: &str) {
        if let Ok(mut c) = self.state.by_client.lock() {
            c.entry(client)
                .or_default()
                .insert(path.to_owned(), body.to_owned());
        }
    }

    /// Requests seen so far (including refused ones).
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }
}

fn serve(state: &State, stream: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut headers = BTreeMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    state.requests.fetch_add(1, Ordering::SeqCst);
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let refuse = state
        .unavailable_for
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
        || state
            .unavailable_until
            .lock()
            .ok()
            .and_then(|u| *u)
            .is_some_and(|t| Instant::now() < t);
    let flaky = || {
        state
            .server_errors
            .lock()
            .ok()
            .and_then(|mut e| e.as_mut().map(|(rate, rng)| rng.chance(*rate)))
            .unwrap_or(false)
    };
    // The token's lifetime comes back in a header, as AWS's SDKs expect.
    let ttl = headers
        .get("x-aws-ec2-metadata-token-ttl-seconds")
        .cloned()
        .filter(|_| method == "PUT");
    let (status, body) = if refuse {
        ("503 Service Unavailable", String::new())
    } else if flaky() {
        ("500 Internal Server Error", String::new())
    } else if method == "PUT" && path == "/latest/api/token" {
        if headers.contains_key("x-aws-ec2-metadata-token-ttl-seconds") {
            ("200 OK", TOKEN.to_owned())
        } else {
            ("400 Bad Request", String::new())
        }
    } else if headers.get("x-aws-ec2-metadata-token").map(String::as_str) != Some(TOKEN) {
        ("401 Unauthorized", String::new())
    } else if method != "GET" {
        ("405 Method Not Allowed", String::new())
    } else {
        let client = stream.peer_addr().map(|a| a.ip()).ok();
        let own = client.and_then(|c| {
            let by_client = state.by_client.lock().ok()?;
            by_client.get(&c)?.get(path).cloned()
        });
        match own.or_else(|| state.paths.lock().ok().and_then(|p| p.get(path).cloned())) {
            Some(b) => ("200 OK", b),
            None => ("404 Not Found", String::new()),
        }
    };
    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: text/plain\r\n{}Connection: close\r\n\r\n{body}",
        body.len(),
        ttl.map(|t| format!("X-Aws-Ec2-Metadata-Token-Ttl-Seconds: {t}\r\n"))
            .unwrap_or_default()
    )?;
    out.flush()
}
