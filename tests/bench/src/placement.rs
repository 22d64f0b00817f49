//! Where the processes run: the database on cores of its own, as in every deployment (a
//! database server, or a managed one, never shares its cores with the app), against the
//! bench's default of everything sharing every core.
//!
//! On a machine of two cores, sharing makes the app's CPU and the database's one budget:
//! a ceiling measured with Postgres alone on both cores then compares the database's
//! statements with the app's whole work (its wasm guests, its HTTP API, the tool's call
//! at both ends) plus the database's, and each side's caches evicted by the other. Split,
//! each side has the same cores in the app's rounds as in the ceilings' (Postgres its half,
//! the clients theirs), and the ratio says how close the app comes to what the database
//! allows for its statements.
//!
//! Linux only (`sched_setaffinity`); the database must be on this machine, in this process
//! namespace (it is: the bench's addresses are loopback).
// Setting a process's cores is a libc call.
#![allow(unsafe_code)]

use std::collections::BTreeSet;

use anyhow::{Context, Result, bail};

/// The cores of the split: Postgres's (the server and every process it starts, which
/// inherit the postmaster's mask), and the rest's (this process's threads, so the host, the
/// no-op tool, the clients and `pgbench`, which inherit it; `spin up` and its processes;
/// and Redis).
pub struct Split {
    database: Vec<usize>,
    rest: Vec<usize>,
    all: Vec<usize>,
    postmaster: i32,
}

impl Split {
    /// Halves the cores this process may use between Postgres (the first half) and the
    /// rest. `backend` is the pid of one of the server's backends (`pg_backend_pid()`),
    /// whose parent is the postmaster.
    pub fn new(backend: i32) -> Result<Split> {
        let postmaster = parent(backend)?;
        let all = allowed(0)?;
        if all.len() < 2 {
            bail!(
                "a split needs two cores; this process may use {}",
                all.len()
            );
        }
        let (database, rest) = all.split_at(all.len() / 2);
        Ok(Split {
            database: database.to_vec(),
            rest: rest.to_vec(),
            all: all.clone(),
            postmaster,
        })
    }

    /// Puts each side on its cores until the returned guard is dropped.
    pub fn apply(self) -> Result<Applied> {
        self.place(&self.database, &self.rest)?;
        Ok(Applied(self))
    }

    /// `database`'s cores for the postmaster and its children, `rest`'s for this process's
    /// threads and Redis.
    fn place(&self, database: &[usize], rest: &[usize]) -> Result<()> {
        // The postmaster first: when its cores cannot be set (the right to set another
        // user's takes root), nothing has moved yet.
        set(self.postmaster, database).context(
            "placing the postmaster (setting another user's cores takes root or CAP_SYS_NICE)",
        )?;
        let mut server = children(self.postmaster);
        for &pid in &server {
            // A backend that ended meanwhile has nothing left to place.
            let _ = set(pid, database);
        }
        server.insert(self.postmaster);
        for thread in threads()? {
            set(thread, rest).with_context(|| format!("placing thread {thread}"))?;
        }
        // What this process started (`spin up` and its triggers' processes), but never the
        // server, should this process have started it.
        for pid in descendants(std::process::id() as i32).difference(&server) {
            let _ = set(*pid, rest);
        }
        for pid in named("redis-server") {
            let _ = set(pid, rest);
        }
        Ok(())
    }

    /// Postgres's cores and the rest's, as the tables name them.
    pub fn describe(&self) -> String {
        format!(
            "Postgres on core {}, the app and its clients on core {}",
            list(&self.database),
            list(&self.rest)
        )
    }
}

/// A split in force; dropping it gives every process back all the cores.
pub struct Applied(Split);

impl Applied {
    pub fn describe(&self) -> String {
        self.0.describe()
    }
}

impl Drop for Applied {
    fn drop(&mut self) {
        let all = &self.0.all;
        if let Err(e) = self.0.place(all, all) {
            eprintln!("giving the processes back every core: {e:#}");
        }
    }
}

fn list(cores: &[usize]) -> String {
    cores
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The cores `pid` (0: this thread) may run on.
fn allowed(pid: i32) -> Result<Vec<usize>> {
    // SAFETY: a zeroed `cpu_set_t` is a valid empty set, and the call writes at most its
    // size into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `set` is a live `cpu_set_t` of `size` bytes.
    if unsafe { libc::sched_getaffinity(pid, size, &mut set) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_getaffinity");
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: every index is below `CPU_SETSIZE`.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect())
}

/// Lets `pid` (a process or a thread) run on `cores` only.
fn set(pid: i32, cores: &[usize]) -> Result<()> {
    // SAFETY: as in `allowed`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cores {
        // SAFETY: `cpu` came from `allowed`, so it is below `CPU_SETSIZE`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: `set` is a live `cpu_set_t` of `size` bytes.
    if unsafe { libc::sched_setaffinity(pid, size, &set) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
    }
    Ok(())
}

fn parent(pid: i32) -> Result<i32> {
    parent_of(pid)
        .with_context(|| format!("the parent of Postgres backend {pid} (is the server local?)"))
}

/// Field 4 of `/proc/<pid>/stat`: the parent's pid.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = crate::cpu::stat(pid)?;
    crate::cpu::fields(&stat)?.1.get(4 - 3)?.parse().ok()
}

fn children(pid: i32) -> BTreeSet<i32> {
    crate::cpu::processes()
        .filter(|&p| parent_of(p) == Some(pid))
        .collect()
}

/// Every process below `pid`: its children, theirs, and so on.
fn descendants(pid: i32) -> BTreeSet<i32> {
    let mut found = BTreeSet::new();
    let mut next = vec![pid];
    while let Some(p) = next.pop() {
        for child in children(p) {
            if found.insert(child) {
                next.push(child);
            }
        }
    }
    found
}

fn named(comm: &str) -> Vec<i32> {
    crate::cpu::processes()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm)
        })
        .collect()
}

/// This process's threads.
fn threads() -> Result<Vec<i32>> {
    Ok(std::fs::read_dir("/proc/self/task")
        .context("/proc/self/task")?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process standing in for Postgres: a shell (the postmaster) and its `sleep` (a
    /// backend), the shell's pid and the sleep's.
    fn stand_in() -> (std::process::Child, i32, i32) {
        let mut shell = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & echo $!; wait"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        let mut line = String::new();
        let mut out = std::io::BufReader::new(shell.stdout.take().expect("stdout"));
        std::io::BufRead::read_line(&mut out, &mut line).expect("the sleep's pid");
        let id = shell.id() as i32;
        (shell, id, line.trim().parse().expect("a pid"))
    }

    #[test]
    fn a_split_puts_the_server_and_this_process_on_separate_cores_then_gives_them_back() {
        let all = allowed(0).expect("this thread's cores");
        if all.len() < 2 {
            // One core cannot be split: the split is refused, and there is nothing to place.
            let refused = Split::new(std::process::id() as i32)
                .err()
                .expect("refused");
            assert!(refused.to_string().contains("two cores"), "{refused}");
            return;
        }
        let (mut shell, postmaster, backend) = stand_in();
        let split = Split::new(backend).expect("a split");
        assert_eq!(split.postmaster, postmaster, "the backend's parent");
        let (database, rest) = (split.database.clone(), split.rest.clone());
        assert_eq!([database.clone(), rest.clone()].concat(), all);
        {
            let _applied = split.apply().expect("applied");
            assert_eq!(allowed(postmaster).unwrap(), database);
            assert_eq!(
                allowed(backend).unwrap(),
                database,
                "the server's children too"
            );
            assert_eq!(allowed(0).unwrap(), rest, "this process's threads");
            // A thread started during the split inherits its starter's cores.
            let inherited = std::thread::spawn(|| allowed(0).unwrap()).join().unwrap();
            assert_eq!(inherited, rest);
        }
        for pid in [postmaster, backend, 0] {
            assert_eq!(allowed(pid).unwrap(), all, "pid {pid} has every core back");
        }
        let _ = shell.kill();
        let _ = shell.wait();
    }

    #[test]
    fn a_split_names_a_backend_that_is_not_here() {
        // Pids above the kernel's largest (4194304) are never in use.
        let refused = Split::new(5_000_000).err().expect("refused");
        assert!(
            refused.to_string().contains("is the server local"),
            "{refused}"
        );
    }
}
