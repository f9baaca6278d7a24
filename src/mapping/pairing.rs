//! Pairing a batch's new rows: the rows of one mapped table whose source key has no
//! pairing on the target yet get a target key (derived, matched or numbered, see
//! [`PairMap::new_keys`]), recorded in the batch's transaction.
//!
//! An entity deleted and made again on the source (a user who signs up again with the
//! same email) comes back under a new source key but, when its key is derived from
//! the natural key, under the same target key. So several source keys of one batch
//! may claim one target key: every one of them maps to it (their events are that
//! row's history, in order), and the last one holds the pairing. A pairing of that
//! target key to an earlier source key is released when that source row is deleted
//! in the batch or the target row is gone. Otherwise another live row holds the key
//! (the natural key moved to it on the source): the newcomer then gets, on a node that
//! derives keys, a key of its own ([`PairMap::fallback_key`]), and is a bad event
//! only on a node that numbers them, where a number is never another row's.

use super::keys::Pairings;
use super::pair::PairMap;
use super::{MapError, Outcome};
use crate::event::{ChangeEvent, Op, Row};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};

/// How many other keys a new row whose key is another live row's may try (see
/// [`PairMap::fallback_key`]): the first, made from its own source key, is free in
/// practice.
const FALLBACKS: u32 = 3;

/// Pairs the new rows among `events[mine]` (the events of `p`'s source table).
pub(super) async fn pair_new_rows(
    p: &PairMap,
    pairings: &Pairings<'_>,
    events: &[Cow<'_, ChangeEvent>],
    mine: &[usize],
    known: &mut HashMap<(String, String), String>,
    outcomes: &mut [Outcome],
) -> Result<(), MapError> {
    let label = &p.label;
    let is_known = |known: &HashMap<(String, String), String>, k: &String| {
        known.contains_key(&(label.clone(), k.clone()))
    };
    // The first image of each new source key, in batch order.
    let mut new: Vec<(usize, String)> = Vec::new();
    let mut seen = HashSet::new();
    let mut deleted_sources = HashSet::new();
    for &i in mine {
        let ev = &events[i];
        let Some(k) = p.source_key_of(ev) else {
            continue;
        };
        if ev.op == Op::Delete {
            deleted_sources.insert(k);
            continue;
        }
        if outcomes[i] == Outcome::Keep
            && ev.after.is_some()
            && !is_known(known, &k)
            && seen.insert(k.clone())
        {
            new.push((i, k));
        }
    }
    if new.is_empty() {
        return Ok(());
    }
    // Rows this batch deletes are no match for a new row.
    let deleting: HashSet<String> = deleted_sources
        .iter()
        .filter_map(|k| known.get(&(label.clone(), k.clone())).cloned())
        .collect();
    let rows: Vec<(&str, &Row)> = new
        .iter()
        .filter_map(|(i, k)| events[*i].after.as_ref().map(|r| (k.as_str(), r)))
        .collect();
    let made = p.new_keys(pairings, &rows, &deleting).await?;
    // Target key → its source keys in batch order; the last holds the pairing.
    let mut claims: HashMap<String, Vec<(usize, String)>> = HashMap::new();
    let mut order = Vec::new();
    for ((i, k), made) in new.iter().zip(made) {
        match made {
            Ok(t) => {
                if !claims.contains_key(&t) {
                    order.push(t.clone());
                }
                claims.entry(t).or_default().push((*i, k.clone()));
            }
            Err(reason) => outcomes[*i] = Outcome::Bad(reason),
        }
    }
    for attempt in 0..=FALLBACKS {
        if order.is_empty() {
            break;
        }
        release(p, pairings, &order, &deleted_sources).await?;
        let pairs: Vec<(String, String)> = order
            .iter()
            .filter_map(|t| claims[t].last().map(|(_, s)| (s.clone(), t.clone())))
            .collect();
        pairings.insert(label, &pairs).await?;
        // What holds now: a pairing learned meanwhile, or a live row's, wins.
        let holders: Vec<String> = pairs.iter().map(|(s, _)| s.clone()).collect();
        let stored = pairings.lookup(label, &holders).await?;
        let mut again: HashMap<String, Vec<(usize, String)>> = HashMap::new();
        let mut again_order = Vec::new();
        for t in &order {
            let claimants = &claims[t];
            let (at, holder) = claimants.last().expect("claimed");
            if let Some(st) = stored.get(holder) {
                for (_, s) in claimants {
                    known.insert((label.clone(), s.clone()), st.clone());
                }
                continue;
            }
            // The key is another live row's: the claimants take a key of their own.
            let other = (attempt < FALLBACKS)
                .then(|| events[*at].after.as_ref())
                .flatten()
                .and_then(|row| p.fallback_key(row, holder, attempt));
            match other {
                Some(Ok(f)) => {
                    tracing::info!(table = %label, key = %holder, taken = %t, instead = %f,
                        "the derived key is another live row's (its natural key moved there): the new row gets a key of its own");
                    if !again.contains_key(&f) {
                        again_order.push(f.clone());
                    }
                    again
                        .entry(f)
                        .or_default()
                        .extend(claimants.iter().cloned());
                }
                Some(Err(reason)) => {
                    for (i, _) in claimants {
                        outcomes[*i] = Outcome::Bad(reason.clone());
                    }
                }
                None => {
                    tracing::warn!(table = %label, key = %holder, target = %t,
                        "key pairing not stored: the target key is paired with another source key whose row exists");
                    for (i, s) in claimants {
                        outcomes[*i] = Outcome::Bad(format!(
                            "{} key {s} would be {t} on the target, which is paired with another live row",
                            p.source_table
                        ));
                    }
                }
            }
        }
        (claims, order) = (again, again_order);
    }
    Ok(())
}

/// Releases the pairings of `targets` held by source keys other than their new
/// claimants when the holder is deleted in this batch or the target row is gone.
async fn release(
    p: &PairMap,
    pairings: &Pairings<'_>,
    targets: &[String],
    deleted_sources: &HashSet<String>,
) -> Result<(), MapError> {
    let table = p.target_table_sql();
    pairings
        .release_stale(&p.label, targets, &table, &p.target_key)
        .await?;
    let deleted: Vec<String> = deleted_sources.iter().cloned().collect();
    pairings
        .release_sources(&p.label, targets, &deleted)
        .await?;
    Ok(())
}
