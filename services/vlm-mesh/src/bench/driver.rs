//! A long-lived helper process (the Python sides of comparisons) that answers each line written
//! to its stdin with one JSON object on a line of its stdout; killed when dropped.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::Context;

pub(super) struct LineDriver {
    /// The script, for errors.
    name: &'static str,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl LineDriver {
    pub(super) fn start(mut cmd: Command, name: &'static str) -> anyhow::Result<Self> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        Ok(LineDriver {
            name,
            child,
            stdin,
            stdout,
        })
    }

    /// The next JSON line the process prints.
    pub(super) fn read(&mut self) -> anyhow::Result<serde_json::Value> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        anyhow::ensure!(
            !line.is_empty(),
            "{} exited (status {:?})",
            self.name,
            self.child.try_wait().ok().flatten()
        );
        serde_json::from_str(&line).with_context(|| format!("{} answered {line:?}", self.name))
    }

    /// Writes `request` as a line and reads the answer.
    pub(super) fn ask(&mut self, request: &str) -> anyhow::Result<serde_json::Value> {
        writeln!(self.stdin, "{request}")?;
        self.stdin.flush()?;
        self.read()
    }
}

impl Drop for LineDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
