//! The one wait loop for what the SDK does not wait for itself (a volume's
//! device or state, an instance's state, a bucket's contents): poll with
//! exponential backoff until the check answers, fails, or the deadline
//! passes. Time is read from tokio's clock, the one it sleeps on, so a
//! test with a paused clock moves through the wait without spinning. A
//! wait that lasts says so once a minute, so a console shows what a slow
//! boot or departure is waiting for.

use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum WaitError<E: std::error::Error + 'static> {
    #[error("{what}: still not ready after {}s", .waited.as_secs())]
    Deadline { what: String, waited: Duration },
    #[error("{what}: {source}")]
    Failed {
        what: String,
        #[source]
        source: E,
    },
}

/// How often a wait that lasts says it still waits (a drain's own loop
/// says it as often).
pub(crate) const SAY_EVERY: Duration = Duration::from_secs(60);

/// Backoff schedule: starts at `first`, doubles up to `max`.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    pub deadline: Duration,
}

impl Backoff {
    pub fn new(deadline: Duration) -> Self {
        Self {
            first: Duration::from_millis(200),
            max: Duration::from_secs(10),
            deadline,
        }
    }

    /// No back-off: every `interval`, for what costs next to nothing to ask.
    pub fn every(interval: Duration, deadline: Duration) -> Self {
        Self {
            first: interval,
            max: interval,
            deadline,
        }
    }
}

/// Calls `check` until it returns `Ok(Some(_))`; `Ok(None)` means "not yet",
/// `Err` ends the wait at once.
pub async fn until<T, E, F, Fut>(
    what: &str,
    backoff: Backoff,
    mut check: F,
) -> Result<T, WaitError<E>>
where
    E: std::error::Error + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, E>>,
{
    let start = Instant::now();
    let mut delay = backoff.first;
    let mut said = start;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(source) => {
                return Err(WaitError::Failed {
                    what: what.to_owned(),
                    source,
                })
            }
        }
        let waited = start.elapsed();
        if waited >= backoff.deadline {
            return Err(WaitError::Deadline {
                what: what.to_owned(),
                waited,
            });
        }
        if said.elapsed() >= SAY_EVERY {
            said = Instant::now();
            tracing::info!("{what}: not yet after {}s", waited.as_secs());
        }
        let remaining = backoff.deadline - waited;
        tokio::time::sleep(delay.min(remaining)).await;
        delay = (delay * 2).min(backoff.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("boom")]
    struct Boom;

    #[tokio::test(start_paused = true)]
    async fn waits_until_ready() {
        let mut n = 0;
        let v = until("thing", Backoff::new(Duration::from_secs(60)), || {
            n += 1;
            let ready = n == 4;
            async move { Ok::<_, Boom>(ready.then_some(n)) }
        })
        .await
        .unwrap();
        assert_eq!(v, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_deadline() {
        let err = until(
            "the bucket to fill",
            Backoff::new(Duration::from_secs(30)),
            || async { Ok::<Option<()>, Boom>(None) },
        )
        .await
        .unwrap_err();
        assert!(matches!(err, WaitError::Deadline { .. }));
        assert!(err
            .to_string()
            .contains("the bucket to fill: still not ready after 30s"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_clock_reaches_the_deadline_in_few_checks() {
        let mut checks = 0;
        let started = Instant::now();
        let err = until("x", Backoff::new(Duration::from_secs(3600)), || {
            checks += 1;
            async { Ok::<Option<()>, Boom>(None) }
        })
        .await
        .unwrap_err();
        assert!(matches!(err, WaitError::Deadline { .. }));
        // Backoff doubles to 10 s: an hour takes a few hundred checks, and
        // the (paused) clock says exactly the deadline passed.
        assert!(checks < 400, "{checks} checks");
        assert_eq!(started.elapsed(), Duration::from_secs(3600));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_ends_the_wait() {
        let err = until("x", Backoff::new(Duration::from_secs(30)), || async {
            Err::<Option<()>, _>(Boom)
        })
        .await
        .unwrap_err();
        assert!(matches!(err, WaitError::Failed { .. }));
    }
}
