//! Kubernetes' version skew policy as it applies to a release update: the
//! control plane moves at most one minor version at a time (its components
//! and etcd's data are only migrated between neighbours), and never back.
//! The template updates the master before the nodes, so kubelets are never
//! newer than their API server; this module checks the step itself.

use std::fmt;

/// A Kubernetes release, `v1.37.2` (or `1.37.2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl Version {
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("{text:?} is not a Kubernetes version such as v1.37.2");
        let bare = text.trim().strip_prefix('v').unwrap_or(text.trim());
        // Pre-release and build suffixes (`-rc.1`, `+abc`) do not change the minor.
        let core = bare.split(['-', '+']).next().unwrap_or("");
        let mut parts = core.split('.').map(|p| p.parse::<u32>().map_err(|_| bad()));
        let (Some(major), Some(minor), Some(patch), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        Ok(Self {
            major: major?,
            minor: minor?,
            patch: patch?,
        })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Whether a cluster running `current` may be updated to `next`: the same
/// minor (a patch release, or a rebuild), or the next one.
pub fn check(current: Version, next: Version) -> Result<(), String> {
    let refuse = |why: &str| {
        Err(format!(
            "a cluster on Kubernetes {current} cannot be updated to {next}: {why}"
        ))
    };
    if next.major != current.major {
        return refuse("a change of major version is not supported");
    }
    if next.minor < current.minor {
        return refuse("the control plane cannot go back a minor version (etcd's data and the API's stored versions only move forward)");
    }
    if next.minor > current.minor + 1 {
        return refuse(&format!(
            "it skips v{}.{}; update through every minor version in turn",
            current.major,
            current.minor + 1
        ));
    }
    if next < current {
        return refuse("it is an older patch release");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> Version {
        Version::parse(text).unwrap()
    }

    #[test]
    fn versions_parse_with_or_without_v_and_suffixes() {
        assert_eq!(
            v("v1.37.2"),
            Version {
                major: 1,
                minor: 37,
                patch: 2
            }
        );
        assert_eq!(v("1.36.3"), v("v1.36.3"));
        assert_eq!(v("v1.38.0-rc.1"), v("v1.38.0"));
        for bad in ["", "v1.37", "1.x.2", "v1.37.2.1", "latest"] {
            assert!(Version::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn one_minor_at_a_time_and_never_back() {
        assert!(check(v("v1.36.3"), v("v1.36.3")).is_ok());
        assert!(check(v("v1.36.3"), v("v1.36.9")).is_ok());
        assert!(check(v("v1.36.3"), v("v1.37.0")).is_ok());
        let skip = check(v("v1.36.3"), v("v1.38.0")).unwrap_err();
        assert!(skip.contains("skips v1.37"), "{skip}");
        let back = check(v("v1.37.2"), v("v1.36.3")).unwrap_err();
        assert!(back.contains("cannot go back"), "{back}");
        assert!(check(v("v1.37.2"), v("v1.37.1")).is_err());
        assert!(check(v("v1.37.2"), v("v2.0.0")).is_err());
    }
}
