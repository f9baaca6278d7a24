//! Readiness: which components are up, on standby or down, for `/readyz` and the
//! instance metrics. Readiness is not a metric; the gauges only mirror it.

use super::names::*;
use metrics::Gauge;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// What a component is doing, for `/readyz` and the instance metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComponentState {
    /// Connecting, failed, halted or stopped.
    Down,
    /// Waiting while another instance does its work.
    Standby,
    Up,
}

/// What the instance does, when it is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Every component works here.
    Active,
    /// Every component waits for another instance.
    Standby,
    /// Some components work here, the others in another instance.
    Shared,
}

/// Which components are up, for `/readyz` and [`INSTANCE_ACTIVE`].
#[derive(Default, Clone)]
pub struct Health {
    components: Arc<Mutex<BTreeMap<String, (ComponentState, Gauge)>>>,
}

impl Health {
    /// Declares a component that must be up (or standing by) for readiness.
    pub fn register(&self, name: &str) {
        self.set_state(name, ComponentState::Down);
    }

    pub fn set(&self, name: &str, up: bool) {
        let state = if up {
            ComponentState::Up
        } else {
            ComponentState::Down
        };
        self.set_state(name, state);
    }

    pub fn set_state(&self, name: &str, state: ComponentState) {
        let Ok(mut m) = self.components.lock() else {
            return;
        };
        let entry = m.entry(name.to_string()).or_insert_with(|| {
            let g = metrics::gauge!(INSTANCE_COMPONENT_ACTIVE, "component" => name.to_string());
            (state, g)
        });
        entry.0 = state;
        entry.1.set(if state == ComponentState::Up {
            1.0
        } else {
            0.0
        });
        let all_up = m.values().all(|(s, _)| *s == ComponentState::Up);
        metrics::gauge!(INSTANCE_ACTIVE).set(if all_up { 1.0 } else { 0.0 });
    }

    /// Ready when every registered component is up or standing by, with the instance's
    /// role; otherwise lists the components that are down.
    pub fn readiness(&self) -> Result<Role, Vec<String>> {
        let m = self
            .components
            .lock()
            .map_err(|_| vec!["health".to_string()])?;
        let down: Vec<String> = m
            .iter()
            .filter(|(_, (s, _))| *s == ComponentState::Down)
            .map(|(n, _)| n.clone())
            .collect();
        if !down.is_empty() {
            return Err(down);
        }
        let standby = m
            .values()
            .filter(|(s, _)| *s == ComponentState::Standby)
            .count();
        Ok(match standby {
            0 => Role::Active,
            n if n == m.len() => Role::Standby,
            _ => Role::Shared,
        })
    }
}
