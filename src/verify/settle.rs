//! Telling a persisting difference from a change in flight: each differing key is
//! read again every [`RECHECK_EVERY`] until it has stayed the same for the settle
//! window (it persists: reported with how long it lasted) or has gone (it was in
//! flight). A key that is still changing when verify gives up on it is not dropped:
//! it is reported as unsettled, with what differed at the last look. A hot row
//! (a counter, a `last_seen`) whose other column never reaches the peer changes at
//! every look and would otherwise pass for equal.
//!
//! The settle window ([`window`]) is `--settle-ms` plus the lag of the directions
//! that are applying; a halted or stopped direction's lag is not waited for (nothing
//! is in flight there), and the lag is capped at [`MAX_LAG_WAIT`]; the report says
//! when either happened.

use super::compare::{self, Difference, Pair};
use super::mapped::{self, MappedTable};
use super::VerifyError;
use crate::pg::node::NodeError;
use crate::pg::state::directions::DirectionState;
use crate::snapshot::table::CopyTable;
use crate::status::DirectionStatus;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How often a difference is read again while it settles.
const RECHECK_EVERY: Duration = Duration::from_millis(500);

/// The longest lag verify waits for: past it, a day-long backlog would make verify
/// wait a day before reporting anything.
pub(crate) const MAX_LAG_WAIT: Duration = Duration::from_secs(300);

/// Keys with their difference and how long it was watched, in seconds.
pub(crate) type Watched = BTreeMap<Vec<String>, (Difference, f64)>;

/// What the watch found.
#[derive(Debug, Default)]
pub(crate) struct Settled {
    /// Unchanged for the whole window.
    pub persisting: Watched,
    /// Different at every look, but never the same for the window until verify gave
    /// up: the difference at the last look, and how long the key was watched.
    pub unsettled: Watched,
}

/// The settle window for `settle` and the directions' status, and what the report
/// should say about it.
pub(crate) fn window(settle: Duration, directions: &[DirectionStatus]) -> (Duration, Vec<String>) {
    let mut notes = Vec::new();
    let mut lag = 0.0_f64;
    for d in directions {
        let Some(l) = d.lag_seconds else { continue };
        if d.state == DirectionState::Running {
            lag = lag.max(l);
        } else if l > 0.0 {
            notes.push(format!(
                "{} is {}{}: its lag of {l:.1} s is not waited for, so a change it has not applied yet shows as a difference",
                d.direction,
                d.state.as_str(),
                d.reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ));
        }
    }
    let cap = MAX_LAG_WAIT.as_secs_f64();
    if lag > cap {
        notes.push(format!(
            "the directions' lag of {lag:.1} s is longer than verify waits ({cap:.0} s): a difference younger than the lag may be a change still in flight"
        ));
        lag = cap;
    }
    (settle + Duration::from_secs_f64(lag), notes)
}

/// One key being watched: its difference, since when it has looked the same, and
/// how it looked (`None`: not read again yet).
struct Open<S> {
    diff: Difference,
    since: Instant,
    state: Option<S>,
}

/// The bookkeeping shared by both kinds of table.
struct Watch<S> {
    started: Instant,
    window: Duration,
    give_up: Duration,
    open: BTreeMap<Vec<String>, Open<S>>,
    persisting: Watched,
}

impl<S: PartialEq> Watch<S> {
    fn new(
        found: impl IntoIterator<Item = (Vec<String>, Difference, Option<S>)>,
        window: Duration,
    ) -> Self {
        let started = Instant::now();
        Watch {
            started,
            window,
            // A key written without pause never settles; stop reading it after this.
            give_up: window * 10 + Duration::from_secs(10),
            open: found
                .into_iter()
                .map(|(k, diff, state)| {
                    let open = Open {
                        diff,
                        since: started,
                        state,
                    };
                    (k, open)
                })
                .collect(),
            persisting: Watched::new(),
        }
    }

    fn going_on(&self) -> bool {
        !self.open.is_empty() && self.started.elapsed() < self.give_up
    }

    fn keys(&self) -> Vec<Vec<String>> {
        self.open.keys().cloned().collect()
    }

    /// The key no longer differs: it was in flight.
    fn gone(&mut self, key: &[String]) {
        self.open.remove(key);
    }

    /// The key differs as `diff`, looking like `state`.
    fn seen(&mut self, key: &[String], diff: Difference, state: S) {
        let Some(entry) = self.open.get_mut(key) else {
            return;
        };
        if entry.state.as_ref() != Some(&state) {
            // The first look only records it; a change starts the window again.
            if entry.state.is_some() {
                entry.since = Instant::now();
            }
            entry.state = Some(state);
        }
        entry.diff = diff;
        if entry.since.elapsed() >= self.window {
            if let Some(o) = self.open.remove(key) {
                self.persisting
                    .insert(key.to_vec(), (o.diff, o.since.elapsed().as_secs_f64()));
            }
        }
    }

    async fn pause(&self) {
        if !self.open.is_empty() {
            tokio::time::sleep(RECHECK_EVERY).await;
        }
    }

    fn finish(self) -> Settled {
        let watched = self.started.elapsed().as_secs_f64();
        Settled {
            persisting: self.persisting,
            unsettled: self
                .open
                .into_iter()
                .map(|(k, o)| (k, (o.diff, watched)))
                .collect(),
        }
    }
}

/// Both nodes' column texts of a key (`None`: no row).
type RowState = (Option<Vec<Option<String>>>, Option<Vec<Option<String>>>);

/// Watches the differing keys of `t` until each persists, goes or verify gives up.
pub(crate) async fn differences(
    pair: &Pair<'_>,
    t: &CopyTable,
    found: BTreeMap<Vec<String>, Difference>,
    window: Duration,
) -> Result<Settled, NodeError> {
    let mut watch: Watch<RowState> =
        Watch::new(found.into_iter().map(|(k, d)| (k, d, None)), window);
    while watch.going_on() {
        let keys = watch.keys();
        let (ra, rb) = compare::rows_of(pair, t, &keys).await?;
        for key in keys {
            let (a, b) = (ra.get_key_value(&key), rb.get_key_value(&key));
            let one = |side: Option<(&Vec<String>, &Vec<Option<String>>)>| -> compare::Rows {
                side.map(|(k, v)| (k.clone(), v.clone()))
                    .into_iter()
                    .collect()
            };
            match compare::diff(t, &one(a), &one(b)).into_iter().next() {
                None => watch.gone(&key),
                Some((_, d)) => {
                    let state = (a.map(|(_, v)| v.clone()), b.map(|(_, v)| v.clone()));
                    watch.seen(&key, d, state);
                }
            }
        }
        watch.pause().await;
    }
    Ok(watch.finish())
}

/// [`differences`] for a mapped table: a difference persists once it has kept its
/// kind (and differing columns) for `window`.
pub(crate) async fn mapped_differences(
    pair: &Pair<'_>,
    m: &MappedTable,
    found: &BTreeMap<Vec<String>, Difference>,
    window: Duration,
) -> Result<Settled, VerifyError> {
    let mut watch: Watch<Difference> = Watch::new(
        found
            .iter()
            .map(|(k, d)| (k.clone(), d.clone(), Some(d.clone()))),
        window,
    );
    while watch.going_on() {
        let keys = watch.keys();
        let kinds: BTreeMap<Vec<String>, Difference> = watch
            .open
            .iter()
            .map(|(k, o)| (k.clone(), o.diff.clone()))
            .collect();
        let now = mapped::recheck(pair, m, &keys, &kinds).await?;
        for key in keys {
            match now.get(&key) {
                None => watch.gone(&key),
                Some(d) => watch.seen(&key, d.clone(), d.clone()),
            }
        }
        watch.pause().await;
    }
    Ok(watch.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direction(name: &str, state: DirectionState, lag: Option<f64>) -> DirectionStatus {
        DirectionStatus {
            direction: name.into(),
            state,
            reason: (state == DirectionState::Halted).then(|| "a bad event".into()),
            since: None,
            connected: state == DirectionState::Running,
            last_applied_commit: None,
            lag_seconds: lag,
            lag_bytes: None,
            kafka_lag_messages: None,
            conflicts: 0,
            dead_letters_pending: 0,
            snapshot: Vec::new(),
            owed_columns: Vec::new(),
        }
    }

    #[test]
    fn the_window_waits_for_applying_directions_only_and_at_most_the_cap() {
        let settle = Duration::from_secs(2);
        let running = direction("a_to_b", DirectionState::Running, Some(3.0));
        let halted = direction("b_to_a", DirectionState::Halted, Some(86_400.0));
        let (w, notes) = window(settle, &[running, halted]);
        assert_eq!(w, Duration::from_secs(5));
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(
            notes[0].starts_with(
                "b_to_a is halted (a bad event): its lag of 86400.0 s is not waited for"
            ),
            "{notes:?}"
        );
        let behind = direction("a_to_b", DirectionState::Running, Some(7_200.0));
        let (w, notes) = window(settle, &[behind]);
        assert_eq!(w, settle + MAX_LAG_WAIT);
        assert!(notes[0].contains("lag of 7200.0 s is longer than verify waits (300 s)"));
        let caught_up = direction("a_to_b", DirectionState::Stopped, Some(0.0));
        let unknown = direction("b_to_a", DirectionState::NeverStarted, None);
        assert_eq!(window(settle, &[caught_up, unknown]), (settle, Vec::new()));
    }

    #[tokio::test]
    async fn a_key_still_changing_when_the_watch_ends_is_unsettled_not_dropped() {
        let k = |s: &str| vec![s.to_string()];
        let diff = Difference::Mismatched(vec!["body".into()]);
        let mut w: Watch<u32> = Watch::new(
            [
                (k("hot"), diff.clone(), None),
                (k("stale"), diff.clone(), None),
                (k("gone"), diff.clone(), None),
            ],
            Duration::from_millis(50),
        );
        for look in 0..5 {
            w.seen(&k("hot"), diff.clone(), look);
            w.seen(&k("stale"), diff.clone(), 0);
            w.gone(&k("gone"));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let s = w.finish();
        assert_eq!(s.persisting.keys().collect::<Vec<_>>(), [&k("stale")]);
        assert_eq!(s.unsettled.keys().collect::<Vec<_>>(), [&k("hot")]);
        assert_eq!(s.unsettled[&k("hot")].0, diff);
    }
}
