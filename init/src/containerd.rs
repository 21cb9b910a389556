//! The few calls of containerd's API the boot makes, spoken directly:
//! gRPC over HTTP/2 on containerd's Unix socket, the protobuf messages
//! written by hand. Each `ctr` run this replaces cost a second or two of
//! CPU under emulation (a large Go program starting); a call here costs a
//! round trip on a socket.
//!
//! Only what importing the pre-pulled images needs is here: writing
//! small blobs with labels, creating or updating an image, making a
//! layer the image carries unpacked a snapshot, and a lease that keeps
//! all of it from the garbage collector until the images name it.

use bytes::{BufMut, Bytes, BytesMut};
use std::path::{Path, PathBuf};

/// gRPC's status codes this code tells apart.
pub mod code {
    pub const OK: u32 = 0;
    pub const NOT_FOUND: u32 = 5;
    pub const ALREADY_EXISTS: u32 = 6;
}

/// A call that failed: containerd's gRPC status, or the transport's error
/// (code `None`).
#[derive(Debug, thiserror::Error)]
#[error("{method}: {}{message}", code.map(|c| format!("gRPC status {c}: ")).unwrap_or_default())]
pub struct CallError {
    pub method: &'static str,
    pub code: Option<u32>,
    pub message: String,
}

impl CallError {
    pub fn is(&self, wanted: u32) -> bool {
        self.code == Some(wanted)
    }
}

/// A content descriptor: what an image's target is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

/// A connection to containerd, every call in one namespace (and, once
/// [`Client::lease`] made one, under that lease).
#[derive(Debug)]
pub struct Client {
    send: h2::client::SendRequest<Bytes>,
    namespace: String,
    lease: Option<String>,
    socket: PathBuf,
}

const WRITE: &str = "/containerd.services.content.v1.Content/Write";
const UPDATE_CONTENT: &str = "/containerd.services.content.v1.Content/Update";
const CREATE_IMAGE: &str = "/containerd.services.images.v1.Images/Create";
const UPDATE_IMAGE: &str = "/containerd.services.images.v1.Images/Update";
const CREATE_LEASE: &str = "/containerd.services.leases.v1.Leases/Create";
const DELETE_LEASE: &str = "/containerd.services.leases.v1.Leases/Delete";
const STAT_SNAPSHOT: &str = "/containerd.services.snapshots.v1.Snapshots/Stat";
const PREPARE_SNAPSHOT: &str = "/containerd.services.snapshots.v1.Snapshots/Prepare";
const COMMIT_SNAPSHOT: &str = "/containerd.services.snapshots.v1.Snapshots/Commit";
const REMOVE_SNAPSHOT: &str = "/containerd.services.snapshots.v1.Snapshots/Remove";

/// Content/Write's action that commits what was written.
const COMMIT: u64 = 2;

impl Client {
    pub async fn connect(socket: &Path, namespace: &str) -> Result<Self, CallError> {
        let transport = |message: String| CallError {
            method: "connect",
            code: None,
            message: format!("{}: {message}", socket.display()),
        };
        let io = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| transport(e.to_string()))?;
        let (send, connection) = h2::client::handshake(io)
            .await
            .map_err(|e| transport(e.to_string()))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("containerd connection ended: {e}");
            }
        });
        Ok(Self {
            send,
            namespace: namespace.to_owned(),
            lease: None,
            socket: socket.to_owned(),
        })
    }

    /// Makes the lease `id` (or takes it over, left by a run that did not
    /// finish) and sends it with every call from here on: what is written
    /// under it is kept until [`Client::end_lease`], whether an image
    /// names it yet or not.
    pub async fn lease(&mut self, id: &str) -> Result<(), CallError> {
        // CreateRequest { id = 1 }.
        let mut request = Message::default();
        request.string(1, id);
        match self.call(CREATE_LEASE, request).await {
            Err(e) if e.is(code::ALREADY_EXISTS) => {}
            other => drop(other?),
        }
        self.lease = Some(id.to_owned());
        Ok(())
    }

    /// Deletes the lease [`Client::lease`] made.
    pub async fn end_lease(&mut self) -> Result<(), CallError> {
        let Some(id) = self.lease.take() else {
            return Ok(());
        };
        let mut request = Message::default();
        request.string(1, &id);
        match self.call(DELETE_LEASE, request).await {
            Err(e) if e.is(code::NOT_FOUND) => Ok(()),
            other => other.map(drop),
        }
    }

    /// Writes `data` (a manifest, a config) as `digest` with `labels`; a
    /// blob the namespace already holds gets the labels instead. True if
    /// it was written now.
    pub async fn write(
        &mut self,
        digest: &str,
        data: &[u8],
        labels: &[(String, String)],
    ) -> Result<bool, CallError> {
        let mut request = Message::default();
        request.varint(1, COMMIT);
        request.string(2, &format!("slipway-{digest}"));
        request.varint(3, data.len() as u64);
        request.string(4, digest);
        request.bytes(6, data);
        for (k, v) in labels {
            request.map_entry(7, k, v);
        }
        let written = absent_if_exists(self.call(WRITE, request).await.map(drop))?;
        if !written && !labels.is_empty() {
            // Info { digest = 1, labels = 5 }; UpdateRequest { info = 1, update_mask = 2 }.
            let mut info = Message::default();
            info.string(1, digest);
            let mut mask = Message::default();
            for (k, v) in labels {
                info.map_entry(5, k, v);
                mask.string(1, &format!("labels.{k}"));
            }
            let mut request = Message::default();
            request.message(1, &info);
            request.message(2, &mask);
            self.call(UPDATE_CONTENT, request).await?;
        }
        Ok(written)
    }

    /// Names `target` `name` with `labels`: creates the image, or points
    /// an existing one at `target` and sets `labels` on it, keeping any
    /// other labels it has (the CRI plugin's own).
    pub async fn put_image(
        &mut self,
        name: &str,
        target: &Descriptor,
        labels: &[(String, String)],
    ) -> Result<(), CallError> {
        // Image { name = 1, labels = 2, target = 3 }.
        let mut image = Message::default();
        image.string(1, name);
        for (k, v) in labels {
            image.map_entry(2, k, v);
        }
        image.message(3, &descriptor_message(target));
        let mut create = Message::default();
        create.message(1, &image);
        match self.call(CREATE_IMAGE, create).await {
            Err(e) if e.is(code::ALREADY_EXISTS) => {}
            other => return other.map(drop),
        }
        let mut mask = Message::default();
        mask.string(1, "target");
        for (k, _) in labels {
            mask.string(1, &format!("labels.{k}"));
        }
        let mut update = Message::default();
        update.message(1, &image);
        update.message(2, &mask);
        self.call(UPDATE_IMAGE, update).await.map(drop)
    }

    /// Whether `snapshotter` holds a snapshot named `key`.
    pub async fn has_snapshot(&mut self, snapshotter: &str, key: &str) -> Result<bool, CallError> {
        // StatSnapshotRequest { snapshotter = 1, key = 2 }.
        let mut request = Message::default();
        request.string(1, snapshotter);
        request.string(2, key);
        match self.call(STAT_SNAPSHOT, request).await {
            Ok(_) => Ok(true),
            Err(e) if e.is(code::NOT_FOUND) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Makes `tree`, a directory outside containerd holding a layer
    /// unpacked as overlayfs stacks it, the committed snapshot `name` on
    /// `parent` (the empty snapshot for none): an active snapshot is
    /// prepared under a key of its own, its upper directory (empty, as
    /// prepared) replaced by a symbolic link to `tree`, and committed.
    /// The overlayfs snapshotter mounts a committed snapshot's upper
    /// directory as a lower layer by its path, which the kernel follows
    /// through the link; removing the snapshot removes only the link.
    /// A snapshot a run that did not finish left under the key is
    /// removed first; `name` committed meanwhile by someone else is
    /// theirs, and fine.
    pub async fn link_snapshot(
        &mut self,
        snapshotter: &str,
        parent: Option<&str>,
        name: &str,
        tree: &Path,
    ) -> Result<(), CallError> {
        let key = format!("slipway-link {name}");
        // PrepareSnapshotRequest { snapshotter = 1, key = 2, parent = 3 }.
        let mut prepare = Message::default();
        prepare.string(1, snapshotter);
        prepare.string(2, &key);
        prepare.string(3, parent.unwrap_or_default());
        let answer = match self.call(PREPARE_SNAPSHOT, prepare.clone()).await {
            Err(e) if e.is(code::ALREADY_EXISTS) => {
                self.remove_snapshot(snapshotter, &key).await?;
                self.call(PREPARE_SNAPSHOT, prepare).await?
            }
            other => other?,
        };
        let linked = upper_dir(&answer).and_then(|upper| link_upper(&upper, tree));
        let committed = match linked {
            Ok(()) => {
                // CommitSnapshotRequest { snapshotter = 1, name = 2, key = 3 }.
                let mut commit = Message::default();
                commit.string(1, snapshotter);
                commit.string(2, name);
                commit.string(3, &key);
                match self.call(COMMIT_SNAPSHOT, commit).await {
                    Ok(_) => return Ok(()),
                    Err(e) if e.is(code::ALREADY_EXISTS) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            Err(message) => Err(CallError {
                method: PREPARE_SNAPSHOT,
                code: None,
                message,
            }),
        };
        // Not committed by this call: the active snapshot goes.
        self.remove_snapshot(snapshotter, &key).await?;
        committed
    }

    async fn remove_snapshot(&mut self, snapshotter: &str, key: &str) -> Result<(), CallError> {
        // RemoveSnapshotRequest { snapshotter = 1, key = 2 }.
        let mut request = Message::default();
        request.string(1, snapshotter);
        request.string(2, key);
        match self.call(REMOVE_SNAPSHOT, request).await {
            Err(e) if e.is(code::NOT_FOUND) => Ok(()),
            other => other.map(drop),
        }
    }

    /// One call: `request` sent as the only message of the request
    /// stream; the answer's one message (empty for none) once its status
    /// says OK.
    async fn call(&mut self, method: &'static str, request: Message) -> Result<Bytes, CallError> {
        let failed = |message: String| CallError {
            method,
            code: None,
            message,
        };
        let mut builder = http::Request::builder()
            .method("POST")
            .uri(format!("http://localhost{method}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("containerd-namespace", &self.namespace);
        if let Some(lease) = &self.lease {
            builder = builder.header("containerd-lease", lease);
        }
        let head = builder.body(()).map_err(|e| failed(e.to_string()))?;
        let mut send = self
            .send
            .clone()
            .ready()
            .await
            .map_err(|e| failed(format!("{}: {e}", self.socket.display())))?;
        let (answer, mut body) = send
            .send_request(head, false)
            .map_err(|e| failed(e.to_string()))?;
        body.send_data(request.framed(), true)
            .map_err(|e| failed(e.to_string()))?;
        let answer = answer.await.map_err(|e| failed(e.to_string()))?;
        let (parts, mut stream) = answer.into_parts();
        if parts.status != http::StatusCode::OK {
            return Err(failed(format!("HTTP status {}", parts.status)));
        }
        // A failure with nothing to send comes in the headers alone.
        if let Some(status) = status_of(&parts.headers) {
            return status
                .map(|()| Bytes::new())
                .map_err(|(code, message)| CallError {
                    method,
                    code: Some(code),
                    message,
                });
        }
        let mut framed = BytesMut::new();
        while let Some(chunk) = stream.data().await {
            let chunk = chunk.map_err(|e| failed(e.to_string()))?;
            let _ = stream.flow_control().release_capacity(chunk.len());
            framed.extend_from_slice(&chunk);
        }
        let trailers = stream
            .trailers()
            .await
            .map_err(|e| failed(e.to_string()))?
            .unwrap_or_default();
        match status_of(&trailers) {
            Some(Ok(())) => unframed(framed.freeze()).map_err(failed),
            Some(Err((code, message))) => Err(CallError {
                method,
                code: Some(code),
                message,
            }),
            None => Err(failed("the answer carries no gRPC status".into())),
        }
    }
}

/// Descriptor { media_type = 1, digest = 2, size = 3 }.
fn descriptor_message(d: &Descriptor) -> Message {
    let mut m = Message::default();
    m.string(1, &d.media_type);
    m.string(2, &d.digest);
    m.varint(3, d.size);
    m
}

/// The upper directory of the mounts a Prepare answered with
/// (PrepareSnapshotResponse { mounts = 1 }; Mount { type = 1,
/// source = 2, options = 4 }): an overlay's `upperdir=`, or a first
/// layer's bind mount's source.
fn upper_dir(prepared: &[u8]) -> Result<PathBuf, String> {
    let mut mounts = fields(prepared, 1);
    let (Some(mount), None) = (mounts.next(), mounts.next()) else {
        return Err("the prepared snapshot is not one mount".into());
    };
    let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
    let kind = fields(mount, 1).next().map(text).unwrap_or_default();
    let upper = match kind.as_str() {
        "overlay" => fields(mount, 4)
            .map(text)
            .find_map(|o| o.strip_prefix("upperdir=").map(str::to_owned)),
        "bind" => fields(mount, 2).next().map(text),
        _ => None,
    };
    upper
        .map(PathBuf::from)
        .ok_or_else(|| format!("a {kind:?} mount names no upper directory"))
}

/// Replaces the snapshot's upper directory `upper` by a link to `tree`;
/// only an empty directory named `fs`, as the overlayfs snapshotter
/// prepares one, is ever replaced.
fn link_upper(upper: &Path, tree: &Path) -> Result<(), String> {
    if upper.file_name() != Some("fs".as_ref()) {
        return Err(format!(
            "{} is not an overlayfs snapshot's upper directory",
            upper.display()
        ));
    }
    if !tree.is_dir() {
        return Err(format!("{} is not a directory", tree.display()));
    }
    std::fs::remove_dir(upper).map_err(|e| format!("removing {}: {e}", upper.display()))?;
    std::os::unix::fs::symlink(tree, upper)
        .map_err(|e| format!("linking {} to {}: {e}", upper.display(), tree.display()))
}

/// The last message of an answer in gRPC's framing (nothing for an
/// empty answer): a unary call's only one, a stream's (Content/Write's)
/// final status. A compressed message is not one these calls expect.
fn unframed(mut framed: Bytes) -> Result<Bytes, String> {
    let mut last = Bytes::new();
    while !framed.is_empty() {
        if framed.len() < 5 || framed[0] != 0 {
            return Err("the answer is not in uncompressed gRPC messages".into());
        }
        let length = u32::from_be_bytes([framed[1], framed[2], framed[3], framed[4]]) as usize;
        if framed.len() < 5 + length {
            return Err(format!(
                "the answer ends {} bytes into a message its header says is {length}",
                framed.len() - 5
            ));
        }
        let _ = framed.split_to(5);
        last = framed.split_to(length);
    }
    Ok(last)
}

/// The values of the length-delimited fields numbered `wanted` in the
/// protobuf message `message`, in order; reading stops at anything that
/// is not protobuf.
fn fields(message: &[u8], wanted: u32) -> impl Iterator<Item = &[u8]> {
    let mut rest = message;
    std::iter::from_fn(move || {
        while !rest.is_empty() {
            let key = get_varint(&mut rest)?;
            let value: &[u8] = match key & 7 {
                0 => {
                    get_varint(&mut rest)?;
                    &[]
                }
                1 => take(&mut rest, 8)?,
                2 => {
                    let len = usize::try_from(get_varint(&mut rest)?).ok()?;
                    take(&mut rest, len)?
                }
                5 => take(&mut rest, 4)?,
                _ => return None,
            };
            if key >> 3 == u64::from(wanted) && key & 7 == 2 {
                return Some(value);
            }
        }
        None
    })
}

/// The first `n` bytes of `rest`, which moves past them.
fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let (head, tail) = rest.split_at_checked(n)?;
    *rest = tail;
    Some(head)
}

/// True for done now, false for done before (`ALREADY_EXISTS`).
fn absent_if_exists(result: Result<(), CallError>) -> Result<bool, CallError> {
    match result {
        Ok(()) => Ok(true),
        Err(e) if e.is(code::ALREADY_EXISTS) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The gRPC status in `headers`, if they carry one: `Ok` for OK, else the
/// code and its (percent-encoded) message, decoded.
fn status_of(headers: &http::HeaderMap) -> Option<Result<(), (u32, String)>> {
    let code: u32 = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if code == code::OK {
        return Some(Ok(()));
    }
    let message = headers
        .get("grpc-message")
        .map(|m| percent_decode(m.as_bytes()))
        .unwrap_or_default();
    Some(Err((code, message)))
}

fn percent_decode(raw: &[u8]) -> String {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let hex = raw
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (raw[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A protobuf message being written: fields appended in the order given
/// (any order is valid protobuf).
#[derive(Debug, Default, Clone)]
pub struct Message(BytesMut);

impl Message {
    fn key(&mut self, field: u32, wire_type: u8) {
        put_varint(&mut self.0, (u64::from(field) << 3) | u64::from(wire_type));
    }

    /// An integer field (int64, uint64, an enum), unless zero: proto3
    /// leaves a default value out.
    pub fn varint(&mut self, field: u32, value: u64) {
        if value != 0 {
            self.key(field, 0);
            put_varint(&mut self.0, value);
        }
    }

    pub fn bytes(&mut self, field: u32, value: &[u8]) {
        if !value.is_empty() {
            self.key(field, 2);
            put_varint(&mut self.0, value.len() as u64);
            self.0.put_slice(value);
        }
    }

    pub fn string(&mut self, field: u32, value: &str) {
        self.bytes(field, value.as_bytes());
    }

    /// An embedded message, written even when empty (it is then present).
    pub fn message(&mut self, field: u32, value: &Message) {
        self.key(field, 2);
        put_varint(&mut self.0, value.0.len() as u64);
        self.0.put_slice(&value.0);
    }

    /// One entry of a `map<string, string>` field.
    pub fn map_entry(&mut self, field: u32, key: &str, value: &str) {
        let mut entry = Message::default();
        entry.string(1, key);
        entry.string(2, value);
        self.message(field, &entry);
    }

    /// The message in gRPC's framing: uncompressed, its length first.
    /// (containerd takes at most 16 MiB a message; these are kilobytes.)
    #[allow(clippy::cast_possible_truncation, reason = "kilobytes, not gigabytes")]
    fn framed(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(5 + self.0.len());
        out.put_u8(0);
        out.put_u32(self.0.len() as u32);
        out.put_slice(&self.0);
        out.freeze()
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

#[allow(clippy::cast_possible_truncation, reason = "masked to seven bits")]
fn put_varint(out: &mut BytesMut, mut value: u64) {
    while value >= 0x80 {
        out.put_u8((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.put_u8(value as u8);
}

/// Reads the varint at the front of `buf`.
fn get_varint(buf: &mut &[u8]) -> Option<u64> {
    use bytes::Buf;
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        if !buf.has_remaining() {
            return None;
        }
        let byte = buf.get_u8();
        value |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(value);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_are_little_endian_groups_of_seven_bits() {
        for (value, bytes) in [
            (0u64, &[0u8][..]),
            (1, &[1]),
            (127, &[0x7f]),
            (128, &[0x80, 0x01]),
            (300, &[0xac, 0x02]),
            (62_555_648, &[0x80, 0x8c, 0xea, 0x1d]),
        ] {
            let mut out = BytesMut::new();
            put_varint(&mut out, value);
            assert_eq!(&out[..], bytes, "{value}");
            assert_eq!(get_varint(&mut &out[..]), Some(value));
        }
    }

    #[test]
    fn a_message_has_its_fields_keys_lengths_and_nested_maps() {
        let mut m = Message::default();
        m.varint(1, COMMIT);
        m.varint(5, 0); // default: left out
        m.string(2, "ref");
        m.map_entry(7, "k", "v");
        assert_eq!(
            m.as_bytes(),
            [
                0x08, 0x02, // field 1, varint: 2
                0x12, 3, b'r', b'e', b'f', // field 2, length 3
                0x3a, 6, 0x0a, 1, b'k', 0x12, 1, b'v', // field 7: {1: "k", 2: "v"}
            ]
        );
        let framed = m.framed();
        assert_eq!(framed[0], 0);
        assert_eq!(u32::from_be_bytes(framed[1..5].try_into().unwrap()), 15);
        assert_eq!(&framed[5..], m.as_bytes());
    }

    #[test]
    fn a_status_is_read_from_headers_and_its_message_decoded() {
        let mut headers = http::HeaderMap::new();
        assert_eq!(status_of(&headers), None);
        headers.insert("grpc-status", "0".parse().unwrap());
        assert_eq!(status_of(&headers), Some(Ok(())));
        headers.insert("grpc-status", "6".parse().unwrap());
        headers.insert(
            "grpc-message",
            "content sha256:ab: already exists%2C 100%25"
                .parse()
                .unwrap(),
        );
        assert_eq!(
            status_of(&headers),
            Some(Err((6, "content sha256:ab: already exists, 100%".into())))
        );
    }

    #[test]
    fn an_answer_is_its_last_message_and_a_cut_one_is_named() {
        let frame = |body: &[u8]| {
            let mut m = Message::default();
            m.bytes(1, body);
            m.framed()
        };
        let mut two = BytesMut::new();
        two.extend_from_slice(&frame(b"first"));
        two.extend_from_slice(&frame(b"last"));
        let last = unframed(two.freeze()).unwrap();
        assert_eq!(fields(&last, 1).collect::<Vec<_>>(), [&b"last"[..]]);
        assert_eq!(unframed(Bytes::new()).unwrap(), Bytes::new());
        let whole = frame(b"cut short");
        let err = unframed(whole.slice(..whole.len() - 2)).unwrap_err();
        assert!(err.contains("ends 9 bytes into a message"), "{err}");
        assert!(unframed(Bytes::from_static(&[1, 0, 0, 0, 0])).is_err());
    }

    #[test]
    fn fields_are_found_past_others_of_every_wire_type() {
        let mut mount = Message::default();
        mount.string(1, "overlay");
        mount.string(4, "lowerdir=/a");
        let mut m = Message::default();
        m.varint(3, 300);
        m.message(1, &mount);
        m.string(2, "other");
        m.message(1, &Message::default());
        let found: Vec<&[u8]> = fields(m.as_bytes(), 1).collect();
        assert_eq!(found, [mount.as_bytes(), &[][..]]);
        assert_eq!(
            fields(found[0], 4).collect::<Vec<_>>(),
            [&b"lowerdir=/a"[..]]
        );
        // Not protobuf: reading stops rather than running past the end.
        assert_eq!(fields(&[0x0a, 0x7f, 1], 1).count(), 0);
    }

    #[test]
    fn a_prepared_snapshots_upper_directory_is_found_and_only_it_is_linked() {
        let answer = |mount: &Message| {
            let mut m = Message::default();
            m.message(1, mount);
            m
        };
        let mut overlay = Message::default();
        overlay.string(1, "overlay");
        overlay.string(2, "overlay");
        overlay.string(4, "workdir=/s/2/work");
        overlay.string(4, "upperdir=/s/2/fs");
        overlay.string(4, "lowerdir=/s/1/fs");
        assert_eq!(
            upper_dir(answer(&overlay).as_bytes()).unwrap(),
            Path::new("/s/2/fs")
        );
        let mut bind = Message::default();
        bind.string(1, "bind");
        bind.string(2, "/s/1/fs");
        bind.string(4, "rbind");
        assert_eq!(
            upper_dir(answer(&bind).as_bytes()).unwrap(),
            Path::new("/s/1/fs")
        );
        let mut other = Message::default();
        other.string(1, "erofs");
        let err = upper_dir(answer(&other).as_bytes()).unwrap_err();
        assert!(err.contains("names no upper directory"), "{err}");
        let err = upper_dir(Message::default().as_bytes()).unwrap_err();
        assert!(err.contains("not one mount"), "{err}");

        let dir = tempfile::tempdir().unwrap();
        let (upper, tree) = (dir.path().join("1/fs"), dir.path().join("layer"));
        std::fs::create_dir_all(upper.join("written")).unwrap();
        std::fs::create_dir(&tree).unwrap();
        let err = link_upper(&upper, &tree).unwrap_err();
        assert!(err.contains("removing"), "a non-empty upper is kept: {err}");
        std::fs::remove_dir(upper.join("written")).unwrap();
        let err = link_upper(&dir.path().join("1"), &tree).unwrap_err();
        assert!(err.contains("not an overlayfs snapshot's"), "{err}");
        link_upper(&upper, &tree).unwrap();
        assert_eq!(std::fs::read_link(&upper).unwrap(), tree);
    }
}
