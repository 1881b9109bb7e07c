//! A seeded generator (candle's CPU generator cannot be seeded): initial values, shuffling
//! and random module choice all draw from here, so a seed fixes a run. It is the client's
//! SplitMix64 (`delta_client::numeric::SplitMix`) with the draws training needs.

use delta_client::numeric::SplitMix;

/// SplitMix64 with f32 normals, bounded integers and shuffles.
#[derive(Debug, Clone)]
pub struct Rng(SplitMix);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(SplitMix(seed ^ 0x5DEE_CE66_D1CE_4E5B))
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.0.uniform()
    }

    /// 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Standard normal (f32).
    pub fn normal(&mut self) -> f32 {
        self.0.normal() as f32
    }

    /// Uniform integer below `n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.0.next_u64() % n as u64) as usize
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}
