//! Restart, then give up loudly. systemd runs a failed boot again
//! (`Restart=on-failure` with a growing delay, `RestartMode=direct` so
//! kubelet keeps waiting instead of failing with it); every step is
//! idempotent, so the next attempt continues where the last one stopped.
//! Attempts are counted in `/run` (a reboot starts afresh). When the last
//! one fails, the instance tells its Auto Scaling group it is unhealthy and
//! the group replaces it; a refusal that no attempt can change stops at once.

use super::{Context, Failed, Report, StepError};
use std::path::{Path, PathBuf};

pub const STEP: &str = "attempts";
/// The AWS actions giving up calls.
pub const CALLS: &[&str] = &["autoscaling:SetInstanceHealth"];

/// The exit status after which systemd does not restart the unit
/// (`RestartPreventExitStatus=`): given up, or refused for good.
pub const FINAL_EXIT: u8 = 2;

/// This boot's attempts at one command (`boot`, `addons`).
#[derive(Debug, Clone)]
pub struct Attempts {
    command: String,
    file: PathBuf,
    pub limit: u32,
}

/// What follows a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// systemd runs the command again.
    Retry { attempt: u32, limit: u32 },
    /// The last attempt failed: report unhealthy and stop.
    GiveUp { attempt: u32 },
    /// Another attempt could not help: stop, and leave the instance for a
    /// person to inspect (a replacement would fail the same way).
    Stop,
}

impl Attempts {
    /// Counts attempts at `command` in `run_dir`; `limit` is at least 1.
    pub fn new(run_dir: &Path, command: &str, limit: u32) -> Self {
        Self {
            command: command.to_owned(),
            file: run_dir.join(format!("{command}.attempts")),
            limit: limit.max(1),
        }
    }

    /// Records that an attempt starts and returns its number (from 1).
    pub fn begin(&self) -> Result<u32, StepError> {
        let previous = std::fs::read_to_string(&self.file)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            .unwrap_or(0);
        let this = previous.saturating_add(1);
        let io = |e: std::io::Error| StepError::Invalid {
            what: format!("counting attempts in {}", self.file.display()),
            message: e.to_string(),
        };
        if let Some(dir) = self.file.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        std::fs::write(&self.file, format!("{this}\n")).map_err(io)?;
        Ok(this)
    }

    /// Forgets the count: the command succeeded.
    pub fn succeeded(&self) {
        let _ = std::fs::remove_file(&self.file);
    }

    /// What follows the failure of attempt `attempt`.
    pub fn next(&self, attempt: u32, error: &StepError) -> Next {
        if error.is_permanent() {
            Next::Stop
        } else if attempt >= self.limit {
            Next::GiveUp { attempt }
        } else {
            Next::Retry {
                attempt,
                limit: self.limit,
            }
        }
    }

    /// The journal's account of a failed attempt: which step, what failed (the
    /// API action among it), how many attempts, and what happens next.
    pub fn describe(&self, failed: &Failed, next: Next) -> String {
        let what = crate::error_chain(&failed.source, ": ");
        let step = failed.step;
        match next {
            Next::Retry { attempt, limit } => format!(
                "step {step} failed (attempt {attempt} of {limit}): {what}; systemd runs the {} again",
                self.command
            ),
            Next::GiveUp { attempt } => format!(
                "step {step} failed (attempt {attempt}, the last): {what}; giving up: \
                 this instance reports itself unhealthy so its Auto Scaling group replaces it"
            ),
            Next::Stop => format!(
                "step {step} refused: {what}; not retrying (another attempt would end the same way)"
            ),
        }
    }
}

/// Marks this instance unhealthy in its Auto Scaling group, at once (the
/// group's grace period would only delay a replacement that must come).
pub async fn report_unhealthy(ctx: &Context) -> Result<Report, StepError> {
    let id = &ctx.instance.id;
    ctx.aws
        .autoscaling
        .set_instance_health()
        .instance_id(id)
        .health_status("Unhealthy")
        .should_respect_grace_period(false)
        .send()
        .await
        .map_err(super::aws_err(
            "autoscaling:SetInstanceHealth",
            format!("marking {id} unhealthy"),
        ))?;
    Ok(Report::changed(
        STEP,
        format!("marked {id} unhealthy: its Auto Scaling group will replace it"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait() -> StepError {
        StepError::Wait("the bucket stayed empty".into())
    }

    #[test]
    fn attempts_count_up_and_reset_on_success() {
        let dir = tempfile::tempdir().unwrap();
        let a = Attempts::new(&dir.path().join("run"), "boot", 3);
        assert_eq!(a.begin().unwrap(), 1);
        assert_eq!(
            a.next(1, &wait()),
            Next::Retry {
                attempt: 1,
                limit: 3
            }
        );
        assert_eq!(a.begin().unwrap(), 2);
        assert_eq!(a.begin().unwrap(), 3);
        assert_eq!(a.next(3, &wait()), Next::GiveUp { attempt: 3 });
        a.succeeded();
        assert_eq!(a.begin().unwrap(), 1);
        // The journal names the command systemd will run again.
        let addons = Attempts::new(&dir.path().join("run"), "addons", 3);
        let failed = Failed {
            step: "addons",
            source: wait(),
        };
        let line = addons.describe(&failed, addons.next(1, &failed.source));
        assert!(line.ends_with("systemd runs the addons again"), "{line}");
    }

    #[test]
    fn a_refusal_stops_at_once_and_the_journal_says_why() {
        let a = Attempts::new(Path::new("/nonexistent"), "boot", 5);
        let refused = StepError::Refused {
            what: "data-volume".into(),
            message: "/dev/nvme1n1 holds an XFS filesystem".into(),
        };
        assert_eq!(a.next(1, &refused), Next::Stop);
        let failed = Failed {
            step: "data-volume",
            source: refused,
        };
        let line = a.describe(&failed, Next::Stop);
        assert!(line.starts_with("step data-volume refused"), "{line}");
        assert!(line.contains("XFS"), "{line}");
    }

    #[test]
    fn the_last_failure_names_step_action_and_what_follows() {
        let failed = Failed {
            step: "elastic-ip",
            source: StepError::Aws {
                action: "associating Elastic IP eipalloc-1 with i-1".into(),
                api: "ec2:AssociateAddress",
                message: "RequestLimitExceeded: Request limit exceeded.".into(),
            },
        };
        let line = Attempts::new(Path::new("/run"), "boot", 5)
            .describe(&failed, Next::GiveUp { attempt: 5 });
        for part in [
            "step elastic-ip",
            "ec2:AssociateAddress",
            "attempt 5, the last",
            "Auto Scaling group replaces it",
        ] {
            assert!(line.contains(part), "{part} missing: {line}");
        }
    }
}
