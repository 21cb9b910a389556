//! Progress for a person on stderr (stage, elapsed time, bytes) and the
//! per-stage timings that go into the build manifest for machines.

use serde::{Deserialize, Serialize};
use std::future::Future;
use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageTiming {
    pub stage: String,
    pub seconds: f64,
    pub cached: bool,
    /// What the stage reported (a size, what it read).
    #[serde(default)]
    pub note: String,
}

#[derive(Debug)]
pub struct Progress {
    start: Instant,
    stages: Mutex<Vec<StageTiming>>,
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// What a finished stage reports: whether it reused a cached result, and
/// an optional note such as a size.
#[derive(Debug, Default)]
pub struct Outcome {
    pub cached: bool,
    pub note: String,
}

impl Outcome {
    pub fn cached(note: impl Into<String>) -> Self {
        Self {
            cached: true,
            note: note.into(),
        }
    }
    pub fn built(note: impl Into<String>) -> Self {
        Self {
            cached: false,
            note: note.into(),
        }
    }
}

impl Progress {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            stages: Mutex::new(Vec::new()),
        }
    }

    /// Runs one stage, printing its start, end, duration and note.
    pub fn stage<T, E>(
        &self,
        name: &str,
        f: impl FnOnce() -> Result<(T, Outcome), E>,
    ) -> Result<T, E> {
        let t0 = self.begin(name);
        let (value, outcome) = f()?;
        self.end(name, t0, outcome);
        Ok(value)
    }

    /// The same for a stage that awaits.
    pub async fn stage_async<T, E>(
        &self,
        name: &str,
        f: impl Future<Output = Result<(T, Outcome), E>>,
    ) -> Result<T, E> {
        let t0 = self.begin(name);
        let (value, outcome) = f.await?;
        self.end(name, t0, outcome);
        Ok(value)
    }

    fn begin(&self, name: &str) -> Instant {
        eprintln!("[{:>6.1}s] {name} …", self.start.elapsed().as_secs_f64());
        Instant::now()
    }

    fn end(&self, name: &str, t0: Instant, outcome: Outcome) {
        let seconds = t0.elapsed().as_secs_f64();
        let how = if outcome.cached { "cached" } else { "done" };
        let sep = if outcome.note.is_empty() { "" } else { ", " };
        eprintln!(
            "[{:>6.1}s] {name}: {how} in {seconds:.2}s{sep}{}",
            self.start.elapsed().as_secs_f64(),
            outcome.note
        );
        let _ = std::io::stderr().flush();
        self.stages
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(StageTiming {
                stage: name.to_owned(),
                seconds,
                cached: outcome.cached,
                note: outcome.note,
            });
    }

    /// A line of progress inside a long stage.
    pub fn note(&self, msg: &str) {
        eprintln!("[{:>6.1}s]   {msg}", self.start.elapsed().as_secs_f64());
    }

    pub fn timings(&self) -> Vec<StageTiming> {
        self.stages
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}

/// Human-readable byte count.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_readable() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 * 1024 * 1024 / 2), "1.5 MiB");
        assert_eq!(bytes(2 << 30), "2.0 GiB");
    }

    #[test]
    fn stages_are_recorded_in_order() {
        let p = Progress::new();
        p.stage("a", || Ok::<_, ()>(((), Outcome::built(""))))
            .unwrap();
        p.stage("b", || Ok::<_, ()>(((), Outcome::cached("x"))))
            .unwrap();
        let timings = p.timings();
        let names: Vec<_> = timings
            .iter()
            .map(|t| (t.stage.as_str(), t.cached))
            .collect();
        assert_eq!(names, [("a", false), ("b", true)]);
    }
}
