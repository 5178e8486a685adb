//! TEMPORARY placeholder.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("x")]
    X,
}
