//! Fault points: places in the runtime where a test build can make the worker die on the
//! spot, to prove that a crash at any step boundary loses, duplicates and leaks nothing.
//!
//! Compiled in only with the `fault-injection` feature (the end-to-end tests turn it on);
//! in every other build [`point`] is an empty inline function. In a test build, the
//! process aborts at the point named by `PROVISIONER_FAULT_POINT` — no destructor runs, no
//! delivery is settled, no lease released, as with SIGKILL — once per marker file
//! `PROVISIONER_FAULT_ONCE` (created by the first process that stops there), so the
//! worker that takes over carries on.

/// The step boundaries of one delivery, in order.
pub const POINTS: [&str; 5] = [
    "after_receive",
    "after_claim",
    "after_platform_call",
    "after_record",
    "after_publish",
];

/// Dies here if this test build was told to.
#[cfg(feature = "fault-injection")]
pub fn point(name: &str) {
    if std::env::var("PROVISIONER_FAULT_POINT").ok().as_deref() != Some(name) {
        return;
    }
    if let Ok(marker) = std::env::var("PROVISIONER_FAULT_ONCE")
        && std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&marker)
            .is_err()
    {
        return;
    }
    eprintln!("fault injection: aborting at {name}");
    std::process::abort();
}

#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) {}
