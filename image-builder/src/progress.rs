//! Progress for a person on stderr (stage, elapsed time, bytes) and the
//! per-stage timings that go into the build manifest for machines.

use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::io::Write;
use std::time::Instant;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageTiming {
    pub stage: String,
    pub seconds: f64,
    pub cached: bool,
}

#[derive(Debug)]
pub struct Progress {
    start: Instant,
    stages: RefCell<Vec<StageTiming>>,
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
            stages: RefCell::new(Vec::new()),
        }
    }

    /// Runs one stage, printing its start, end, duration and note.
    pub fn stage<T, E>(
        &self,
        name: &str,
        f: impl FnOnce() -> Result<(T, Outcome), E>,
    ) -> Result<T, E> {
        eprintln!("[{:>6.1}s] {name} …", self.start.elapsed().as_secs_f64());
        let t0 = Instant::now();
        let (value, outcome) = f()?;
        let seconds = t0.elapsed().as_secs_f64();
        let how = if outcome.cached { "cached" } else { "built" };
        let sep = if outcome.note.is_empty() { "" } else { ", " };
        eprintln!(
            "[{:>6.1}s] {name}: {how} in {seconds:.2}s{sep}{}",
            self.start.elapsed().as_secs_f64(),
            outcome.note
        );
        let _ = std::io::stderr().flush();
        self.stages.borrow_mut().push(StageTiming {
            stage: name.to_owned(),
            seconds,
            cached: outcome.cached,
        });
        Ok(value)
    }

    /// A line of progress inside a long stage.
    pub fn note(&self, msg: &str) {
        eprintln!("[{:>6.1}s]   {msg}", self.start.elapsed().as_secs_f64());
    }

    pub fn timings(&self) -> Vec<StageTiming> {
        self.stages.borrow().clone()
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
