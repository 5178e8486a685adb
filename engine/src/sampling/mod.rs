//! TEMPORARY placeholder until the sampling module lands.
#[derive(Debug, thiserror::Error)]
pub enum SamplingError {
    #[error("x")]
    EmptyLogits,
}
pub fn argmax(l: &[f32]) -> u32 {
    let mut b = 0;
    for (i, v) in l.iter().enumerate() {
        if *v > l[b] {
            b = i;
        }
    }
    b as u32
}
