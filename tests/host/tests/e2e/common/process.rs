//! Apps served by other processes (`spin up`, `sparkops up`): started as one process group
//! with their output in a log file, stopped on drop, and killed outright when a test says.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use super::Client;

/// How many times (200 ms apart) [`wait_for_health`] asks whether the app answers yet:
/// about 5 minutes.
const START_POLLS: u32 = 1500;

/// A served app and any processes it starts, stopped (as one process group) on drop.
pub struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    /// Starts `program args` with `vars` added to the inherited environment, its output in
    /// `dir/<name>.log`, as a process group of its own.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        vars: &HashMap<String, String>,
        dir: &Path,
    ) -> Self {
        use std::os::unix::process::CommandExt;
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .args(args)
            .envs(vars)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("{} starts: {e}", program.display()));
        Self { child, log }
    }

    /// Everything it has written so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Ends the whole group at once with SIGKILL, as a lost node or the OOM killer would:
    /// no handler runs, no connection is closed politely.
    pub fn kill(&mut self) {
        self.signal("-KILL");
        let _ = self.child.wait();
    }

    fn signal(&self, signal: &str) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args([signal, "--", &group]).status();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.signal("-TERM");
            std::thread::sleep(Duration::from_millis(500));
        }
        self.signal("-KILL");
        let _ = self.child.wait();
    }
}

/// A client of the app on `listen` once it answers `/healthz`; fails when one of `ups`
/// exits first. The first start compiles every component (later ones read a cache): on a
/// cold cache, with other tests compiling too, that takes minutes on 2 cores.
pub async fn wait_for_health(listen: SocketAddr, ups: &mut [&mut Process]) -> Client {
    let client = Client::new(format!("http://{listen}"));
    for _ in 0..START_POLLS {
        let listening = tokio::net::TcpStream::connect(listen).await.is_ok();
        if listening && client.status("GET", "/healthz", None, None).await == 200 {
            return client;
        }
        for up in ups.iter_mut() {
            if let Ok(Some(status)) = up.child.try_wait() {
                panic!("the app exited with {status}:\n{}", up.log());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let logs: Vec<String> = ups.iter().map(|u| u.log()).collect();
    panic!(
        "nothing answered /healthz on {listen}:\n{}",
        logs.join("\n")
    );
}
