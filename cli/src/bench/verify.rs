//! Verifiable blocks: every `bs`-sized block written by `rio bench` starts with a 32-byte header
//! and continues with pseudo-random data derived from the header's seed.
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `RIOVERIF` |
//! | 8 | 8 | byte offset of the block in the target |
//! | 16 | 8 | seed of the data |
//! | 24 | 4 | CRC32C of bytes 0..24 and 32..bs |
//! | 28 | 4 | block size |
//!
//! A read-back that fails any check is reported with its offset and the reason; a seed other
//! than the one last written there is a lost or misdirected write.

use super::rng::{Rng, splitmix64};

pub const MAGIC: u64 = u64::from_le_bytes(*b"RIOVERIF");
pub const HEADER: usize = 32;

/// Seed for the data of the block at `offset`, write number `generation`.
#[inline]
pub fn seed_for(base: u64, offset: u64, generation: u64) -> u64 {
    splitmix64(base ^ offset.rotate_left(17) ^ generation.rotate_left(41)) | 1
}

/// Fill `block` (one block) with its header and data.
pub fn fill_block(block: &mut [u8], offset: u64, seed: u64) {
    let bs = block.len();
    Rng::new(seed).fill(&mut block[HEADER..]);
    block[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    block[8..16].copy_from_slice(&offset.to_le_bytes());
    block[16..24].copy_from_slice(&seed.to_le_bytes());
    block[28..32].copy_from_slice(&(bs as u32).to_le_bytes());
    let crc = crc(block);
    block[24..28].copy_from_slice(&crc.to_le_bytes());
}

fn crc(block: &[u8]) -> u32 {
    let c = crc32c::crc32c(&block[0..24]);
    let c = crc32c::crc32c_append(c, &block[28..32]);
    crc32c::crc32c_append(c, &block[HEADER..])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Check one block read back from `offset`. `expect_seed` is the seed last written there, if
/// known. Returns the reason on mismatch.
pub fn check_block(block: &[u8], offset: u64, expect_seed: Option<u64>) -> Result<(), String> {
    if u64_at(block, 0) != MAGIC {
        return Err(
            "no rio verify header (block never written by rio bench, or overwritten)".into(),
        );
    }
    let at = u64_at(block, 8);
    if at != offset {
        return Err(format!("header says offset {at}: misdirected write"));
    }
    let bs = u32::from_le_bytes(block[28..32].try_into().expect("4 bytes")) as usize;
    if bs != block.len() {
        return Err(format!(
            "header says block size {bs}, read {} (lay out again with this --bs)",
            block.len()
        ));
    }
    let stored = u32::from_le_bytes(block[24..28].try_into().expect("4 bytes"));
    let actual = crc(block);
    if stored != actual {
        return Err(format!(
            "CRC32C mismatch (stored {stored:#010x}, computed {actual:#010x}): corrupted data"
        ));
    }
    let seed = u64_at(block, 16);
    if let Some(e) = expect_seed
        && seed != e
    {
        return Err(format!(
            "stale data (seed {seed:#x}, expected {e:#x}): a write was lost"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_each_corruption_is_caught() {
        let mut b = vec![0u8; 4096];
        fill_block(&mut b, 8192, 42);
        check_block(&b, 8192, Some(42)).unwrap();
        check_block(&b, 8192, None).unwrap();
        assert!(
            check_block(&b, 4096, None)
                .unwrap_err()
                .contains("misdirected")
        );
        assert!(
            check_block(&b, 8192, Some(43))
                .unwrap_err()
                .contains("lost")
        );
        let mut c = b.clone();
        c[1000] ^= 1;
        assert!(check_block(&c, 8192, None).unwrap_err().contains("CRC32C"));
        let mut d = b.clone();
        d[0] ^= 1;
        assert!(
            check_block(&d, 8192, None)
                .unwrap_err()
                .contains("no rio verify header")
        );
        assert!(check_block(&vec![0u8; 4096], 0, None).is_err());
    }

    #[test]
    fn seeds_differ_by_offset_and_generation() {
        assert_ne!(seed_for(1, 0, 0), seed_for(1, 4096, 0));
        assert_ne!(seed_for(1, 0, 0), seed_for(1, 0, 1));
        assert_ne!(seed_for(1, 0, 0), 0);
    }
}
