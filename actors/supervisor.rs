//! Supervisor: keeps the draft actor alive. A failed draft (a panic, a lost model)
//! is restarted from its checkpoint; meanwhile its sessions decode plainly, and the
//! scheduler is told of the new actor so that sessions catch the draft up. After too
//! many failures the draft is given up and every session stays on plain decoding.

use std::sync::Arc;

use falconer_engine::error::LoadError;
use falconer_engine::{Backend, Falcon};
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::draft::{DraftActor, DraftArgs, DraftMsg};
use crate::scheduler::SchedulerMsg;

/// Builds a fresh draft model (reloads the checkpoint).
pub type DraftFactory<B> = Arc<dyn Fn() -> Result<Falcon<B>, LoadError> + Send + Sync>;

/// Messages of the supervisor.
#[derive(Debug)]
pub enum SupervisorMsg {
    /// Where to announce restarts.
    SetScheduler(ActorRef<SchedulerMsg>),
    /// The current draft actor.
    Draft(ractor::RpcReplyPort<Option<ActorRef<DraftMsg>>>),
}

/// The actor.
#[derive(Debug)]
pub struct Supervisor<B>(std::marker::PhantomData<fn() -> B>);

impl<B> Default for Supervisor<B> {
    fn default() -> Self {
        Supervisor(std::marker::PhantomData)
    }
}

/// The first draft model, how to make another, and a test hook.
pub struct SupervisorArgs<B: Backend> {
    pub first: Falcon<B>,
    pub factory: DraftFactory<B>,
    pub panic_after: Option<usize>,
    pub max_restarts: usize,
}

impl<B: Backend> std::fmt::Debug for SupervisorArgs<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupervisorArgs")
            .field("max_restarts", &self.max_restarts)
            .finish()
    }
}

pub struct SupervisorState<B: Backend> {
    factory: DraftFactory<B>,
    draft: Option<ActorRef<DraftMsg>>,
    scheduler: Option<ActorRef<SchedulerMsg>>,
    restarts: usize,
    max_restarts: usize,
}

impl<B: Backend> std::fmt::Debug for SupervisorState<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupervisorState")
            .field("restarts", &self.restarts)
            .finish()
    }
}

async fn spawn_draft<B: Backend>(
    model: Falcon<B>,
    panic_after: Option<usize>,
    me: ActorCell,
) -> Result<ActorRef<DraftMsg>, ActorProcessingErr> {
    let (r, _) = Actor::spawn_linked(
        None,
        DraftActor::<B>::default(),
        DraftArgs { model, panic_after },
        me,
    )
    .await?;
    Ok(r)
}

impl<B: Backend> Actor for Supervisor<B> {
    type Msg = SupervisorMsg;
    type State = SupervisorState<B>;
    type Arguments = SupervisorArgs<B>;

    async fn pre_start(
        &self,
        me: ActorRef<SupervisorMsg>,
        a: SupervisorArgs<B>,
    ) -> Result<SupervisorState<B>, ActorProcessingErr> {
        let draft = spawn_draft(a.first, a.panic_after, me.get_cell()).await?;
        Ok(SupervisorState {
            factory: a.factory,
            draft: Some(draft),
            scheduler: None,
            restarts: 0,
            max_restarts: a.max_restarts,
        })
    }

    async fn handle(
        &self,
        _me: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        st: &mut SupervisorState<B>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::SetScheduler(s) => st.scheduler = Some(s),
            SupervisorMsg::Draft(reply) => {
                let _ = reply.send(st.draft.clone());
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        st: &mut SupervisorState<B>,
    ) -> Result<(), ActorProcessingErr> {
        let failed = match &evt {
            SupervisionEvent::ActorFailed(who, _) => Some(who.get_id()),
            SupervisionEvent::ActorTerminated(who, _, _) => Some(who.get_id()),
            _ => None,
        };
        let is_draft = failed.is_some() && st.draft.as_ref().map(|d| d.get_id()) == failed;
        if !is_draft {
            return Ok(());
        }
        st.draft = None;
        let replacement = if st.restarts < st.max_restarts {
            st.restarts += 1;
            let factory = Arc::clone(&st.factory);
            match tokio::task::spawn_blocking(move || factory()).await {
                Ok(Ok(model)) => spawn_draft(model, None, me.get_cell()).await.ok(),
                _ => None,
            }
        } else {
            None
        };
        st.draft = replacement.clone();
        if let Some(s) = &st.scheduler {
            let _ = s.cast(SchedulerMsg::DraftRestarted(replacement));
        }
        Ok(())
    }
}
