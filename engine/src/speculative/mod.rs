//! TEMPORARY placeholder.
#[derive(Debug, thiserror::Error)]
pub enum SpeculativeError {
    #[error("x")]
    X,
}
