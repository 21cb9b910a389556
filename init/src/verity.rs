//! The dm-verity on-disk format: the hash tree the image builder writes next
//! to the root filesystem, and the superblock the initramfs reads back to
//! activate it. Format version 1 with SHA-256, as the kernel and veritysetup
//! understand it; the root hash itself only travels on the kernel command line.

use sha2::{Digest, Sha256};
use std::io::{self, Read};

/// Size of the serialised superblock; it occupies the first hash block.
pub const SUPERBLOCK_LEN: usize = 512;
/// Data and hash block size used for every Slipway image.
pub const BLOCK_SIZE: u32 = 4096;
const SIGNATURE: &[u8; 8] = b"verity\0\0";
const DIGEST_LEN: usize = 32;
const MAX_SALT: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum VerityError {
    #[error("reading the data to protect: {0}")]
    Read(#[source] io::Error),
    #[error("the data is {len} bytes, not a whole number of {BLOCK_SIZE}-byte blocks")]
    Unaligned { len: u64 },
    #[error("the salt is {0} bytes; at most {MAX_SALT} fit in the superblock")]
    SaltTooLong(usize),
    #[error("no verity superblock (signature {0:02x?})")]
    BadSignature([u8; 8]),
    #[error("unsupported verity superblock: {0}")]
    Unsupported(String),
}

/// The parameters stored in the superblock: everything but the root hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub uuid: [u8; 16],
    pub data_blocks: u64,
    pub salt: Vec<u8>,
}

impl Superblock {
    pub fn encode(&self) -> Result<[u8; SUPERBLOCK_LEN], VerityError> {
        if self.salt.len() > MAX_SALT {
            return Err(VerityError::SaltTooLong(self.salt.len()));
        }
        let mut sb = [0u8; SUPERBLOCK_LEN];
        sb[0..8].copy_from_slice(SIGNATURE);
        sb[8..12].copy_from_slice(&1u32.to_le_bytes()); // version
        sb[12..16].copy_from_slice(&1u32.to_le_bytes()); // hash type: normal
        sb[16..32].copy_from_slice(&self.uuid);
        sb[32..38].copy_from_slice(b"sha256");
        sb[64..68].copy_from_slice(&BLOCK_SIZE.to_le_bytes());
        sb[68..72].copy_from_slice(&BLOCK_SIZE.to_le_bytes());
        sb[72..80].copy_from_slice(&self.data_blocks.to_le_bytes());
        let salt_len = u16::try_from(self.salt.len())
            .map_err(|_| VerityError::Unsupported(format!("a {}-byte salt", self.salt.len())))?;
        sb[80..82].copy_from_slice(&salt_len.to_le_bytes());
        sb[88..88 + self.salt.len()].copy_from_slice(&self.salt);
        Ok(sb)
    }

    pub fn decode(sb: &[u8]) -> Result<Self, VerityError> {
        if sb.len() < SUPERBLOCK_LEN {
            return Err(VerityError::Unsupported(format!(
                "superblock is {} bytes",
                sb.len()
            )));
        }
        let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
        let mut signature = [0u8; 8];
        signature.copy_from_slice(&sb[0..8]);
        if &signature != SIGNATURE {
            return Err(VerityError::BadSignature(signature));
        }
        if u32_at(8) != 1 || u32_at(12) != 1 {
            return Err(VerityError::Unsupported(format!(
                "version {} hash type {}",
                u32_at(8),
                u32_at(12)
            )));
        }
        let algorithm = &sb[32..64];
        let end = algorithm.iter().position(|&b| b == 0).unwrap_or(32);
        if &algorithm[..end] != b"sha256" {
            return Err(VerityError::Unsupported(format!(
                "algorithm {:?}",
                String::from_utf8_lossy(&algorithm[..end])
            )));
        }
        if u32_at(64) != BLOCK_SIZE || u32_at(68) != BLOCK_SIZE {
            return Err(VerityError::Unsupported(format!(
                "block sizes {}/{}",
                u32_at(64),
                u32_at(68)
            )));
        }
        let mut data_blocks = [0u8; 8];
        data_blocks.copy_from_slice(&sb[72..80]);
        let salt_len = u16::from_le_bytes([sb[80], sb[81]]) as usize;
        if salt_len > MAX_SALT {
            return Err(VerityError::SaltTooLong(salt_len));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&sb[16..32]);
        Ok(Self {
            uuid,
            data_blocks: u64::from_le_bytes(data_blocks),
            salt: sb[88..88 + salt_len].to_vec(),
        })
    }

    /// The dm-verity target parameters for this superblock (hash area starts
    /// after the superblock's block).
    pub fn table_params(&self, data_dev: &str, hash_dev: &str, root_hash: &str) -> String {
        format!(
            "1 {data_dev} {hash_dev} {BLOCK_SIZE} {BLOCK_SIZE} {} 1 sha256 {root_hash} {}",
            self.data_blocks,
            hex::encode(&self.salt)
        )
    }
}

/// A built hash device: superblock block followed by the tree, top level first.
#[derive(Debug)]
pub struct HashTree {
    pub root_hash: [u8; DIGEST_LEN],
    pub superblock: Superblock,
    pub device: Vec<u8>,
}

fn salted_hash(salt: &[u8], block: &[u8]) -> [u8; DIGEST_LEN] {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(block);
    h.finalize().into()
}

/// Packs digests into zero-padded hash blocks.
fn pack(digests: &[[u8; DIGEST_LEN]]) -> Vec<u8> {
    let per_block = BLOCK_SIZE as usize / DIGEST_LEN;
    let blocks = digests.len().div_ceil(per_block);
    let mut out = vec![0u8; blocks * BLOCK_SIZE as usize];
    for (i, d) in digests.iter().enumerate() {
        out[i * DIGEST_LEN..(i + 1) * DIGEST_LEN].copy_from_slice(d);
    }
    out
}

/// Hashes `data` (a whole number of blocks) into a verity hash device.
pub fn build(mut data: impl Read, salt: &[u8], uuid: [u8; 16]) -> Result<HashTree, VerityError> {
    let mut digests = Vec::new();
    let mut block = vec![0u8; BLOCK_SIZE as usize];
    let mut len = 0u64;
    loop {
        let mut filled = 0;
        while filled < block.len() {
            match data.read(&mut block[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(VerityError::Read(e)),
            }
        }
        len += filled as u64;
        if filled == 0 {
            break;
        }
        if filled < block.len() {
            return Err(VerityError::Unaligned { len });
        }
        digests.push(salted_hash(salt, &block));
    }
    let superblock = Superblock {
        uuid,
        data_blocks: digests.len() as u64,
        salt: salt.to_vec(),
    };
    let sb = superblock.encode()?;

    // Level 0 hashes the data; each level above hashes the one below, until
    // a level fits in one block. The device stores the top level first.
    let mut levels: Vec<Vec<u8>> = Vec::new();
    let mut current = pack(&digests);
    while current.len() > BLOCK_SIZE as usize {
        let above: Vec<_> = current
            .chunks(BLOCK_SIZE as usize)
            .map(|b| salted_hash(salt, b))
            .collect();
        levels.push(current);
        current = pack(&above);
    }
    let root_hash = salted_hash(salt, &current);
    levels.push(current);

    let mut device =
        Vec::with_capacity(BLOCK_SIZE as usize + levels.iter().map(Vec::len).sum::<usize>());
    device.extend_from_slice(&sb);
    device.resize(BLOCK_SIZE as usize, 0);
    for level in levels.iter().rev() {
        device.extend_from_slice(level);
    }
    Ok(HashTree {
        root_hash,
        superblock,
        device,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(blocks: usize) -> Vec<u8> {
        (0..blocks * BLOCK_SIZE as usize)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect()
    }

    #[test]
    fn superblock_round_trips() {
        let sb = Superblock {
            uuid: [7; 16],
            data_blocks: 12345,
            salt: vec![1, 2, 3, 4],
        };
        let bytes = sb.encode().unwrap();
        assert_eq!(Superblock::decode(&bytes).unwrap(), sb);
    }

    #[test]
    fn decode_rejects_garbage() {
        let err = Superblock::decode(&[0u8; 512]).unwrap_err();
        assert!(matches!(err, VerityError::BadSignature(_)));
    }

    #[test]
    fn tree_has_the_kernels_shape() {
        // 200 data blocks: level 0 needs 2 hash blocks, level 1 one block.
        let tree = build(&sample(200)[..], b"salt", [0; 16]).unwrap();
        assert_eq!(tree.device.len(), 4 * BLOCK_SIZE as usize);
        // The top level (stored first after the superblock) hashes level 0.
        let level0 = &tree.device[2 * BLOCK_SIZE as usize..];
        let top = &tree.device[BLOCK_SIZE as usize..2 * BLOCK_SIZE as usize];
        assert_eq!(&top[..32], &salted_hash(b"salt", &level0[..4096]));
        assert_eq!(tree.root_hash, salted_hash(b"salt", top));
    }

    #[test]
    fn a_flipped_bit_changes_the_root_hash() {
        let mut data = sample(50);
        let a = build(&data[..], b"s", [0; 16]).unwrap().root_hash;
        data[4096 * 17 + 3] ^= 1;
        let b = build(&data[..], b"s", [0; 16]).unwrap().root_hash;
        assert_ne!(a, b);
    }

    #[test]
    fn unaligned_data_is_refused() {
        let err = build(&[0u8; 5000][..], b"s", [0; 16]).unwrap_err();
        assert!(matches!(err, VerityError::Unaligned { len: 5000 }));
    }
}
