//! Processes a test runs beside it: apps served by `spin up` or `sparkops up` (one process
//! group each, output in a log file, stopped on drop, killed outright when the test says),
//! and a Redis or Postgres of the test's own, to stop and restart under load.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

    /// Whether it has ended (by itself or killed).
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
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

/// A loopback port nothing listens on, below the kernel's ephemeral range (which starts at
/// 32768), so no outgoing connection can take it between the choice and the start.
pub fn free_service_port() -> u16 {
    let start = 20_000 + (uuid::Uuid::new_v4().as_u128() % 10_000) as u16;
    (start..32_000)
        .chain(20_000..start)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below 32000")
}

/// A Redis server of the test's own on a loopback port, stopped on drop.
pub struct OwnRedis {
    child: Child,
    pub url: String,
}

impl OwnRedis {
    pub async fn start() -> Self {
        Self::start_on(free_service_port()).await
    }

    /// On `port`, e.g. again where a stopped one was.
    pub async fn start_on(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (infra/dev installs it)");
        let url = format!("redis://127.0.0.1:{port}");
        let client = redis::Client::open(url.as_str()).unwrap();
        super::eventually(async || client.get_multiplexed_async_connection().await.ok()).await;
        Self { child, url }
    }

    pub fn port(&self) -> u16 {
        url::Url::parse(&self.url).unwrap().port().unwrap()
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Postgres cluster of the test's own (`initdb` in a temporary folder, trust auth on a
/// loopback port), run as the `postgres` user when the test runs as root, as Postgres
/// requires; stopped and removed on drop.
pub struct OwnPostgres {
    dir: super::TempDir,
    port: u16,
    pub url: String,
}

impl OwnPostgres {
    pub fn start() -> Self {
        let dir = super::TempDir::new();
        let data = dir.path().join("data");
        if as_root() {
            // The server's user must own its folder and reach it.
            let _ = Command::new("chmod")
                .args(["755", &dir.path().to_string_lossy()])
                .status();
            let _ = Command::new("chown")
                .args(["postgres", &dir.path().to_string_lossy()])
                .status();
        }
        let data_arg = data.to_string_lossy().into_owned();
        run_as_postgres(
            "initdb",
            &[
                "-D",
                &data_arg,
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
            ],
        );
        let port = free_service_port();
        let pg = Self {
            dir,
            port,
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
        };
        pg.pg_ctl("start");
        pg
    }

    /// Restarts the server as an operator would (`pg_ctl restart -m fast`): every
    /// connection is ended, transactions in flight are rolled back.
    pub fn restart(&self) {
        self.pg_ctl("restart");
    }

    fn pg_ctl(&self, action: &str) {
        let data = self.dir.path().join("data").to_string_lossy().into_owned();
        let log = self
            .dir
            .path()
            .join("server.log")
            .to_string_lossy()
            .into_owned();
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off",
            self.port
        );
        run_as_postgres(
            "pg_ctl",
            &[
                "-D", &data, "-l", &log, "-w", "-t", "60", "-m", "fast", "-o", &options, action,
            ],
        );
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data").to_string_lossy().into_owned();
        let _ = as_postgres("pg_ctl")
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
}

/// `program`, as the `postgres` user when this process is root.
fn as_postgres(program: &str) -> Command {
    if as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--", program]);
        c
    } else {
        Command::new(program)
    }
}

fn run_as_postgres(program: &str, args: &[&str]) {
    let out = as_postgres(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} runs: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
