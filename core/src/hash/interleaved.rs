//! SHA-256 of several messages at once, their SHA-NI rounds interleaved.
//!
//! One SHA-256 stream is bound by the latency of `sha256rnds2`: each pair of rounds
//! needs the state the previous pair produced, so the core's SHA unit, which could
//! start a new pair every cycle or two, mostly waits. Hashing a few independent
//! messages in lock step gives it a pair from another message to start meanwhile.
//! A batch of sector records (a commit's leaves, a batch the store verifies) is such
//! a set. `benches/benches/crypto.rs` (`sha256_many`) measures the gain against one
//! stream of aws-lc, whose single-stream SHA-NI code is what `openssl speed` runs.
//!
//! This is plain FIPS 180-4 SHA-256; `tests/hash_many.rs` checks every digest against
//! aws-lc's for messages of every length around the block and padding boundaries.

use std::arch::x86_64::{
    __m128i, _mm_add_epi32, _mm_alignr_epi8, _mm_blend_epi16, _mm_loadu_si128, _mm_set_epi64x,
    _mm_sha256msg1_epu32, _mm_sha256msg2_epu32, _mm_sha256rnds2_epu32, _mm_shuffle_epi8,
    _mm_shuffle_epi32, _mm_storeu_si128,
};

/// SHA-256 works on 64-byte blocks.
const BLOCK: usize = 64;

/// How many messages share the SHA unit at a time. Four keeps the unit busy on the
/// cores we measured (AMD Zen 5) without running out of the 16 XMM registers.
const LANES: usize = 4;

/// The round constants, FIPS 180-4 § 4.2.2.
const K: [u32; 64] = [
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
];

/// The initial hash value, FIPS 180-4 § 5.3.3.
const INITIAL: [u32; 8] = [
    0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
];

/// Whether this CPU has SHA-NI and the SSE levels the code below uses.
pub(super) fn available() -> bool {
    // The standard library caches the CPUID answers, so this is cheap per call.
    is_x86_feature_detected!("sha")
        && is_x86_feature_detected!("sse4.1")
        && is_x86_feature_detected!("ssse3")
}

/// The SHA-256 digest of each message, a message being the concatenation of its
/// parts. The caller checks [`available`] first.
pub(super) fn digests(messages: &[&[&[u8]]]) -> Vec<[u8; 32]> {
    let mut lanes: Vec<Lane<'_>> = messages.iter().map(|parts| Lane::new(parts)).collect();
    for group in lanes.chunks_mut(LANES) {
        // Messages of unequal length: once one ends, the others go on with fewer lanes.
        loop {
            let active: Vec<&mut Lane<'_>> = group
                .iter_mut()
                .filter(|lane| lane.blocks_left > 0)
                .collect();
            // SAFETY (all four arms): `available()` held, as this function's contract
            // requires, so the CPU has every feature `lockstep` is compiled for.
            match active.len() {
                0 => break,
                1 => unsafe { lockstep::<1>(into_array(active)) },
                2 => unsafe { lockstep::<2>(into_array(active)) },
                3 => unsafe { lockstep::<3>(into_array(active)) },
                _ => unsafe { lockstep::<LANES>(into_array(active)) },
            }
        }
    }
    lanes.iter().map(Lane::digest).collect()
}

/// `lanes` as an array of the length its caller matched on.
fn into_array<'l, 'm, const N: usize>(lanes: Vec<&'l mut Lane<'m>>) -> [&'l mut Lane<'m>; N] {
    match lanes.try_into() {
        Ok(array) => array,
        Err(lanes) => unreachable!("{} lanes matched as {N}", lanes.len()),
    }
}

/// One message being hashed: where its next block comes from, and its state.
struct Lane<'m> {
    parts: &'m [&'m [u8]],
    /// The part the next unhashed byte is in, and its offset there.
    part: usize,
    offset: usize,
    /// The message length in bits, for the padding.
    bits: u64,
    /// Blocks still to hash, padding included.
    blocks_left: usize,
    /// Whether the padding's 0x80 byte was placed.
    terminated: bool,
    /// A block that straddles parts or holds padding is assembled here.
    scratch: [u8; BLOCK],
    /// The hash value H0..H7.
    state: [u32; 8],
}

impl<'m> Lane<'m> {
    fn new(parts: &'m [&'m [u8]]) -> Lane<'m> {
        let len: usize = parts.iter().map(|part| part.len()).sum();
        Lane {
            parts,
            part: 0,
            offset: 0,
            bits: (len as u64).wrapping_mul(8),
            // The message, the 0x80 byte and the 8-byte length, rounded up to blocks.
            blocks_left: (len + 9).div_ceil(BLOCK),
            terminated: false,
            scratch: [0; BLOCK],
            state: INITIAL,
        }
    }

    /// The next block to hash: borrowed from a part when it lies inside one (every
    /// block of a sector record but the first and the last), else assembled.
    fn next_block(&mut self) -> &[u8; BLOCK] {
        debug_assert!(self.blocks_left > 0, "a lane hashed past its end");
        self.blocks_left -= 1;
        while self
            .parts
            .get(self.part)
            .is_some_and(|part| self.offset == part.len())
        {
            self.part += 1;
            self.offset = 0;
        }
        let inside = self
            .parts
            .get(self.part)
            .and_then(|part| part[self.offset..].first_chunk::<BLOCK>());
        if let Some(block) = inside {
            self.offset += BLOCK;
            return block;
        }
        let mut filled = 0;
        while filled < BLOCK {
            let Some(part) = self.parts.get(self.part) else {
                break;
            };
            let rest = &part[self.offset..];
            let take = rest.len().min(BLOCK - filled);
            self.scratch[filled..filled + take].copy_from_slice(&rest[..take]);
            filled += take;
            self.offset += take;
            if self.offset == part.len() {
                self.part += 1;
                self.offset = 0;
            }
        }
        if filled < BLOCK {
            // The message ended in this block: FIPS 180-4 § 5.1.1's padding.
            self.scratch[filled..].fill(0);
            if !self.terminated {
                self.scratch[filled] = 0x80;
                filled += 1;
                self.terminated = true;
            }
            if filled <= BLOCK - 8 {
                self.scratch[BLOCK - 8..].copy_from_slice(&self.bits.to_be_bytes());
            }
        }
        &self.scratch
    }

    fn digest(&self) -> [u8; 32] {
        let mut digest = [0; 32];
        for (bytes, word) in digest.chunks_exact_mut(4).zip(self.state) {
            bytes.copy_from_slice(&word.to_be_bytes());
        }
        digest
    }
}

/// Hashes `N` messages in lock step until the first of them runs out of blocks.
///
/// # Safety
/// The CPU must have SHA-NI, SSSE3 and SSE4.1 ([`available`]).
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
unsafe fn lockstep<const N: usize>(mut lanes: [&mut Lane<'_>; N]) {
    let steps = lanes.iter().map(|lane| lane.blocks_left).min().unwrap_or(0);
    // The SHA-NI state layout: ABEF and CDGH, from H0..H3 and H4..H7.
    let mut abef = [_mm_set_epi64x(0, 0); N];
    let mut cdgh = [_mm_set_epi64x(0, 0); N];
    for (lane, (abef, cdgh)) in lanes.iter().zip(abef.iter_mut().zip(cdgh.iter_mut())) {
        // SAFETY: `state` is eight u32s, so both 16-byte loads are in bounds.
        let (abcd, efgh) = unsafe {
            let words = lane.state.as_ptr().cast::<__m128i>();
            (_mm_loadu_si128(words), _mm_loadu_si128(words.add(1)))
        };
        let cdab = _mm_shuffle_epi32::<0xB1>(abcd);
        let hgfe = _mm_shuffle_epi32::<0x1B>(efgh);
        *abef = _mm_alignr_epi8::<8>(cdab, hgfe);
        *cdgh = _mm_blend_epi16::<0xF0>(hgfe, cdab);
    }
    for _ in 0..steps {
        let blocks = lanes.each_mut().map(|lane| lane.next_block());
        // SAFETY: the caller vouches for the CPU features.
        unsafe { compress(&mut abef, &mut cdgh, blocks) };
    }
    for (lane, (abef, cdgh)) in lanes.iter_mut().zip(abef.iter().zip(cdgh.iter())) {
        let feba = _mm_shuffle_epi32::<0x1B>(*abef);
        let dchg = _mm_shuffle_epi32::<0xB1>(*cdgh);
        let abcd = _mm_blend_epi16::<0xF0>(feba, dchg);
        let efgh = _mm_alignr_epi8::<8>(dchg, feba);
        // SAFETY: `state` is eight u32s, so both 16-byte stores are in bounds.
        unsafe {
            let words = lane.state.as_mut_ptr().cast::<__m128i>();
            _mm_storeu_si128(words, abcd);
            _mm_storeu_si128(words.add(1), efgh);
        }
    }
}

/// One block of each of `N` messages: the 64 rounds of each, interleaved round
/// pair by round pair, so `N` independent `sha256rnds2` chains are in flight.
///
/// # Safety
/// The CPU must have SHA-NI, SSSE3 and SSE4.1 ([`available`]).
#[inline]
#[target_feature(enable = "sha,sse2,ssse3,sse4.1")]
unsafe fn compress<const N: usize>(
    abef: &mut [__m128i; N],
    cdgh: &mut [__m128i; N],
    blocks: [&[u8; BLOCK]; N],
) {
    // Message words are big-endian; this shuffle swaps each 32-bit lane's bytes.
    let big_endian = _mm_set_epi64x(0x0c0d_0e0f_0809_0a0b, 0x0405_0607_0001_0203);
    let (start_abef, start_cdgh) = (*abef, *cdgh);
    // The schedule W, four words per vector, kept as a ring of the last 16 words.
    let mut schedule = [[_mm_set_epi64x(0, 0); 4]; N];
    for (words, block) in schedule.iter_mut().zip(blocks) {
        for (quarter, word) in words.iter_mut().enumerate() {
            // SAFETY: `block` is 64 bytes; quarter < 4 reads bytes 16q..16q+16.
            let raw = unsafe { _mm_loadu_si128(block.as_ptr().add(16 * quarter).cast()) };
            *word = _mm_shuffle_epi8(raw, big_endian);
        }
    }
    for group in 0..16 {
        // SAFETY: `K` has 64 words; group < 16 reads words 4g..4g+4.
        let constants = unsafe { _mm_loadu_si128(K.as_ptr().add(4 * group).cast()) };
        for lane in 0..N {
            let message = _mm_add_epi32(schedule[lane][group % 4], constants);
            cdgh[lane] = _mm_sha256rnds2_epu32(cdgh[lane], abef[lane], message);
            let message = _mm_shuffle_epi32::<0x0E>(message);
            abef[lane] = _mm_sha256rnds2_epu32(abef[lane], cdgh[lane], message);
        }
        if group < 12 {
            // W for rounds 4(g+4).. from the four groups before it, into the slot of
            // group g, whose rounds are done.
            for words in schedule.iter_mut() {
                let sigma0 = _mm_sha256msg1_epu32(words[group % 4], words[(group + 1) % 4]);
                let w7 = _mm_alignr_epi8::<4>(words[(group + 3) % 4], words[(group + 2) % 4]);
                words[group % 4] =
                    _mm_sha256msg2_epu32(_mm_add_epi32(sigma0, w7), words[(group + 3) % 4]);
            }
        }
    }
    for lane in 0..N {
        abef[lane] = _mm_add_epi32(abef[lane], start_abef[lane]);
        cdgh[lane] = _mm_add_epi32(cdgh[lane], start_cdgh[lane]);
    }
}
