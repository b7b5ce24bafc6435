//! Waiting for a broker or a database that is slow to come back: [`patiently`], which retries a
//! startup step for as long as it takes, pausing by the one [`Backoff`] of every retry
//! (`landslide-patience`), and says so meanwhile.
//!
//! No wait here has a wall-clock deadline. A deadline counts time the process spent stopped
//! (SIGSTOP, a paused VM, a laptop lid) as time spent waiting: the reliability harness resumed a
//! worker whose 60 s had passed while it was stopped, and it exited at its next failed try
//! (`shared/research/cluster-power-cut-2026-12-06.md`, run f-6). A whole-cluster restart after a
//! power cut takes longer than any fixed patience, too. A role that waits is not ready
//! ([`crate::readiness`]), logs each failure, and carries on; only an error that retrying cannot
//! cure (an incompatible definition, refused credentials) ends the wait.

use landslide_patience::Backoff;

use crate::readiness::Condition;

/// Runs `step` until it succeeds, pausing by [`Backoff::default`] between tries, for as long as
/// it takes. Each failure is logged and makes `condition` not ready, naming `what` and the error;
/// an error for which `is_permanent` holds is returned at once. `condition` is left as it is on
/// success: the role marks it ready when all of its startup is done.
pub async fn patiently<T, F, Fut>(
    what: &str,
    condition: &Condition,
    is_permanent: impl Fn(&anyhow::Error) -> bool,
    mut step: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut backoff = Backoff::default();
    let mut failures: u64 = 0;
    loop {
        match step().await {
            Ok(value) => {
                if failures > 0 {
                    tracing::info!(failures, "{what}: done after waiting");
                }
                return Ok(value);
            }
            Err(err) if is_permanent(&err) => return Err(err),
            Err(err) => {
                failures += 1;
                let pause = backoff.next_pause();
                let error = format!("{err:#}");
                condition.not_ready(format!("cannot {what} yet ({failures} tries): {error}"));
                tracing::warn!(
                    error,
                    failures,
                    retry_in_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
                    "cannot {what} yet; retrying (not ready meanwhile)"
                );
                tokio::time::sleep(pause).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paused time: a hundred failed tries (far beyond any former deadline) and the step is still
    /// tried, and the condition names the error meanwhile.
    #[tokio::test(start_paused = true)]
    async fn a_step_is_retried_for_as_long_as_it_fails_and_a_permanent_error_ends_it() {
        let condition = crate::readiness::condition("patience-test", "startup", "starting");
        let mut tries = 0;
        let value = patiently(
            "reach the thing",
            &condition,
            |_| false,
            || {
                tries += 1;
                let result = if tries < 100 {
                    Err(anyhow::anyhow!("down"))
                } else {
                    Ok(tries)
                };
                std::future::ready(result)
            },
        )
        .await
        .unwrap();
        assert_eq!(value, 100);
        assert!(!condition.is_ready());
        let unmet = crate::readiness::report().unwrap_err();
        assert!(
            unmet
                .iter()
                .any(|l| l.contains("cannot reach the thing yet (99 tries): down")),
            "{unmet:?}"
        );

        let err = patiently(
            "reach the thing",
            &condition,
            |e| e.to_string() == "refused",
            || std::future::ready(Err::<(), _>(anyhow::anyhow!("refused"))),
        )
        .await
        .unwrap_err();
        assert_eq!(err.to_string(), "refused");
    }
}
