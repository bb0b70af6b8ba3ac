//! A binary under test as a child process, its stdout and stderr in a log file, stopped on drop.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::PATIENCE;

/// A running process of a binary under test. Dropped (a failed assertion included), it is
/// killed, or sent SIGTERM if made with [`Process::terminate_on_drop`], and waited for.
#[derive(Debug)]
pub struct Process {
    child: Child,
    log: PathBuf,
    terminate_on_drop: bool,
}

impl Process {
    /// Spawns `command` with its stdout and stderr in the file `log` (created anew).
    pub fn spawn(command: &mut Command, log: PathBuf) -> Self {
        let file = std::fs::File::create(&log).unwrap();
        let child = command
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .unwrap();
        Self {
            child,
            log,
            terminate_on_drop: false,
        }
    }

    /// SIGTERM instead of SIGKILL on drop: for a process that must stop what it started (the
    /// autoscaler's workers) instead of leaving it running.
    pub fn terminate_on_drop(mut self) -> Self {
        self.terminate_on_drop = true;
        self
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Everything it has written so far.
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    /// `kill -<signal>` (KILL, TERM, …); fails the test if that fails.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits for it to exit, bounded by [`PATIENCE`] (blocking the thread).
    pub fn wait_exit(&mut self) -> ExitStatus {
        let started = Instant::now();
        while started.elapsed() < PATIENCE {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("process did not exit in time; log:\n{}", self.log_text());
    }

    /// Waits for it to exit, bounded by [`PATIENCE`], without blocking the runtime (for a
    /// process that needs this test's own tasks to finish, such as an in-process worker).
    pub async fn exited(&mut self) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "process did not exit: {}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops it now if it still runs (SIGKILL, or SIGTERM if made so) and waits for it.
    pub fn stop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        if self.terminate_on_drop {
            let _ = Command::new("kill")
                .args(["-TERM", &self.id().to_string()])
                .status();
        } else {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}
