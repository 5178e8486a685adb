//! A small, self-contained, seeded PRNG (xoshiro256** seeded through
//! splitmix64) so that sampling is reproducible across platforms and does not
//! depend on the `rand` crate's version-to-version stream changes.

/// xoshiro256** (Blackman & Vigna) whose 256-bit state is filled from a `u64`
/// seed with splitmix64, as the authors recommend.
///
/// Not cryptographically secure; it only has to be fast, well distributed and
/// bit-for-bit identical everywhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

/// One splitmix64 step: advances `state` and returns the next output.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    /// Seeds the generator. Every seed, including 0, gives a valid state:
    /// splitmix64 outputs four distinct-state values, which cannot all be zero.
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        Self { s }
    }

    /// Next 64 uniformly distributed bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in `[0, 1)` with 53 bits of precision (one `next_u64` draw).
    pub fn next_f64(&mut self) -> f64 {
        // The top 53 bits are exactly representable, so the result is < 1.
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in `[0, 1)` with 24 bits of precision (one `next_u64` draw).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_matches_reference() {
        let mut s = 0u64;
        assert_eq!(splitmix64(&mut s), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn xoshiro_matches_reference_vectors() {
        // Reference values from a straightforward Python port of the C code.
        let mut r = Rng::new(0);
        assert_eq!(r.next_u64(), 0x99ec_5f36_cb75_f2b4);
        assert_eq!(r.next_u64(), 0xbf6e_1f78_4956_452a);
        assert_eq!(r.next_u64(), 0x1a5f_849d_4933_e6e0);
        let mut r = Rng::new(42);
        assert_eq!(r.next_u64(), 0x1578_0b2e_0c2e_c716);
        assert_eq!(r.next_u64(), 0x6104_d986_6d11_3a7e);
        assert_eq!(r.next_u64(), 0xae17_5332_39e4_99a1);
    }

    #[test]
    fn same_seed_same_stream_and_clone_continues() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        let mut c = a.clone();
        assert_eq!(a.next_f64(), c.next_f64());
        assert_ne!(Rng::new(1).next_u64(), Rng::new(2).next_u64());
    }

    #[test]
    fn floats_are_in_unit_interval_and_roughly_uniform() {
        let mut r = Rng::new(3);
        let n = 20_000;
        let (mut sum64, mut sum32) = (0.0f64, 0.0f64);
        for _ in 0..n {
            let x = r.next_f64();
            let y = r.next_f32();
            assert!((0.0..1.0).contains(&x));
            assert!((0.0..1.0).contains(&y));
            sum64 += x;
            sum32 += f64::from(y);
        }
        assert!((sum64 / f64::from(n) - 0.5).abs() < 0.01);
        assert!((sum32 / f64::from(n) - 0.5).abs() < 0.01);
    }

    #[test]
    fn float_conversions_cannot_reach_one() {
        assert!(((u64::MAX >> 11) as f64 * (1.0 / (1u64 << 53) as f64)) < 1.0);
        assert!(((u64::MAX >> 40) as f32 * (1.0 / (1u32 << 24) as f32)) < 1.0);
    }
}
