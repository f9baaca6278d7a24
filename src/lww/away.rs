//! Waits of a writer's work on something other than its node (the dead-letter
//! producer, the broker), marked so that whoever watches the node's server process
//! does not take an idle session there for a stalled one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Marks the waits of an apply session's work on something other than the target,
/// shared by the session's writer and the watchdog that looks at its server process
/// (`apply::watchdog`).
#[derive(Debug, Clone, Default)]
pub struct Away(Arc<AtomicUsize>);

impl Away {
    /// The work waits elsewhere until the returned guard is dropped.
    pub fn enter(&self) -> AwayGuard {
        self.0.fetch_add(1, Ordering::SeqCst);
        AwayGuard(self.0.clone())
    }

    /// Whether the work is waiting elsewhere right now.
    pub fn now(&self) -> bool {
        self.0.load(Ordering::SeqCst) > 0
    }
}

/// See [`Away::enter`].
pub struct AwayGuard(Arc<AtomicUsize>);

impl Drop for AwayGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
