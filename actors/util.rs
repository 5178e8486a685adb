//! Small helpers shared by the actors.

use ractor::rpc::CallResult;
use ractor::{ActorRef, RpcReplyPort};

use crate::error::RuntimeError;

/// Sends a request and awaits its reply; a dead actor is `RuntimeError::ShutDown`.
pub(crate) async fn ask<M, T>(
    actor: &ActorRef<M>,
    msg: impl FnOnce(RpcReplyPort<T>) -> M,
) -> Result<T, RuntimeError>
where
    M: ractor::Message,
    T: Send + 'static,
{
    match actor.call(msg, None).await {
        Ok(CallResult::Success(t)) => Ok(t),
        Ok(_) | Err(_) => Err(RuntimeError::ShutDown),
    }
}
