//! Shutdown signalling.
//!
//! Two stages, because draining and abandoning are different promises:
//! - **stop intake**: SIGTERM/SIGINT arrived; sources stop reading, the pipeline finishes
//!   what it already holds;
//! - **abandon**: the grace period ran out (or a second signal arrived); retry loops give up,
//!   unfinished work is dropped *without* being acknowledged, so it is redelivered next start.
//!
//! Both are `watch` channels so any number of tasks can wait on them, and a test can drive them
//! without sending a real signal.

use tokio::sync::watch;

/// The sending half: held by `main` (or a test).
#[derive(Debug)]
pub struct ShutdownTrigger {
    stop_intake: watch::Sender<bool>,
    abandon: watch::Sender<bool>,
}

/// A cheap, cloneable handle every task waits on.
#[derive(Debug, Clone)]
pub struct Shutdown {
    stop_intake: watch::Receiver<bool>,
    abandon: watch::Receiver<bool>,
}

/// Creates a connected trigger and handle.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (stop_tx, stop_rx) = watch::channel(false);
    let (abandon_tx, abandon_rx) = watch::channel(false);
    (
        ShutdownTrigger { stop_intake: stop_tx, abandon: abandon_tx },
        Shutdown { stop_intake: stop_rx, abandon: abandon_rx },
    )
}

impl ShutdownTrigger {
    /// Stage one: stop reading new input, drain what is in flight.
    pub fn stop_intake(&self) {
        self.stop_intake.send_replace(true);
    }

    /// Stage two: stop retrying, drop unfinished work unacknowledged. Implies stage one.
    pub fn abandon(&self) {
        self.stop_intake.send_replace(true);
        self.abandon.send_replace(true);
    }

    /// A handle for tasks started after the trigger was made.
    pub fn subscribe(&self) -> Shutdown {
        Shutdown { stop_intake: self.stop_intake.subscribe(), abandon: self.abandon.subscribe() }
    }
}

impl Shutdown {
    /// A handle that never fires: for `explain`, tools and tests that do not shut down.
    pub fn never() -> Shutdown {
        let (trigger, shutdown) = channel();
        // Keep the senders alive forever so the receivers never see a closed channel.
        std::mem::forget(trigger);
        shutdown
    }

    pub fn is_stopping(&self) -> bool {
        *self.stop_intake.borrow()
    }

    pub fn is_abandoned(&self) -> bool {
        *self.abandon.borrow()
    }

    /// Resolves once intake must stop. Also resolves if the trigger is dropped, since nobody can
    /// then ask for a clean stop any more.
    pub async fn stopping(&self) {
        let mut rx = self.stop_intake.clone();
        let _ = rx.wait_for(|v| *v).await;
    }

    /// Resolves once unfinished work must be abandoned.
    pub async fn abandoned(&self) {
        let mut rx = self.abandon.clone();
        let _ = rx.wait_for(|v| *v).await;
    }
}

/// Turns SIGTERM/SIGINT into the two stages: the first signal stops intake and starts the grace
/// period, after which (or at a second signal) in-flight work is abandoned. Returns once
/// abandoning is decided or `done` resolves (the daemon finished draining by itself).
pub async fn on_signals(
    trigger: ShutdownTrigger,
    grace: std::time::Duration,
    done: impl std::future::Future<Output = ()>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        done.await;
        return;
    };
    tokio::pin!(done);
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: draining (grace {grace:?})"),
        _ = int.recv() => tracing::info!("SIGINT: draining (grace {grace:?})"),
        _ = &mut done => return,
    }
    trigger.stop_intake();
    tokio::select! {
        _ = tokio::time::sleep(grace) => tracing::warn!("grace period over: abandoning in-flight work"),
        _ = term.recv() => tracing::warn!("second signal: abandoning in-flight work"),
        _ = int.recv() => tracing::warn!("second signal: abandoning in-flight work"),
        _ = &mut done => return,
    }
    trigger.abandon();
    done.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn abandon_implies_stop_intake() {
        let (trigger, shutdown) = channel();
        assert!(!shutdown.is_stopping());
        trigger.abandon();
        shutdown.stopping().await;
        shutdown.abandoned().await;
        assert!(shutdown.is_stopping() && shutdown.is_abandoned());
    }

    #[tokio::test]
    async fn stop_intake_does_not_abandon() {
        let (trigger, shutdown) = channel();
        trigger.stop_intake();
        shutdown.stopping().await;
        assert!(!shutdown.is_abandoned());
    }
}
