//! Processes a worker of this host started and no longer holds: when a worker dies
//! without stopping its children (SIGKILL, a crash), they live on, and the worker that
//! takes the request over must find and adopt them instead of starting a second one.
//!
//! Every process the platform starts carries `PROVISIONER_REQUEST_ID` and `PORT` in its
//! environment; on Linux `/proc/<pid>/environ` tells them apart from anything else (a
//! recycled pid has another environment). Elsewhere nothing is adopted.

/// A live process started for a request, found by its environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Orphan {
    pub pid: u32,
    pub port: u16,
}

/// The variable naming the request a process was started for.
pub const REQUEST_VARIABLE: &str = "PROVISIONER_REQUEST_ID";

/// The live process started for `request_id`, if one is left on this host.
pub fn find(request_id: &str) -> Option<Orphan> {
    let entries = std::fs::read_dir("/proc").ok()?;
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .find_map(|pid| {
            of_request(pid)
                .filter(|(id, _)| id == request_id)
                .map(|(_, o)| o)
        })
}

/// The request and port of a live process this platform started, by pid.
pub fn of_pid(pid: u32) -> Option<(String, Orphan)> {
    of_request(pid)
}

fn of_request(pid: u32) -> Option<(String, Orphan)> {
    if !alive(pid) {
        return None;
    }
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let mut request = None;
    let mut port = None;
    for variable in environ.split(|b| *b == 0) {
        let Ok(variable) = std::str::from_utf8(variable) else {
            continue;
        };
        if let Some(id) = variable.strip_prefix(&format!("{REQUEST_VARIABLE}=")) {
            request = Some(id.to_owned());
        } else if let Some(value) = variable.strip_prefix("PORT=") {
            port = value.parse().ok();
        }
    }
    Some((request?, Orphan { pid, port: port? }))
}

/// Whether the process runs (a zombie that nobody reaped yet does not).
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may hold spaces.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state != "Z" && state != "X")
}

/// Stops an adopted process: SIGTERM, then SIGKILL if it is still there after a while.
/// Not our child, so it is signalled by pid with `kill(1)` (this crate has no unsafe code).
pub async fn stop(pid: u32) -> Result<(), String> {
    let signal = |name: &str| {
        std::process::Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
    };
    signal("TERM").map_err(|e| format!("cannot signal process {pid}: {e}"))?;
    for _ in 0..50 {
        if !alive(pid) {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    signal("KILL").map_err(|e| format!("cannot signal process {pid}: {e}"))?;
    for _ in 0..20 {
        if !alive(pid) {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Err(format!("process {pid} is still running after SIGKILL"))
}
