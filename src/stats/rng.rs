//! SplitMix64 (Steele, Lea and Flood 2014; Vigna's reference code): the seeded generator of
//! the bootstrap. Written out here, not taken from `rand`, because `rand` does not promise
//! the same stream across versions and a report must give the same CI for the same input.

/// SplitMix64: a 64-bit state advanced by the golden-ratio increment, output through
/// Stafford's "Mix13" finalizer. Passes BigCrush; more than enough for drawing indices.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator whose stream is fixed by `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in 0..n (n > 0) by Lemire's multiply-shift: the high 64 bits of a 64x64-bit
    /// product. Its bias is below n / 2^64 (under 1e-16 for any test set), which no
    /// resampling can see, and it needs no loop.
    pub fn below(&mut self, n: usize) -> usize {
        ((u128::from(self.next_u64()) * n as u128) >> 64) as usize
    }

    /// A number in [0, 1) with 53 random bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_stream() {
        // The published test vector (Rosetta Code, "Pseudo-random numbers/Splitmix64"):
        // seed 1234567.
        let mut r = SplitMix64::new(1_234_567);
        assert_eq!(r.next_u64(), 6_457_827_717_110_365_317);
        assert_eq!(r.next_u64(), 3_203_168_211_198_807_973);
        assert_eq!(r.next_u64(), 9_817_491_932_198_370_423);
    }
}
