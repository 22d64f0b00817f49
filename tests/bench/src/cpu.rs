//! CPU time by who spent it, read from `/proc` (Linux): this process (the host with its
//! guests, the no-op tool and the bench's clients; with the Spin CLI's processes when the
//! app runs under Spin), Postgres (its server processes, ended
//! ones included) and Redis. Read before and after a phase, it says where a step's CPU
//! goes.

use std::time::Duration;

/// CPU time so far, by who spent it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    pub bench: Duration,
    pub postgres: Duration,
    pub redis: Duration,
}

/// Clock ticks per second of `/proc/*/stat` (`getconf CLK_TCK`; 100 on Linux).
const TICKS_PER_SECOND: u64 = 100;

impl Cpu {
    pub fn now() -> Cpu {
        let mut cpu = Cpu::default();
        let me = std::process::id() as i32;
        for pid in processes() {
            let Some(stat) = stat(pid) else { continue };
            let Some((comm, ticks)) = parse(&stat) else {
                continue;
            };
            let spent = Duration::from_millis(ticks * 1000 / TICKS_PER_SECOND);
            match comm {
                _ if pid == me => cpu.bench += spent,
                // The app under the Spin CLI: `spin` and its trigger processes.
                "spin" | "trigger-cron" => cpu.bench += spent,
                "postgres" => cpu.postgres += spent,
                "redis-server" => cpu.redis += spent,
                _ => {}
            }
        }
        cpu
    }

    /// What was spent since `before`, per `steps`, in milliseconds: bench, Postgres, Redis.
    pub fn per_step_since(&self, before: &Cpu, steps: usize) -> String {
        let per = |now: Duration, then: Duration| {
            now.saturating_sub(then).as_secs_f64() * 1e3 / steps.max(1) as f64
        };
        format!(
            "{:.2} / {:.2} / {:.2}",
            per(self.bench, before.bench),
            per(self.postgres, before.postgres),
            per(self.redis, before.redis)
        )
    }
}

/// The pids of this machine's live processes.
pub fn processes() -> impl Iterator<Item = i32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
}

/// `/proc/<pid>/stat`, while `pid` lives.
pub fn stat(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()
}

/// A `/proc/<pid>/stat` line's command name and the fields after it (field 3 onwards, as
/// proc(5) numbers them). The name may hold spaces and parentheses: it ends at the last `)`.
pub fn fields(stat: &str) -> Option<(&str, Vec<&str>)> {
    let (head, rest) = stat.rsplit_once(')')?;
    let (_, comm) = head.split_once('(')?;
    Some((comm, rest.split_whitespace().collect()))
}

/// A `/proc/<pid>/stat` line's command name and its CPU ticks: its own user and system
/// time and those of its ended children (Postgres's server processes, once reaped, count
/// in the postmaster's).
fn parse(stat: &str) -> Option<(&str, u64)> {
    let (comm, fields) = fields(stat)?;
    // From field 3 (state): utime (14), stime (15), cutime (16), cstime (17).
    let ticks = fields
        .get(11..15)?
        .iter()
        .map(|f| f.parse::<u64>().ok())
        .sum::<Option<u64>>()?;
    Some((comm, ticks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_its_name_and_the_ticks_of_it_and_its_children() {
        // A name with a space and a parenthesis, as `comm` may have.
        let line = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 11 2 20 0 1 0 5 0 0";
        assert_eq!(parse(line), Some(("a b) c", 7 + 3 + 11 + 2)));
        assert_eq!(parse("42 (x) S 1"), None);
    }
}
