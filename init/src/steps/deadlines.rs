//! Every wait in slipway-init and the bound on every step, in one table.
//! A wait that passes its deadline fails the step; a step that passes its
//! own fails the attempt (see [`super::attempts`]). Tests and operators
//! override entries with `--deadline NAME=SECONDS`.

use std::time::Duration;

/// One row: the name `--deadline` takes, what it bounds, its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Row {
    pub name: &'static str,
    pub bounds: &'static str,
    pub value: Duration,
}

/// The table. Field names are the rows' names with `_` for `-`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// The metadata service answers (it may start after the instance).
    pub metadata: Duration,
    /// A running or pending predecessor stops and lets the data volume go.
    pub holder_stops: Duration,
    /// The data volume becomes `available` once its holder let go of it.
    pub volume_available: Duration,
    /// The attached data volume's NVMe device appears.
    pub volume_device: Duration,
    /// A master restoring: a fresh snapshot of the old volume completes.
    pub snapshot: Duration,
    /// A node: the first master publishes the node bundle.
    pub node_bundle: Duration,
    /// A node: the API server admits its bootstrap token (past it, the
    /// kubelet starts anyway).
    pub admission: Duration,
    /// A master: its API server (a static pod) answers `/readyz`.
    pub api_server: Duration,
    /// A master: its kubelet registers the master's Node object.
    pub node_registers: Duration,
    /// A master: a control-plane container stopped after a renewal runs again.
    pub restart: Duration,
    /// Ready in the API before a member signals its stack.
    pub node_ready: Duration,
    /// A member shutting down: its pods evicted (disruption budgets allowing).
    pub drain: Duration,
    /// Any one boot step, its waits included.
    pub step: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        let min = |m: u64| Duration::from_secs(m * 60);
        Self {
            metadata: min(5),
            holder_stops: min(5),
            volume_available: min(5),
            volume_device: min(2),
            snapshot: min(10),
            node_bundle: min(20),
            admission: min(10),
            api_server: min(15),
            node_registers: min(10),
            restart: min(5),
            node_ready: min(15),
            drain: min(2),
            step: min(30),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeadlineError {
    #[error("--deadline {0:?}: expected NAME=SECONDS")]
    Syntax(String),
    #[error("--deadline {given:?}: no such deadline (known: {known})")]
    Unknown { given: String, known: String },
    #[error("--deadline {0:?}: seconds must be a whole number above 0")]
    Seconds(String),
}

impl Deadlines {
    fn slots(&mut self) -> [(&'static str, &'static str, &mut Duration); 13] {
        [
            (
                "metadata",
                "the metadata service answers",
                &mut self.metadata,
            ),
            (
                "holder-stops",
                "a running predecessor stops and releases the data volume",
                &mut self.holder_stops,
            ),
            (
                "volume-available",
                "the data volume is available after its holder stopped",
                &mut self.volume_available,
            ),
            (
                "volume-device",
                "the attached data volume's NVMe device appears",
                &mut self.volume_device,
            ),
            (
                "snapshot",
                "a master restoring: a fresh snapshot of the old volume completes",
                &mut self.snapshot,
            ),
            (
                "node-bundle",
                "a node: the master publishes the node bundle",
                &mut self.node_bundle,
            ),
            (
                "admission",
                "a node: the API server admits its bootstrap token (then its kubelet starts anyway)",
                &mut self.admission,
            ),
            (
                "api-server",
                "a master: the API server answers /readyz",
                &mut self.api_server,
            ),
            (
                "node-registers",
                "a master: its kubelet registers the master's Node",
                &mut self.node_registers,
            ),
            (
                "restart",
                "a master: a control-plane container restarted after a renewal runs",
                &mut self.restart,
            ),
            (
                "node-ready",
                "a member: its Node Ready in the API before it signals its stack",
                &mut self.node_ready,
            ),
            (
                "drain",
                "a member shutting down: its pods evicted, disruption budgets allowing",
                &mut self.drain,
            ),
            (
                "step",
                "any one boot step, its waits included",
                &mut self.step,
            ),
        ]
    }

    /// The table, for `--help`, the docs and the journal.
    pub fn rows(&self) -> Vec<Row> {
        let mut copy = *self;
        copy.slots()
            .into_iter()
            .map(|(name, bounds, value)| Row {
                name,
                bounds,
                value: *value,
            })
            .collect()
    }

    /// Applies one `NAME=SECONDS` override.
    pub fn set(&mut self, spec: &str) -> Result<(), DeadlineError> {
        let (name, secs) = spec
            .split_once('=')
            .ok_or_else(|| DeadlineError::Syntax(spec.to_owned()))?;
        let secs: u64 = secs
            .trim()
            .parse()
            .ok()
            .filter(|s| *s > 0)
            .ok_or_else(|| DeadlineError::Seconds(spec.to_owned()))?;
        let mut slots = self.slots();
        let known = slots.iter().map(|s| s.0).collect::<Vec<_>>().join(", ");
        let slot = slots
            .iter_mut()
            .find(|s| s.0 == name.trim())
            .ok_or_else(|| DeadlineError::Unknown {
                given: spec.to_owned(),
                known,
            })?;
        *slot.2 = Duration::from_secs(secs);
        Ok(())
    }

    /// The defaults with `overrides` applied in order.
    pub fn with_overrides<S: AsRef<str>>(overrides: &[S]) -> Result<Self, DeadlineError> {
        let mut d = Self::default();
        for o in overrides {
            d.set(o.as_ref())?;
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_set_one_row_by_name() {
        let d = Deadlines::with_overrides(&["holder-stops=7", "node-bundle = 3"]).unwrap();
        assert_eq!(d.holder_stops, Duration::from_secs(7));
        assert_eq!(d.node_bundle, Duration::from_secs(3));
        assert_eq!(d.metadata, Deadlines::default().metadata);
        let rows = d.rows();
        assert_eq!(rows.len(), 13);
        assert!(rows
            .iter()
            .any(|r| r.name == "holder-stops" && r.value == Duration::from_secs(7)));
    }

    #[test]
    fn bad_overrides_are_named() {
        let mut d = Deadlines::default();
        assert_eq!(
            d.set("holder-stops"),
            Err(DeadlineError::Syntax("holder-stops".into()))
        );
        assert!(matches!(
            d.set("bogus=3"),
            Err(DeadlineError::Unknown { .. })
        ));
        assert!(d
            .set("bogus=3")
            .unwrap_err()
            .to_string()
            .contains("metadata"));
        assert_eq!(
            d.set("step=0"),
            Err(DeadlineError::Seconds("step=0".into()))
        );
        assert_eq!(
            d.set("step=-4"),
            Err(DeadlineError::Seconds("step=-4".into()))
        );
        assert_eq!(d, Deadlines::default());
    }

    #[test]
    fn a_step_outlasts_the_waits_inside_it() {
        let d = Deadlines::default();
        // The volume step's waits: a restore's fresh snapshot and its new
        // volume, then a predecessor letting the volume go, the volume
        // available, and its device.
        assert!(
            d.holder_stops + d.volume_available + d.snapshot + d.volume_available + d.volume_device
                < d.step
        );
        assert!(d.node_bundle < d.step);
        assert!(d.api_server + d.node_registers < d.step);
        // A renewal restarts four components and waits for the API once more.
        assert!(d.restart * 5 < d.step);
    }
}
