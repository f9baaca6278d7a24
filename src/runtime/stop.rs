//! Stopping, passed in rather than global: whoever starts components (`duplex run`,
//! `duplex snapshot`) makes one [`StopHandle`] and gives each component a [`Stop`].
//! A stop asks every component to finish cleanly (a capture drains what is in flight,
//! an apply commits what forms whole source transactions); an abort is a stop after
//! which appliers roll back what they hold instead, because a component found that
//! continuing could apply wrong data (a broker lost acknowledged messages).
//!
//! The signal is level-triggered: a component that asks after the stop was requested
//! sees it at once, and a handle dropped without stopping counts as a stop, so a
//! component can never wait for a signal nobody is left to send.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::watch;

/// A component's view of the stop: cheap to clone, one per task.
#[derive(Clone, Debug)]
pub struct Stop {
    requested: watch::Receiver<bool>,
    aborted: Arc<AtomicBool>,
}

/// What stops the components holding a [`Stop`] of the same pair.
#[derive(Clone, Debug)]
pub struct StopHandle {
    requested: Arc<watch::Sender<bool>>,
    aborted: Arc<AtomicBool>,
}

/// A handle and the [`Stop`] it controls; clone the `Stop` into each component.
pub fn pair() -> (StopHandle, Stop) {
    let (tx, rx) = watch::channel(false);
    let aborted = Arc::new(AtomicBool::new(false));
    let handle = StopHandle {
        requested: Arc::new(tx),
        aborted: aborted.clone(),
    };
    (
        handle,
        Stop {
            requested: rx,
            aborted,
        },
    )
}

impl StopHandle {
    /// Asks every component to stop cleanly. Idempotent.
    pub fn stop(&self) {
        self.requested.send_replace(true);
    }

    /// Stops every component without finishing what it holds. The flag is set before
    /// the stop is sent, so no component that sees the stop misses the abort.
    pub fn abort(&self) {
        self.aborted.store(true, Ordering::SeqCst);
        self.stop();
    }
}

impl Stop {
    /// Resolves once a stop was requested (at once if it already was), or when every
    /// handle is gone.
    pub async fn requested(&self) {
        let mut rx = self.requested.clone();
        // An error means every handle was dropped: nobody can stop us any more, so stop.
        let _ = rx.wait_for(|stop| *stop).await;
    }

    /// Whether the stop is an abort: roll back what is held instead of finishing it.
    pub fn aborted(&self) -> bool {
        self.aborted.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn resolves(stop: &Stop) -> bool {
        tokio::time::timeout(Duration::from_millis(50), stop.requested())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_stop_reaches_every_clone_even_those_asking_late() {
        let (handle, stop) = pair();
        let other = stop.clone();
        assert!(!resolves(&stop).await);
        handle.stop();
        assert!(resolves(&stop).await);
        // Asked again after it was seen: still stopped (level, not edge).
        assert!(resolves(&stop).await);
        assert!(resolves(&other).await);
        assert!(!other.aborted());
    }

    #[tokio::test]
    async fn an_abort_is_a_stop_that_every_component_sees_as_an_abort() {
        let (handle, stop) = pair();
        let aborter = handle.clone();
        aborter.abort();
        assert!(resolves(&stop).await);
        assert!(stop.aborted());
        // A clean stop after it does not clear the abort.
        handle.stop();
        assert!(stop.aborted());
    }

    #[tokio::test]
    async fn a_dropped_handle_stops_rather_than_leave_components_waiting() {
        let (handle, stop) = pair();
        drop(handle);
        assert!(resolves(&stop).await);
        assert!(!stop.aborted());
    }

    #[tokio::test]
    async fn pairs_are_independent() {
        let (first, stop_first) = pair();
        let (_second, stop_second) = pair();
        first.abort();
        assert!(stop_first.aborted());
        assert!(!stop_second.aborted());
        assert!(!resolves(&stop_second).await);
    }
}
