//! A fault-injecting HTTP proxy for AWS API calls. It sits between the code
//! under test (an SDK client given the proxy's endpoint URL) and moto, and
//! answers a chosen share of requests with throttling, server errors,
//! connection resets or delays, in the shapes the real services use, so a
//! test can prove that a boot survives them. Injected errors never reach
//! moto: they have no side effects.
//!
//! Plain HTTP/1.1 over std threads, one request per connection (every
//! answer carries `Connection: close`), like [`crate::imds`]. S3 requests
//! are recognised in path style only (`force_path_style(true)`).

use crate::server::Acceptor;
use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Longest request head accepted (request line and headers).
const MAX_HEAD: usize = 1 << 20;
/// Largest request body accepted.
const MAX_BODY: u64 = 1 << 30;
/// How long a client or moto may keep a connection silent.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

/// A fault to inject into one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The service's throttling error: EC2 `RequestLimitExceeded` (503),
    /// S3 `SlowDown` (503), `Throttling` (400) for the other query-protocol
    /// services, `ThrottlingException` (400) for JSON-protocol ones.
    Throttle,
    /// HTTP 500 with the service's internal-error shape.
    ServerError,
    /// Reads the request, then resets the connection without an answer.
    Reset,
    /// Waits this long, then forwards the request.
    Delay(Duration),
}

/// Which requests get a fault, and which faults.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Share of requests (0.0 to 1.0) that get a fault.
    pub rate: f64,
    /// Seeds the generator that picks the requests and the kinds.
    pub seed: u64,
    /// The faults to pick from, uniformly; empty means [`Kind::Throttle`].
    pub kinds: Vec<Kind>,
    /// (service, action) pairs that always get a fault, whatever `rate`
    /// says; `*` matches any service or action.
    pub always: Vec<(String, String)>,
    /// The first request of every (service, action) gets a fault, so a
    /// test can show every action the code makes survived one.
    pub first_of_each: bool,
}

impl Plan {
    /// Forwards everything untouched.
    pub fn passthrough() -> Self {
        Self::default()
    }

    /// One of `kinds` in a `rate` share of all requests.
    pub fn random(rate: f64, seed: u64, kinds: impl IntoIterator<Item = Kind>) -> Self {
        Self {
            rate,
            seed,
            kinds: kinds.into_iter().collect(),
            always: Vec::new(),
            first_of_each: false,
        }
    }

    /// Also fails the first request of every action.
    pub fn and_first_of_each(mut self) -> Self {
        self.first_of_each = true;
        self
    }

    /// `kind` in every call of `service`'s `action`, nothing elsewhere.
    pub fn always(service: &str, action: &str, kind: Kind) -> Self {
        Self {
            kinds: vec![kind],
            ..Self::default()
        }
        .and_always(service, action)
    }

    /// Adds a (service, action) pair that always gets a fault.
    pub fn and_always(mut self, service: &str, action: &str) -> Self {
        self.always.push((service.to_owned(), action.to_owned()));
        self
    }
}

/// What the proxy did with the requests for one (service, action).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Requests received.
    pub seen: u64,
    /// Requests passed on to moto (delayed ones included).
    pub forwarded: u64,
    pub throttled: u64,
    pub server_errors: u64,
    pub resets: u64,
    pub delayed: u64,
}

impl Counts {
    /// Requests answered with a fault instead of being forwarded.
    pub fn failed(&self) -> u64 {
        self.throttled + self.server_errors + self.resets
    }

    fn add(&mut self, other: &Self) {
        self.seen += other.seen;
        self.forwarded += other.forwarded;
        self.throttled += other.throttled;
        self.server_errors += other.server_errors;
        self.resets += other.resets;
        self.delayed += other.delayed;
    }
}

impl fmt::Display for Counts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seen {}, forwarded {}, throttled {}, server errors {}, resets {}, delayed {}",
            self.seen,
            self.forwarded,
            self.throttled,
            self.server_errors,
            self.resets,
            self.delayed
        )
    }
}

/// One request as the proxy understood it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// From the SigV4 credential scope, lower case; `unknown` without one.
    pub service: String,
    /// The API operation (`DescribeVolumes`, `GetObject`); `Unknown` when
    /// the request does not say.
    pub action: String,
    /// Query-string and form parameters (`Force` → `true`), top-level JSON
    /// scalars, and `Bucket`/`Key` for S3, percent-decoded.
    pub params: BTreeMap<String, String>,
    /// The fault it got, if any.
    pub fault: Option<Kind>,
}

/// splitmix64: a tiny seeded generator, plenty for picking faults.
#[derive(Debug, Clone)]
pub(crate) struct SplitMix64(u64);

impl SplitMix64 {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// True with probability `p` (never for 0, always for 1).
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        // The top 53 bits as a float in [0, 1).
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    plan: Mutex<(Plan, SplitMix64)>,
    counts: Mutex<BTreeMap<(String, String), Counts>>,
    seen: Mutex<Vec<Seen>>,
    /// Instance states reported in place of moto's (see
    /// [`FaultProxy::report_instance_state`]).
    states: Mutex<Vec<HeldState>>,
    /// The actions whose first request got its fault (`first_of_each`).
    firsts: Mutex<std::collections::BTreeSet<(String, String)>>,
    /// The A records as the Route 53 changes moto accepted left them.
    records: Records,
    /// Numbers the request IDs of injected errors.
    next_id: AtomicU64,
}

/// A poisoned lock only means another connection's thread panicked; the
/// counts it guards are still worth reading.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    fn decide(&self, service: &str, action: &str) -> Option<Kind> {
        let mut guard = lock(&self.plan);
        let (plan, rng) = &mut *guard;
        let listed = plan.always.iter().any(|(s, a)| {
            (s == "*" || s.eq_ignore_ascii_case(service)) && (a == "*" || a == action)
        });
        let first = plan.first_of_each
            && lock(&self.firsts).insert((service.to_owned(), action.to_owned()));
        if !listed && !first && !rng.chance(plan.rate) {
            return None;
        }
        Some(match plan.kinds.len() {
            0 => Kind::Throttle,
            n => plan.kinds[usize::try_from(rng.next_u64() % n as u64).unwrap_or(0)],
        })
    }

    fn count(&self, service: &str, action: &str, f: impl FnOnce(&mut Counts)) {
        let mut counts = lock(&self.counts);
        f(counts
            .entry((service.to_owned(), action.to_owned()))
            .or_default());
    }

    fn request_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::SeqCst);
        let mut rng = SplitMix64::new(n);
        let (a, b) = (rng.next_u64(), rng.next_u64());
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            b >> 48,
            b & 0xffff_ffff_ffff
        )
    }
}

/// A records by name (without the final dot).
pub type Records = Arc<Mutex<BTreeMap<String, std::net::Ipv4Addr>>>;

/// A running proxy on a loopback port; stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    shared: Arc<Shared>,
    /// `http://127.0.0.1:PORT`, for the SDK's `endpoint_url`.
    pub endpoint: String,
    _server: Acceptor,
}

impl FaultProxy {
    /// The A records the members' Route 53 changes made, as moto accepted
    /// them (kept up to date as more pass): how the test learns the API's
    /// name without asking moto's Route 53, which refuses signed GETs
    /// while IAM is enforced.
    pub fn records(&self) -> Records {
        Arc::clone(&self.shared.records)
    }

    /// Proxies to `upstream` (`http://127.0.0.1:PORT`, moto's endpoint) from
    /// a free loopback port.
    pub fn start(upstream: &str, plan: Plan) -> Result<Self> {
        let host_port = upstream
            .strip_prefix("http://")
            .with_context(|| format!("upstream {upstream}: only http:// is proxied"))?
            .trim_end_matches('/');
        let addr = host_port
            .to_socket_addrs()
            .with_context(|| format!("resolving upstream {upstream}"))?
            .next()
            .with_context(|| format!("upstream {upstream} has no address"))?;
        Self::serve(TcpListener::bind("127.0.0.1:0")?, addr, plan)
    }

    /// Proxies to `upstream` from a listener the caller bound.
    pub fn serve(listener: TcpListener, upstream: SocketAddr, plan: Plan) -> Result<Self> {
        let rng = SplitMix64::new(plan.seed);
        let shared = Arc::new(Shared {
            upstream,
            plan: Mutex::new((plan, rng)),
            counts: Mutex::default(),
            seen: Mutex::default(),
            firsts: Mutex::default(),
            states: Mutex::default(),
            records: Records::default(),
            next_id: AtomicU64::new(0),
        });
        // A client that hangs up, or a moto that does, fails this request
        // only; the SDK retries or reports it.
        let server = Acceptor::spawn(listener, Arc::clone(&shared), handle)?;
        Ok(Self {
            shared,
            endpoint: format!("http://{}", server.addr()),
            _server: server,
        })
    }

    /// Replaces the plan (and reseeds the generator), e.g. to stop faults.
    pub fn set_plan(&self, plan: Plan) {
        let rng = SplitMix64::new(plan.seed);
        *lock(&self.shared.plan) = (plan, rng);
    }

    /// Until `until`, EC2's DescribeInstances reports `instance` in state
    /// `name` (with its `code`), whatever moto says: a stand-in for the
    /// states moto skips (it stops and terminates instances at once).
    pub fn report_instance_state(&self, instance: &str, name: &str, code: u16, until: Instant) {
        lock(&self.shared.states).push(HeldState {
            instance: instance.to_owned(),
            name: name.to_owned(),
            code,
            until,
        });
    }

    /// What happened so far, per (service, action).
    pub fn counts(&self) -> BTreeMap<(String, String), Counts> {
        lock(&self.shared.counts).clone()
    }

    /// What happened so far to one (service, action); zeros if never seen.
    pub fn count(&self, service: &str, action: &str) -> Counts {
        lock(&self.shared.counts)
            .get(&(service.to_owned(), action.to_owned()))
            .copied()
            .unwrap_or_default()
    }

    /// The counts of all actions added up.
    pub fn total(&self) -> Counts {
        let mut total = Counts::default();
        for c in lock(&self.shared.counts).values() {
            total.add(c);
        }
        total
    }

    /// Every request so far, in the order they arrived.
    pub fn requests(&self) -> Vec<Seen> {
        lock(&self.shared.seen).clone()
    }

    /// One line per (service, action) with its counts, for test output.
    pub fn summary(&self) -> String {
        self.counts()
            .iter()
            .map(|((s, a), c)| format!("{s} {a}: {c}\n"))
            .collect()
    }
}

fn handle(shared: &Shared, client: TcpStream) -> io::Result<()> {
    client.set_read_timeout(Some(IO_TIMEOUT))?;
    client.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut reader = BufReader::new(&client);
    let Some(mut req) = read_head(&mut reader)? else {
        return Ok(());
    };
    if req
        .header("expect")
        .is_some_and(|e| e.eq_ignore_ascii_case("100-continue"))
    {
        (&client).write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    read_body(&mut reader, &mut req)?;
    drop(reader);

    let (service, action, params) = req.identify();
    let fault = shared.decide(&service, &action);
    shared.count(&service, &action, |c| {
        c.seen += 1;
        match fault {
            Some(Kind::Throttle) => c.throttled += 1,
            Some(Kind::ServerError) => c.server_errors += 1,
            Some(Kind::Reset) => c.resets += 1,
            Some(Kind::Delay(_)) => c.delayed += 1,
            None => {}
        }
    });
    lock(&shared.seen).push(Seen {
        service: service.clone(),
        action: action.clone(),
        params,
        fault,
    });

    match fault {
        Some(Kind::Reset) => {
            reset(client);
            Ok(())
        }
        Some(kind @ (Kind::Throttle | Kind::ServerError)) => {
            let answer = error_answer(&req, &service, kind, &shared.request_id());
            (&client).write_all(&answer)?;
            (&client).flush()
        }
        Some(Kind::Delay(d)) => {
            std::thread::sleep(d);
            forward(shared, &req, &client, &service, &action)
        }
        None => forward(shared, &req, &client, &service, &action),
    }
}

/// An instance state reported in place of moto's, until a time.
#[derive(Debug, Clone)]
struct HeldState {
    instance: String,
    name: String,
    code: u16,
    until: Instant,
}

/// The states to report in an answer to `service`'s `action`.
fn held_states(shared: &Shared, service: &str, action: &str) -> Vec<HeldState> {
    if service != "ec2" || action != "DescribeInstances" {
        return Vec::new();
    }
    let now = Instant::now();
    lock(&shared.states)
        .iter()
        .filter(|h| h.until > now)
        .cloned()
        .collect()
}

/// `body` (a DescribeInstances answer) with `held`'s instance in its state:
/// the first `<instanceState>` after the instance's `<instanceId>`.
fn rewrite_state(body: &str, held: &HeldState) -> String {
    let id = format!("<instanceId>{}</instanceId>", held.instance);
    let Some(at) = body.find(&id) else {
        return body.to_owned();
    };
    let after = at + id.len();
    let (Some(open), Some(close)) = (
        body[after..].find("<instanceState>"),
        body[after..].find("</instanceState>"),
    ) else {
        return body.to_owned();
    };
    let (start, end) = (after + open, after + close + "</instanceState>".len());
    format!(
        "{}<instanceState><code>{}</code><name>{}</name></instanceState>{}",
        &body[..start],
        held.code,
        held.name,
        &body[end..]
    )
}

/// Closes `stream` with SO_LINGER 0, so the peer gets a reset, not a FIN.
fn reset(stream: TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the descriptor belongs to `stream`, open for the whole call;
    // the option value points at an initialised `linger` of the size given,
    // which outlives the call. (`TcpStream::set_linger` is still unstable.)
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::from_ref(&linger).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::linger>())
                .unwrap_or(libc::socklen_t::MAX),
        );
    }
    drop(stream);
}

/// Sends `req` to moto with `Connection: close` and copies the answer back,
/// marked `Connection: close` too, until moto closes.
fn forward(
    shared: &Shared,
    req: &Request,
    client: &TcpStream,
    service: &str,
    action: &str,
) -> io::Result<()> {
    let mut client = client;
    let upstream = match TcpStream::connect_timeout(&shared.upstream, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            let body = format!("fault proxy: connecting to {}: {e}", shared.upstream);
            write!(
                client,
                "HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )?;
            return client.flush();
        }
    };
    upstream.set_read_timeout(Some(IO_TIMEOUT))?;
    upstream.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut up = &upstream;
    up.write_all(&req.forward_head())?;
    up.write_all(&req.body)?;
    up.flush()?;
    shared.count(service, action, |c| c.forwarded += 1);

    let mut reader = BufReader::new(&upstream);
    let mut head = Vec::new();
    reader.read_until(b'\n', &mut head)?;
    loop {
        let mut line = Vec::new();
        if reader.read_until(b'\n', &mut line)? == 0 || line.trim_ascii().is_empty() {
            break;
        }
        let name = line.split(|&b| b == b':').next().unwrap_or_default();
        if !name.eq_ignore_ascii_case(b"connection") && !name.eq_ignore_ascii_case(b"keep-alive") {
            head.extend_from_slice(&line);
        }
    }
    let accepted = head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200");
    if service == "route53" && action == "ChangeResourceRecordSets" && accepted {
        apply_changes(
            &String::from_utf8_lossy(&req.body),
            &mut lock(&shared.records),
        );
    }
    let held = held_states(shared, service, action);
    if held.is_empty() {
        head.extend_from_slice(b"Connection: close\r\n\r\n");
        client.write_all(&head)?;
        io::copy(&mut reader, &mut client)?;
        return client.flush();
    }
    // Rewritten: the whole body is read (moto closes after it), changed,
    // and sent with its new length.
    let mut body = String::new();
    reader.read_to_string(&mut body)?;
    for h in &held {
        body = rewrite_state(&body, h);
    }
    let head = String::from_utf8_lossy(&head)
        .lines()
        .filter(|l| {
            let name = l.split(':').next().unwrap_or_default();
            !name.eq_ignore_ascii_case("content-length")
                && !name.eq_ignore_ascii_case("transfer-encoding")
        })
        .map(|l| format!("{l}\r\n"))
        .collect::<String>();
    write!(
        client,
        "{head}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    client.flush()
}

/// The text of every `<tag>…</tag>` in `xml`, in order.
fn elements<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + open.len()..];
        let Some(end) = after.find(&close) else { break };
        out.push(&after[..end]);
        rest = &after[end + close.len()..];
    }
    out
}

/// Applies a ChangeResourceRecordSets request's A-record changes.
fn apply_changes(body: &str, records: &mut BTreeMap<String, std::net::Ipv4Addr>) {
    for change in elements(body, "Change") {
        let first = |tag| elements(change, tag).first().copied().unwrap_or_default();
        apply_change(
            records,
            first("Action"),
            first("Type"),
            first("Name"),
            first("Value"),
        );
    }
}

/// One Route 53 change (action, record type, name, first value) applied
/// to `records`, as Route 53 applies it to the A records: CREATE and
/// UPSERT set the name's address, DELETE removes it; other types are not
/// kept.
pub(crate) fn apply_change(
    records: &mut BTreeMap<String, std::net::Ipv4Addr>,
    action: &str,
    kind: &str,
    name: &str,
    value: &str,
) {
    if kind != "A" {
        return;
    }
    let name = name.trim_end_matches('.').to_owned();
    match (action, value.parse()) {
        ("DELETE", _) => {
            records.remove(&name);
        }
        ("CREATE" | "UPSERT", Ok(ip)) => {
            records.insert(name, ip);
        }
        _ => {}
    }
}

/// How a service spells its errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Ec2,
    S3,
    /// awsQuery: CloudFormation, Auto Scaling, IAM, STS, …
    Query,
    /// awsJson 1.0/1.1: SSM, DynamoDB, … (`X-Amz-Target`).
    Json,
}

/// A whole HTTP answer carrying `kind` (Throttle or ServerError) in the
/// shape the real service would use.
fn error_answer(req: &Request, service: &str, kind: Kind, request_id: &str) -> Vec<u8> {
    let protocol = if req.header("x-amz-target").is_some() {
        Protocol::Json
    } else if service == "ec2" {
        Protocol::Ec2
    } else if service == "s3" {
        Protocol::S3
    } else {
        Protocol::Query
    };
    let throttle = kind == Kind::Throttle;
    let xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
    let (status, content_type, body) = match (protocol, throttle) {
        (Protocol::Ec2, true) => (
            "503 Service Unavailable",
            "text/xml;charset=UTF-8".to_owned(),
            format!("{xml}<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>"),
        ),
        (Protocol::Ec2, false) => (
            "500 Internal Server Error",
            "text/xml;charset=UTF-8".to_owned(),
            format!("{xml}<Response><Errors><Error><Code>InternalError</Code><Message>An internal error has occurred.</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>"),
        ),
        (Protocol::S3, true) => (
            "503 Slow Down",
            "application/xml".to_owned(),
            format!("{xml}<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message><RequestId>{request_id}</RequestId></Error>"),
        ),
        (Protocol::S3, false) => (
            "500 Internal Server Error",
            "application/xml".to_owned(),
            format!("{xml}<Error><Code>InternalError</Code><Message>We encountered an internal error. Please try again.</Message><RequestId>{request_id}</RequestId></Error>"),
        ),
        (Protocol::Query, true) => (
            "400 Bad Request",
            "text/xml".to_owned(),
            format!("<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error><RequestId>{request_id}</RequestId></ErrorResponse>"),
        ),
        (Protocol::Query, false) => (
            "500 Internal Server Error",
            "text/xml".to_owned(),
            format!("<ErrorResponse><Error><Type>Receiver</Type><Code>InternalFailure</Code><Message>An internal error occurred.</Message></Error><RequestId>{request_id}</RequestId></ErrorResponse>"),
        ),
        (Protocol::Json, _) => {
            let (code, message) = if throttle {
                ("ThrottlingException", "Rate exceeded")
            } else {
                ("InternalServerError", "Internal server error")
            };
            let content_type = req
                .header("content-type")
                .filter(|c| c.starts_with("application/x-amz-json-"))
                .unwrap_or("application/x-amz-json-1.1")
                .to_owned();
            let status = if throttle {
                "400 Bad Request"
            } else {
                "500 Internal Server Error"
            };
            let body = serde_json::json!({ "__type": code, "message": message }).to_string();
            (status, content_type, body)
        }
    };
    let mut answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nx-amzn-RequestId: {request_id}\r\n",
        body.len()
    );
    if protocol == Protocol::S3 {
        answer.push_str(&format!("x-amz-request-id: {request_id}\r\n"));
    }
    answer.push_str("Connection: close\r\n\r\n");
    // An answer to HEAD has no body, only its length.
    if req.method != "HEAD" {
        answer.push_str(&body);
    }
    answer.into_bytes()
}

#[derive(Debug)]
struct Header {
    /// Lower case.
    name: String,
    value: String,
    /// The line as received, CRLF included, to forward unchanged.
    line: Vec<u8>,
}

/// One request as read off the wire: the head parsed, the bytes kept.
#[derive(Debug)]
struct Request {
    request_line: Vec<u8>,
    method: String,
    /// Path and query string.
    target: String,
    headers: Vec<Header>,
    /// As received: a chunked body keeps its framing.
    body: Vec<u8>,
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

fn eof() -> io::Error {
    io::ErrorKind::UnexpectedEof.into()
}

/// The request line and headers; `None` when the peer sent nothing (the
/// accept loop's wake-up).
fn read_head(r: &mut impl BufRead) -> io::Result<Option<Request>> {
    let mut request_line = Vec::new();
    if r.read_until(b'\n', &mut request_line)? == 0 {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&request_line).into_owned();
    let mut parts = text.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(invalid("malformed request line"));
    };
    let mut headers = Vec::new();
    let mut size = request_line.len();
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line)? == 0 {
            return Err(eof());
        }
        size += line.len();
        if size > MAX_HEAD {
            return Err(invalid("request head too large"));
        }
        if line.trim_ascii().is_empty() {
            break;
        }
        let text = String::from_utf8_lossy(&line);
        if let Some((name, value)) = text.split_once(':') {
            headers.push(Header {
                name: name.trim().to_ascii_lowercase(),
                value: value.trim().to_owned(),
                line: line.clone(),
            });
        }
    }
    Ok(Some(Request {
        method: method.to_owned(),
        target: target.to_owned(),
        request_line,
        headers,
        body: Vec::new(),
    }))
}

/// The body, by `Content-Length` or chunked framing (kept as received).
fn read_body(r: &mut impl BufRead, req: &mut Request) -> io::Result<()> {
    let chunked = req
        .header("transfer-encoding")
        .is_some_and(|t| t.to_ascii_lowercase().contains("chunked"));
    if chunked {
        return read_chunked(r, &mut req.body);
    }
    if let Some(length) = req.header("content-length") {
        let length: u64 = length.parse().map_err(|_| invalid("bad Content-Length"))?;
        if length > MAX_BODY {
            return Err(invalid("request body too large"));
        }
        r.by_ref().take(length).read_to_end(&mut req.body)?;
        if (req.body.len() as u64) < length {
            return Err(eof());
        }
    }
    Ok(())
}

/// Chunks up to the terminating 0-chunk and its trailers, framing included.
fn read_chunked(r: &mut impl BufRead, out: &mut Vec<u8>) -> io::Result<()> {
    loop {
        let start = out.len();
        if r.read_until(b'\n', out)? == 0 {
            return Err(eof());
        }
        let size = {
            let line = String::from_utf8_lossy(&out[start..]);
            let hex = line.split(';').next().unwrap_or_default().trim();
            u64::from_str_radix(hex, 16).map_err(|_| invalid("bad chunk size"))?
        };
        if size == 0 {
            // Trailers, then the empty line that ends the body.
            loop {
                let start = out.len();
                if r.read_until(b'\n', out)? == 0 {
                    return Err(eof());
                }
                if out[start..].trim_ascii().is_empty() {
                    return Ok(());
                }
            }
        }
        if out.len() as u64 + size > MAX_BODY {
            return Err(invalid("request body too large"));
        }
        // The chunk and its CRLF.
        let start = out.len();
        let size = usize::try_from(size).map_err(|_| invalid("request body too large"))?;
        out.resize(start + size + 2, 0);
        r.read_exact(&mut out[start..])?;
    }
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|h| h.name == name)
            .map(|h| h.value.as_str())
    }

    /// The head for moto: hop-by-hop headers replaced by `Connection: close`
    /// (and no `Expect`: the proxy already has the body).
    fn forward_head(&self) -> Vec<u8> {
        let mut head = self.request_line.clone();
        for h in &self.headers {
            if !matches!(
                h.name.as_str(),
                "connection" | "keep-alive" | "proxy-connection" | "expect"
            ) {
                head.extend_from_slice(&h.line);
            }
        }
        head.extend_from_slice(b"Connection: close\r\n\r\n");
        head
    }

    /// (service, action, parameters); see [`Seen`].
    fn identify(&self) -> (String, String, BTreeMap<String, String>) {
        let (path, query) = self.target.split_once('?').unwrap_or((&self.target, ""));
        let mut params = BTreeMap::new();
        parse_form(query, &mut params);
        if self
            .header("content-type")
            .is_some_and(|c| c.contains("x-www-form-urlencoded"))
        {
            parse_form(&String::from_utf8_lossy(&self.body), &mut params);
        }
        let credential = self
            .header("authorization")
            .and_then(|a| a.split("Credential=").nth(1))
            .or(params.get("X-Amz-Credential").map(String::as_str));
        let service = credential
            .and_then(scope_service)
            .unwrap_or_else(|| "unknown".to_owned());

        let action = if let Some(target) = self.header("x-amz-target") {
            if let Ok(serde_json::Value::Object(fields)) =
                serde_json::from_slice::<serde_json::Value>(&self.body)
            {
                for (k, v) in fields {
                    match v {
                        serde_json::Value::String(s) => params.insert(k, s),
                        serde_json::Value::Number(_) | serde_json::Value::Bool(_) => {
                            params.insert(k, v.to_string())
                        }
                        _ => None,
                    };
                }
            }
            target.rsplit('.').next().unwrap_or(target).to_owned()
        } else if service == "s3" {
            let action = s3_action(
                &self.method,
                path,
                query,
                &params,
                self.header("x-amz-copy-source").is_some(),
            );
            let (bucket, key) = split_bucket_key(path);
            if !bucket.is_empty() {
                params.insert("Bucket".to_owned(), decode(bucket));
            }
            if !key.is_empty() {
                params.insert("Key".to_owned(), decode(key));
            }
            action
        } else if service == "route53" {
            route53_action(&self.method, path)
        } else {
            params
                .get("Action")
                .cloned()
                .unwrap_or_else(|| "Unknown".to_owned())
        };
        (service, action, params)
    }
}

/// Route 53's REST API action for a request: the few the members call.
fn route53_action(method: &str, path: &str) -> String {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method, parts.as_slice()) {
        ("POST", [_, "hostedzone", _, "rrset"]) => "ChangeResourceRecordSets",
        ("GET", [_, "hostedzone", _, "rrset"]) => "ListResourceRecordSets",
        ("GET", [_, "change", _]) => "GetChange",
        ("GET", [_, "hostedzone"]) => "ListHostedZones",
        _ => "Unknown",
    }
    .to_owned()
}

/// The service in a SigV4 credential (`AKID/20240101/us-east-1/ec2/aws4_request`).
fn scope_service(credential: &str) -> Option<String> {
    credential
        .split([',', ' '])
        .next()?
        .split('/')
        .nth(3)
        .filter(|s| !s.is_empty())
        .map(str::to_ascii_lowercase)
}

/// `/bucket/key/with/slashes` → (`bucket`, `key/with/slashes`), path style.
fn split_bucket_key(path: &str) -> (&str, &str) {
    let path = path.trim_start_matches('/');
    path.split_once('/').unwrap_or((path, ""))
}

/// The S3 operation of a path-style request: the SDK's `x-id` when it sends
/// one, else by method and path. Requests on a sub-resource (`?tagging`,
/// `?uploads`) are `Unknown`.
fn s3_action(
    method: &str,
    path: &str,
    query: &str,
    params: &BTreeMap<String, String>,
    copy: bool,
) -> String {
    if let Some(id) = params.get("x-id") {
        return id.clone();
    }
    if query.split('&').any(|p| !p.is_empty() && !p.contains('=')) {
        return "Unknown".to_owned();
    }
    let (bucket, key) = split_bucket_key(path);
    let action = match (method, bucket.is_empty(), key.is_empty()) {
        ("GET", true, _) => "ListBuckets",
        (_, true, _) => "Unknown",
        ("GET", false, false) => "GetObject",
        ("PUT", false, false) if copy => "CopyObject",
        ("PUT", false, false) => "PutObject",
        ("HEAD", false, false) => "HeadObject",
        ("DELETE", false, false) => "DeleteObject",
        ("GET", false, true) if params.get("list-type").map(String::as_str) == Some("2") => {
            "ListObjectsV2"
        }
        ("GET", false, true) => "ListObjects",
        ("PUT", false, true) => "CreateBucket",
        ("HEAD", false, true) => "HeadBucket",
        ("DELETE", false, true) => "DeleteBucket",
        _ => "Unknown",
    };
    action.to_owned()
}

/// `a=1&b=x%2Fy` into `params`, decoded; a bare `tagging` maps to "".
fn parse_form(s: &str, params: &mut BTreeMap<String, String>) {
    for pair in s.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        params.insert(decode(k), decode(v));
    }
}

/// Percent-decoding, `+` as a space.
fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (escaped, bytes[i]) {
            (Some(b), _) => {
                out.push(b);
                i += 3;
                continue;
            }
            (None, b'+') => out.push(b' '),
            (None, b) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Request {
        let mut r = raw.as_bytes();
        let mut req = read_head(&mut r).unwrap().unwrap();
        read_body(&mut r, &mut req).unwrap();
        req
    }

    const EC2_AUTH: &str = "Authorization: AWS4-HMAC-SHA256 Credential=testing/20240101/us-east-1/ec2/aws4_request, SignedHeaders=host, Signature=00\r\n";

    #[test]
    fn query_protocol_action_and_params_come_from_the_form_body() {
        let body = "Action=DetachVolume&Version=2016-11-15&VolumeId=vol-0abc&Force=true";
        let req = parse(&format!(
            "POST / HTTP/1.1\r\nHost: x\r\n{EC2_AUTH}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
        let (service, action, params) = req.identify();
        assert_eq!((service.as_str(), action.as_str()), ("ec2", "DetachVolume"));
        assert_eq!(params.get("Force").map(String::as_str), Some("true"));
        assert_eq!(params.get("VolumeId").map(String::as_str), Some("vol-0abc"));
    }

    #[test]
    fn json_protocol_action_comes_from_the_target() {
        let body = r#"{"Name":"/slipway/x","WithDecryption":true}"#;
        let req = parse(&format!(
            "POST / HTTP/1.1\r\nAuthorization: AWS4-HMAC-SHA256 Credential=k/20240101/us-east-1/SSM/aws4_request, Signature=0\r\nX-Amz-Target: AmazonSSM.GetParameter\r\nContent-Type: application/x-amz-json-1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
        let (service, action, params) = req.identify();
        assert_eq!((service.as_str(), action.as_str()), ("ssm", "GetParameter"));
        assert_eq!(
            params.get("WithDecryption").map(String::as_str),
            Some("true")
        );

        let answer = error_answer(&req, &service, Kind::Throttle, "id");
        let answer = String::from_utf8(answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
        assert!(
            head.contains("Content-Type: application/x-amz-json-1.1"),
            "{head}"
        );
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["__type"], "ThrottlingException");
    }

    #[test]
    fn accepted_route53_changes_set_and_delete_a_records() {
        let batch = |action: &str, kind: &str, ip: &str| {
            format!("<?xml version=\"1.0\"?><ChangeResourceRecordSetsRequest><ChangeBatch><Comment>c</Comment><Changes><Change><Action>{action}</Action><ResourceRecordSet><Name>api.demo.slipway.internal.</Name><Type>{kind}</Type><TTL>30</TTL><ResourceRecords><ResourceRecord><Value>{ip}</Value></ResourceRecord></ResourceRecords></ResourceRecordSet></Change></Changes></ChangeBatch></ChangeResourceRecordSetsRequest>")
        };
        let mut records = BTreeMap::new();
        apply_changes(&batch("UPSERT", "A", "10.0.1.250"), &mut records);
        apply_changes(&batch("UPSERT", "TXT", "\"x\""), &mut records);
        assert_eq!(
            records.get("api.demo.slipway.internal"),
            Some(&"10.0.1.250".parse().unwrap())
        );
        apply_changes(&batch("UPSERT", "A", "10.0.2.250"), &mut records);
        assert_eq!(records.len(), 1);
        assert_eq!(
            records.get("api.demo.slipway.internal"),
            Some(&"10.0.2.250".parse().unwrap())
        );
        apply_changes(&batch("DELETE", "A", "10.0.2.250"), &mut records);
        assert!(records.is_empty());
    }

    #[test]
    fn route53_actions_follow_method_and_path_and_its_throttling_is_query_shaped() {
        let auth = "Authorization: AWS4-HMAC-SHA256 Credential=k/20240101/us-east-1/route53/aws4_request, Signature=0\r\n";
        let req = |method: &str, path: &str| {
            parse(&format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\n\r\n"
            ))
        };
        for (method, path, action) in [
            (
                "POST",
                "/2013-04-01/hostedzone/Z0123/rrset/",
                "ChangeResourceRecordSets",
            ),
            (
                "GET",
                "/2013-04-01/hostedzone/Z0123/rrset",
                "ListResourceRecordSets",
            ),
            ("GET", "/2013-04-01/change/C0123", "GetChange"),
            ("DELETE", "/2013-04-01/hostedzone/Z0123", "Unknown"),
        ] {
            let (service, got, _) = req(method, path).identify();
            assert_eq!(
                (service.as_str(), got.as_str()),
                ("route53", action),
                "{method} {path}"
            );
        }
        let r = req("POST", "/2013-04-01/hostedzone/Z0123/rrset/");
        let answer = String::from_utf8(error_answer(&r, "route53", Kind::Throttle, "id")).unwrap();
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
        assert!(answer.contains("<Code>Throttling</Code>"), "{answer}");
    }

    #[test]
    fn s3_actions_follow_method_and_path() {
        let s3 = |method: &str, target: &str, extra: &str| {
            let req = parse(&format!(
                "{method} {target} HTTP/1.1\r\nAuthorization: AWS4-HMAC-SHA256 Credential=k/20240101/us-east-1/s3/aws4_request, Signature=0\r\n{extra}\r\n"
            ));
            let (_, action, params) = req.identify();
            (action, params)
        };
        assert_eq!(s3("GET", "/b/k%201/x", "").0, "GetObject");
        assert_eq!(
            s3("GET", "/b/k%201/x", "").1.get("Key").map(String::as_str),
            Some("k 1/x")
        );
        assert_eq!(s3("PUT", "/b/k", "").0, "PutObject");
        assert_eq!(
            s3("PUT", "/b/k", "x-amz-copy-source: a/b\r\n").0,
            "CopyObject"
        );
        assert_eq!(s3("HEAD", "/b/k", "").0, "HeadObject");
        assert_eq!(s3("DELETE", "/b/k", "").0, "DeleteObject");
        assert_eq!(s3("GET", "/b?list-type=2&prefix=a", "").0, "ListObjectsV2");
        assert_eq!(s3("GET", "/b", "").0, "ListObjects");
        assert_eq!(s3("PUT", "/b", "").0, "CreateBucket");
        assert_eq!(s3("HEAD", "/b/", "").0, "HeadBucket");
        assert_eq!(s3("DELETE", "/b", "").0, "DeleteBucket");
        assert_eq!(s3("GET", "/", "").0, "ListBuckets");
        assert_eq!(s3("GET", "/b/k?tagging", "").0, "Unknown");
        assert_eq!(
            s3("PUT", "/b/k?x-id=UploadPart&partNumber=1", "").0,
            "UploadPart"
        );
        let (_, action, _) = parse("GET / HTTP/1.1\r\n\r\n").identify();
        assert_eq!(action, "Unknown");
    }

    #[test]
    fn a_held_state_replaces_only_its_instances_state() {
        let body = "<item><instanceId>i-1</instanceId><instanceState><code>16</code><name>running</name></instanceState></item>\
                    <item><instanceId>i-2</instanceId><instanceState><code>80</code><name>stopped</name></instanceState></item>";
        let held = HeldState {
            instance: "i-2".into(),
            name: "stopping".into(),
            code: 64,
            until: Instant::now(),
        };
        let out = rewrite_state(body, &held);
        assert!(out.contains(
            "<instanceId>i-1</instanceId><instanceState><code>16</code><name>running</name>"
        ));
        assert!(out.contains("<instanceId>i-2</instanceId><instanceState><code>64</code><name>stopping</name></instanceState></item>"));
        assert!(!out.contains("stopped"));
        let other = HeldState {
            instance: "i-3".into(),
            ..held
        };
        assert_eq!(rewrite_state(body, &other), body);
    }

    #[test]
    fn chunked_bodies_are_kept_whole_and_end_at_the_zero_chunk() {
        let body = "5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-amz-checksum-crc32: abc\r\n\r\n";
        let raw = format!("PUT /b/k HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{body}NEXT");
        let mut r = raw.as_bytes();
        let mut req = read_head(&mut r).unwrap().unwrap();
        read_body(&mut r, &mut req).unwrap();
        assert_eq!(String::from_utf8(req.body).unwrap(), body);
        assert_eq!(r, b"NEXT");
    }

    #[test]
    fn the_generator_repeats_per_seed_and_honours_the_extremes() {
        let draw = |seed| {
            let mut g = SplitMix64::new(seed);
            (0..4).map(|_| g.next_u64()).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let mut g = SplitMix64::new(1);
        assert!((0..1000).all(|_| g.chance(1.0)));
        assert!((0..1000).all(|_| !g.chance(0.0)));
        let hits = (0..10_000).filter(|_| g.chance(0.5)).count();
        assert!((4_500..5_500).contains(&hits), "{hits}");
    }
}
