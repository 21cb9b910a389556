//! Host programs the build runs, and the one place that runs them: a
//! missing program is reported with the Debian package that provides it,
//! a failing one with its command line and the end of its output.

use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("`{program}` is not installed; install the Debian package `{package}` (apt-get install {package})")]
    Missing {
        program: &'static str,
        package: &'static str,
    },
    #[error("running {command}: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}):\n{output}")]
    Failed {
        command: String,
        status: String,
        output: String,
    },
}

/// A host program and the Debian package that ships it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub program: &'static str,
    pub package: &'static str,
}

pub const MMDEBSTRAP: Tool = Tool {
    program: "mmdebstrap",
    package: "mmdebstrap",
};
pub const NEWUIDMAP: Tool = Tool {
    program: "newuidmap",
    package: "uidmap",
};
pub const MKFS_EXT4: Tool = Tool {
    program: "mkfs.ext4",
    package: "e2fsprogs",
};
pub const QEMU_IMG: Tool = Tool {
    program: "qemu-img",
    package: "qemu-utils",
};
pub const DPKG_DEB: Tool = Tool {
    program: "dpkg-deb",
    package: "dpkg",
};

/// Every tool `build` needs, checked up front so a build fails in its first
/// second rather than after the slow stages.
pub const BUILD_TOOLS: &[Tool] = &[MMDEBSTRAP, NEWUIDMAP, MKFS_EXT4, QEMU_IMG, DPKG_DEB];

fn on_path(program: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin"].map(Into::into))
        .any(|dir| dir.join(program).is_file())
}

pub fn require(tools: &[Tool]) -> Result<(), ToolError> {
    for t in tools {
        if !on_path(t.program) {
            return Err(ToolError::Missing {
                program: t.program,
                package: t.package,
            });
        }
    }
    Ok(())
}

/// Builds a command for `tool`, failing early if it is missing.
pub fn command(tool: Tool) -> Result<Command, ToolError> {
    require(&[tool])?;
    Ok(Command::new(tool.program))
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    if s.len() > 300 {
        s.truncate(300);
        s.push_str(" …");
    }
    s
}

/// Runs `cmd` to completion, capturing its output; on failure the error
/// carries the last lines of what it printed.
pub fn run(cmd: &mut Command) -> Result<String, ToolError> {
    let command = describe(cmd);
    tracing::debug!("running {command}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ToolError::Spawn {
            command: command.clone(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let mut text = stdout;
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(25)..].join("\n");
        return Err(ToolError::Failed {
            command,
            status: out.status.to_string(),
            output: tail,
        });
    }
    Ok(stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_tool_names_its_package() {
        let t = Tool {
            program: "slipway-no-such-program",
            package: "slipway-pkg",
        };
        let err = require(&[t]).unwrap_err().to_string();
        assert!(err.contains("apt-get install slipway-pkg"), "{err}");
    }

    #[test]
    fn a_failing_command_reports_its_output() {
        let err = run(Command::new("sh").args(["-c", "echo boom >&2; exit 3"]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("boom") && err.contains("exit status: 3"),
            "{err}"
        );
    }
}
