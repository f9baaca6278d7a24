//! Frees applied batches away from the apply path.
//!
//! A batch's events are thousands of small allocations (every value and column name
//! of every row): freeing them took a tenth of duplex's CPU in a catch-up, on the
//! worker's path between two batches, while the target waited. The worker hands each
//! batch it is done with to [`Reclaim::give`], and a task of its own frees it while
//! the next batch is written.

use tokio::sync::mpsc;
use tracing::Instrument;

/// Batches waiting to be freed, at most: beyond that the worker frees them itself,
/// so memory stays bounded.
const QUEUED_BATCHES: usize = 1;

/// The sending side of a direction's reclaim task. The task ends when this is
/// dropped (its channel closes), after freeing what it was given.
pub(super) struct Reclaim<T: Send + 'static> {
    tx: mpsc::Sender<Vec<T>>,
    _task: tokio::task::JoinHandle<()>,
}

impl<T: Send + 'static> Reclaim<T> {
    /// Starts the task, named after `direction`. Must be called within the runtime.
    pub(super) fn start(direction: &str) -> Reclaim<T> {
        let (tx, mut rx) = mpsc::channel::<Vec<T>>(QUEUED_BATCHES);
        let span = tracing::info_span!("apply_reclaim", direction = %direction);
        let task = tokio::spawn(
            async move {
                while let Some(batch) = rx.recv().await {
                    drop(batch);
                }
            }
            .instrument(span),
        );
        Reclaim { tx, _task: task }
    }

    /// Frees `batch` on the task, or here when the task is behind.
    pub(super) fn give(&self, batch: Vec<T>) {
        if batch.is_empty() {
            return;
        }
        if let Err(full) = self.tx.try_send(batch) {
            drop(full.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn every_batch_given_is_freed_even_when_the_task_is_behind() {
        let freed = Arc::new(AtomicUsize::new(0));
        let reclaim = Reclaim::start("a_to_b");
        for _ in 0..10 {
            reclaim.give((0..100).map(|_| Counted(freed.clone())).collect());
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while freed.load(Ordering::SeqCst) < 1000 {
            assert!(std::time::Instant::now() < deadline, "{:?}", freed);
            tokio::task::yield_now().await;
        }
        assert_eq!(freed.load(Ordering::SeqCst), 1000);
    }
}
