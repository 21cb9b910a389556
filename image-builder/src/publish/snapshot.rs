//! Disk → EBS snapshot through the EBS direct APIs: no volume, no
//! instance. The disk is cut into the API's 512 KiB blocks; all-zero blocks
//! are never sent (a new snapshot reads as zeros wherever nothing was
//! written), the rest go up in parallel with bounded concurrency, each with
//! its SHA-256, and CompleteSnapshot carries the linear aggregate of those
//! checksums so EBS can verify the whole.

use super::{sdk_err, PublishError};
use aws_sdk_ebs::primitives::ByteStream;
use aws_sdk_ebs::types::{ChecksumAggregationMethod, ChecksumAlgorithm, Tag};
use base64::Engine;
use sha2::{Digest, Sha256};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The EBS direct APIs' block size (fixed by the service): the unit of the
/// build's data map.
pub const BLOCK_SIZE: u64 = crate::manifest::DATA_BLOCK;
const GIB: u64 = 1 << 30;

/// The block size as the EBS APIs' `DataLength` takes it.
const BLOCK_LEN_I32: i32 = 512 * 1024;
const _: () = assert!(BLOCK_LEN_I32 as u64 == BLOCK_SIZE);

/// A block's index as the EBS APIs take it.
fn block_index(index: u64) -> Result<i32, PublishError> {
    i32::try_from(index)
        .map_err(|_| PublishError::Invalid(format!("block {index}: past the APIs' indices")))
}

/// What an upload did.
#[derive(Debug, Clone)]
pub struct Uploaded {
    pub snapshot_id: String,
    /// Indices of the blocks sent, ascending.
    pub blocks_sent: Vec<u64>,
    pub bytes_sent: u64,
    pub disk_bytes: u64,
    pub seconds: f64,
}

impl Uploaded {
    pub fn mib_per_second(&self) -> f64 {
        self.bytes_sent as f64 / (1 << 20) as f64 / self.seconds.max(1e-9)
    }
}

/// The indices of the disk's blocks that hold anything but zeros.
pub fn nonzero_blocks(disk: &Path) -> Result<Vec<u64>, PublishError> {
    let file = std::fs::File::open(disk).map_err(crate::fsio::at("opening", disk))?;
    let size = file
        .metadata()
        .map_err(crate::fsio::at("reading the size of", disk))?
        .len();
    let mut buf = vec![0u8; crate::manifest::DATA_BLOCK_LEN];
    let mut out = Vec::new();
    for index in 0..size.div_ceil(BLOCK_SIZE) {
        let n =
            read_block(&file, index, size, &mut buf).map_err(crate::fsio::at("reading", disk))?;
        if buf[..n].iter().any(|&b| b != 0) {
            out.push(index);
        }
    }
    Ok(out)
}

/// Reads block `index` into `buf`, zero-padding a short last block.
fn read_block(
    file: &std::fs::File,
    index: u64,
    size: u64,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    let offset = index * BLOCK_SIZE;
    let n = (size - offset).min(BLOCK_SIZE) as usize;
    file.read_exact_at(&mut buf[..n], offset)?;
    buf[n..].fill(0);
    Ok(n)
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Uploads `disk` as a new snapshot and waits until EC2 reports it completed.
/// Only `blocks` (ascending indices, the disk's data map) are read and
/// sent. `on_snapshot` learns the ID as soon as it exists, so a failed
/// upload can be cleaned up.
#[allow(clippy::too_many_arguments)]
pub async fn upload(
    ebs: &aws_sdk_ebs::Client,
    ec2: &aws_sdk_ec2::Client,
    disk: &Path,
    blocks: &[u64],
    description: &str,
    tags: &[(String, String)],
    concurrency: usize,
    on_snapshot: &mut (dyn FnMut(&str) + Send),
) -> Result<Uploaded, PublishError> {
    let start = Instant::now();
    let file = std::fs::File::open(disk).map_err(crate::fsio::at("opening", disk))?;
    let size = file
        .metadata()
        .map_err(crate::fsio::at("reading the size of", disk))?
        .len();
    if size == 0 || size % GIB != 0 {
        return Err(PublishError::Invalid(format!(
            "{} is {size} bytes; a snapshot needs a whole number of GiB",
            disk.display()
        )));
    }
    match blocks.last() {
        // A disk always holds its partition table: an empty map is no map.
        None => {
            return Err(PublishError::Invalid(format!(
                "{}: its data map is empty, so nothing would be sent",
                disk.display()
            )))
        }
        Some(&last) if last >= size.div_ceil(BLOCK_SIZE) => {
            return Err(PublishError::Invalid(format!(
                "{} has no block {last}: its data map is not this disk's",
                disk.display()
            )));
        }
        Some(_) => {}
    }
    let total = blocks.len();

    let started = ebs
        .start_snapshot()
        .volume_size((size / GIB) as i64)
        .description(description)
        .set_tags(Some(
            tags.iter()
                .map(|(k, v)| Tag::builder().key(k).value(v).build())
                .collect(),
        ))
        .timeout(60)
        .send()
        .await
        .map_err(sdk_err("starting a snapshot"))?;
    let snapshot_id = started
        .snapshot_id()
        .ok_or_else(|| PublishError::Invalid("StartSnapshot returned no snapshot ID".into()))?
        .to_owned();
    on_snapshot(&snapshot_id);
    eprintln!(
        "uploading {total} of {} blocks ({:.1} MiB) to {snapshot_id}",
        size / BLOCK_SIZE,
        (total as u64 * BLOCK_SIZE) as f64 / (1 << 20) as f64
    );

    let file = Arc::new(file);
    let done = Arc::new(AtomicUsize::new(0));
    let sent_bytes = Arc::new(AtomicU64::new(0));
    let reporter = tokio::spawn(report_progress(
        Arc::clone(&done),
        Arc::clone(&sent_bytes),
        total,
        start,
    ));
    let permits = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut digests = Vec::with_capacity(total);
    for &index in blocks {
        let permit = Arc::clone(&permits)
            .acquire_owned()
            .await
            .map_err(|e| PublishError::Invalid(e.to_string()))?;
        let (ebs, file, id) = (ebs.clone(), Arc::clone(&file), snapshot_id.clone());
        let (done, sent_bytes) = (Arc::clone(&done), Arc::clone(&sent_bytes));
        tasks.spawn(async move {
            let _permit = permit;
            let mut buf = vec![0u8; crate::manifest::DATA_BLOCK_LEN];
            read_block(&file, index, size, &mut buf)
                .map_err(|e| PublishError::Invalid(format!("reading block {index}: {e}")))?;
            let digest: [u8; 32] = Sha256::digest(&buf).into();
            ebs.put_snapshot_block()
                .snapshot_id(&id)
                .block_index(block_index(index)?)
                .data_length(BLOCK_LEN_I32)
                .checksum(b64(&digest))
                .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
                .block_data(ByteStream::from(buf))
                .send()
                .await
                .map_err(sdk_err(format!("uploading block {index} of {id}")))?;
            done.fetch_add(1, Ordering::Relaxed);
            sent_bytes.fetch_add(BLOCK_SIZE, Ordering::Relaxed);
            Ok::<_, PublishError>((index, digest))
        });
        // Collect as we go, and stop queueing once any block has failed.
        while let Some(joined) = tasks.try_join_next() {
            match flatten(joined) {
                Ok(d) => digests.push(d),
                Err(e) => {
                    reporter.abort();
                    return Err(e);
                }
            }
        }
    }
    while let Some(joined) = tasks.join_next().await {
        match flatten(joined) {
            Ok(d) => digests.push(d),
            Err(e) => {
                reporter.abort();
                return Err(e);
            }
        }
    }
    reporter.abort();
    let seconds = start.elapsed().as_secs_f64();
    if done.load(Ordering::Relaxed) != total {
        return Err(PublishError::Invalid(format!(
            "{} of {total} blocks uploaded",
            done.load(Ordering::Relaxed)
        )));
    }
    digests.sort_by_key(|(i, _)| *i);
    let mut aggregate = Sha256::new();
    for (_, d) in &digests {
        aggregate.update(d);
    }
    ebs.complete_snapshot()
        .snapshot_id(&snapshot_id)
        .changed_blocks_count(
            i32::try_from(total)
                .map_err(|_| PublishError::Invalid(format!("{total} blocks: too many")))?,
        )
        .checksum(b64(&aggregate.finalize()))
        .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
        .checksum_aggregation_method(ChecksumAggregationMethod::ChecksumAggregationLinear)
        .send()
        .await
        .map_err(sdk_err(format!("completing {snapshot_id}")))?;
    wait_completed(ec2, &snapshot_id).await?;
    let uploaded = Uploaded {
        snapshot_id,
        blocks_sent: blocks.to_vec(),
        bytes_sent: sent_bytes.load(Ordering::Relaxed),
        disk_bytes: size,
        seconds,
    };
    eprintln!(
        "uploaded {} in {:.1}s ({:.1} MiB/s): {:.1} MiB sent for a {} GiB disk",
        uploaded.snapshot_id,
        seconds,
        uploaded.mib_per_second(),
        uploaded.bytes_sent as f64 / (1 << 20) as f64,
        size / GIB
    );
    Ok(uploaded)
}

/// What a download read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    /// The sha256 (hex) of the whole volume, zeros included.
    pub sha256: String,
    pub size: u64,
    /// Indices of the blocks the snapshot holds, ascending.
    pub blocks: Vec<u64>,
}

/// Reads `snapshot` back through the EBS direct APIs into `dest`, a sparse
/// file of the volume's size (blocks the snapshot lacks stay holes), and
/// hashes the whole volume on the way.
pub async fn download(
    ebs: &aws_sdk_ebs::Client,
    snapshot: &str,
    dest: &Path,
) -> Result<Downloaded, PublishError> {
    let mut tokens = std::collections::BTreeMap::new();
    let mut next: Option<String> = None;
    let volume_gib = loop {
        let page = ebs
            .list_snapshot_blocks()
            .snapshot_id(snapshot)
            .set_next_token(next.clone())
            .send()
            .await
            .map_err(sdk_err(format!("listing the blocks of {snapshot}")))?;
        for b in page.blocks() {
            let index = b.block_index().and_then(|i| u64::try_from(i).ok());
            if let (Some(index), Some(token)) = (index, b.block_token()) {
                tokens.insert(index, token.to_owned());
            }
        }
        next = page.next_token().map(str::to_owned);
        if next.is_none() {
            break page.volume_size().and_then(|g| u64::try_from(g).ok());
        }
    };
    let size = volume_gib.unwrap_or(0) * GIB;
    if size == 0 {
        return Err(PublishError::Invalid(format!(
            "{snapshot} has no volume size"
        )));
    }
    let file = std::fs::File::create(dest).map_err(crate::fsio::at("creating", dest))?;
    file.set_len(size)
        .map_err(crate::fsio::at("sizing", dest))?;
    let mut hash = Sha256::new();
    let zero = vec![0u8; crate::manifest::DATA_BLOCK_LEN];
    for index in 0..size / BLOCK_SIZE {
        let Some(token) = tokens.get(&index) else {
            hash.update(&zero);
            continue;
        };
        let block = ebs
            .get_snapshot_block()
            .snapshot_id(snapshot)
            .block_index(block_index(index)?)
            .block_token(token)
            .send()
            .await
            .map_err(sdk_err(format!("reading block {index} of {snapshot}")))?;
        let data = block
            .block_data
            .collect()
            .await
            .map_err(|e| {
                PublishError::Invalid(format!("reading block {index} of {snapshot}: {e}"))
            })?
            .into_bytes();
        if data.len() != zero.len() {
            return Err(PublishError::Invalid(format!(
                "block {index} of {snapshot} is {} bytes",
                data.len()
            )));
        }
        file.write_all_at(&data, index * BLOCK_SIZE)
            .map_err(crate::fsio::at("writing", dest))?;
        hash.update(&data);
    }
    Ok(Downloaded {
        sha256: hex::encode(hash.finalize()),
        size,
        blocks: tokens.into_keys().collect(),
    })
}

fn flatten<T>(
    joined: Result<Result<T, PublishError>, tokio::task::JoinError>,
) -> Result<T, PublishError> {
    joined.map_err(|e| PublishError::Invalid(format!("an upload task failed: {e}")))?
}

async fn report_progress(
    done: Arc<AtomicUsize>,
    bytes: Arc<AtomicU64>,
    total: usize,
    start: Instant,
) {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let every = if tty {
        Duration::from_millis(500)
    } else {
        Duration::from_secs(5)
    };
    loop {
        tokio::time::sleep(every).await;
        let n = done.load(Ordering::Relaxed);
        let secs = start.elapsed().as_secs_f64();
        let mib = bytes.load(Ordering::Relaxed) as f64 / (1 << 20) as f64;
        let rate = mib / secs.max(1e-9);
        let eta = if n > 0 {
            secs / n as f64 * (total - n) as f64
        } else {
            f64::NAN
        };
        let line = format!("  {n}/{total} blocks, {rate:.1} MiB/s, ETA {eta:.0}s");
        if tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
    }
}

/// Waits until EC2 lists the snapshot as completed (EBS finishes it
/// asynchronously after CompleteSnapshot).
async fn wait_completed(ec2: &aws_sdk_ec2::Client, id: &str) -> Result<(), PublishError> {
    let what = format!("snapshot {id}");
    super::wait_for_state(
        &what,
        Duration::from_secs(2),
        "completed",
        &["error"],
        || async {
            let out = ec2
                .describe_snapshots()
                .snapshot_ids(id)
                .send()
                .await
                .map_err(sdk_err(format!("describing {id}")))?;
            Ok(out
                .snapshots()
                .first()
                .and_then(|s| s.state())
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default())
        },
    )
    .await
}
