//! Whether the roles of this process are ready to do their work, as the operations listener's
//! `GET /readyz` and the gauge `landslide_ready{role}` report it.
//!
//! A role registers a [`Condition`] for each thing it waits on (its startup, a stream that went
//! backwards), marks it ready or not ready with the reason, and drops it when it stops. The
//! process is ready when every registered condition is. One registry serves the whole process,
//! like the Prometheus registry: `landslide up` runs three roles behind one operations listener.
//!
//! Readiness never stops a role: a role that is not ready keeps trying, and says why here, in its
//! log and in the gauge. Exiting on a slow broker or database would turn an outage into a crash
//! that nothing restarts (the reliability harness found a worker that did).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};

use axum::http::StatusCode;

/// One thing a role waits on, registered until dropped. Starts not ready.
#[derive(Debug)]
pub struct Condition {
    id: u64,
    role: &'static str,
}

#[derive(Debug)]
struct Entry {
    role: &'static str,
    concern: &'static str,
    /// `None` when ready, else why not.
    not_ready: Option<String>,
}

fn registry() -> MutexGuard<'static, BTreeMap<u64, Entry>> {
    static REGISTRY: OnceLock<Mutex<BTreeMap<u64, Entry>>> = OnceLock::new();
    REGISTRY
        .get_or_init(Mutex::default)
        .lock()
        // A panic while holding the lock leaves a map that is still whole: keep using it.
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Registers `concern` of `role` (e.g. `"dedup-worker"`, `"startup"`), not ready: `why`.
pub fn condition(role: &'static str, concern: &'static str, why: impl Into<String>) -> Condition {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut entries = registry();
    entries.insert(
        id,
        Entry {
            role,
            concern,
            not_ready: Some(why.into()),
        },
    );
    publish_gauge(&entries, role);
    Condition { id, role }
}

impl Condition {
    /// This condition is met.
    pub fn ready(&self) {
        self.set(None);
    }

    /// This condition is not met, because of `why` (a sentence for operators).
    pub fn not_ready(&self, why: impl Into<String>) {
        self.set(Some(why.into()));
    }

    /// Whether this condition is met.
    pub fn is_ready(&self) -> bool {
        registry()
            .get(&self.id)
            .is_some_and(|entry| entry.not_ready.is_none())
    }

    fn set(&self, not_ready: Option<String>) {
        let mut entries = registry();
        if let Some(entry) = entries.get_mut(&self.id) {
            entry.not_ready = not_ready;
        }
        publish_gauge(&entries, self.role);
    }
}

impl Drop for Condition {
    fn drop(&mut self) {
        let mut entries = registry();
        entries.remove(&self.id);
        publish_gauge(&entries, self.role);
    }
}

/// `landslide_ready{role}`: 1 when every condition of `role` in this process is met.
fn publish_gauge(entries: &BTreeMap<u64, Entry>, role: &'static str) {
    let ready = entries
        .values()
        .filter(|e| e.role == role)
        .all(|e| e.not_ready.is_none());
    metrics::gauge!("landslide_ready", "role" => role).set(if ready { 1.0 } else { 0.0 });
}

/// `Ok` when every registered condition is met, else one line per unmet condition:
/// `role (concern): why`.
pub fn report() -> Result<(), Vec<String>> {
    let unmet: Vec<String> = registry()
        .values()
        .filter_map(|e| {
            let why = e.not_ready.as_ref()?;
            Some(format!("{} ({}): {why}", e.role, e.concern))
        })
        .collect();
    if unmet.is_empty() { Ok(()) } else { Err(unmet) }
}

/// `GET /readyz` of the operations listener: `200 ready`, or `503` with a line per unmet
/// condition.
pub async fn readyz() -> (StatusCode, String) {
    match report() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(unmet) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready:\n{}\n", unmet.join("\n")),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_is_ready_when_every_condition_is_and_a_dropped_one_no_longer_counts() {
        let startup = condition("test-role", "startup", "starting");
        let other = condition("test-role", "stream", "checking");
        let unmet = report().unwrap_err();
        assert!(unmet.contains(&"test-role (startup): starting".to_owned()));
        startup.ready();
        assert!(startup.is_ready());
        let unmet = report().unwrap_err();
        assert!(!unmet.iter().any(|l| l.contains("startup")));
        assert!(unmet.iter().any(|l| l.contains("stream")));
        other.not_ready("the stream went backwards");
        assert!(
            report()
                .unwrap_err()
                .iter()
                .any(|l| l.ends_with("went backwards"))
        );
        drop(other);
        let unmet = report().err().unwrap_or_default();
        assert!(
            !unmet.iter().any(|l| l.starts_with("test-role")),
            "{unmet:?}"
        );
    }
}
