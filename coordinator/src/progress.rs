//! What a client shows of a job: its status line, the progress bar, when to stop waiting, and
//! what a cancel came to; writing to standard output.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use shardmerge_proto as pb;

use crate::error::{Error, Result};
use crate::size;

/// How far a job is, in percent (0 to 100): its work done over its work total, the one
/// measure of progress. Work is every input byte a task reads plus every output byte it writes,
/// statistics passes included (a pass reads its tensor's inputs and writes nothing), so it
/// moves from the first pass on; the task count is no measure (statistics passes add their next pass's tasks as each one
/// finishes). A succeeded job is at 100.
pub fn percent(s: &pb::JobStatus) -> f64 {
    if matches!(pb::JobState::try_from(s.state), Ok(pb::JobState::Succeeded)) {
        return 100.0;
    }
    if s.work_total == 0 {
        return 0.0;
    }
    (100.0 * s.work_done as f64 / s.work_total as f64).clamp(0.0, 100.0)
}

/// A byte progress bar on stderr; hidden when `quiet` or stderr is not a terminal. It counts
/// work (see [`percent`]): input bytes read plus output bytes written.
pub fn progress_bar(total: u64, quiet: bool) -> ProgressBar {
    if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} read+written {binary_bytes_per_sec} ETA {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// Whether a job in state `state` has ended (succeeded, failed or cancelled).
pub fn is_terminal(state: i32) -> bool {
    matches!(
        pb::JobState::try_from(state),
        Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled)
    )
}

/// Whether the job `s` describes has ended.
pub fn terminal(s: &pb::JobStatus) -> bool {
    is_terminal(s.state)
}

pub fn state_name(s: i32) -> &'static str {
    match pb::JobState::try_from(s) {
        Ok(pb::JobState::Queued) => "queued",
        Ok(pb::JobState::Running) => "running",
        Ok(pb::JobState::Committing) => "committing",
        Ok(pb::JobState::Succeeded) => "succeeded",
        Ok(pb::JobState::Failed) => "failed",
        Ok(pb::JobState::Cancelled) => "cancelled",
        _ => "unknown",
    }
}

/// One line describing a job: its state, how far it is (one measure: the share of its work,
/// input bytes read plus output bytes written, statistics passes included; see
/// [`percent`]), its tasks done and running (no total: statistics passes add tasks as
/// they go), its time (stopped at its end), retries and output; the error of a job that did
/// not succeed on a second line.
pub fn describe(s: &pb::JobStatus) -> String {
    let running = if s.leases_active > 0 {
        format!(", {} running", s.leases_active)
    } else {
        String::new()
    };
    let mut line = format!(
        "{}  {:<10} {:>5.1}% of {} to read and write  read {}/{}  tasks {} done{running}  {}  retries {}  -> {}",
        s.job_id,
        state_name(s.state),
        percent(s),
        size::human(s.work_total),
        size::human(s.bytes_read),
        size::human(s.bytes_read_total),
        s.tasks_done,
        size::duration(s.elapsed_seconds),
        s.retries,
        s.output_uri
    );
    if let Some(a) = audits(s) {
        line.push_str(&format!("\n  {a}"));
    }
    if !s.error.is_empty()
        && !matches!(pb::JobState::try_from(s.state), Ok(pb::JobState::Succeeded))
    {
        line.push_str(&format!("\n  error: {}", s.error));
    }
    line
}

/// The line on a job's result audits, when it had any: how many passed, failed and could not
/// run, and the worker processes quarantined.
fn audits(s: &pb::JobStatus) -> Option<String> {
    let (p, f, k) = (s.audits_passed, s.audits_failed, s.audits_skipped);
    if p + f + k == 0 && s.quarantined.is_empty() {
        return None;
    }
    let mut a = format!("audits {p} passed, {f} failed");
    if k > 0 {
        a.push_str(&format!(
            ", {k} skipped (no other worker process to run them)"
        ));
    }
    if !s.quarantined.is_empty() {
        a.push_str(&format!(
            "; quarantined (results found wrong, their tasks ran again): {}",
            s.quarantined.join(", ")
        ));
    }
    Some(a)
}

/// What `cancel` reports for job `id`, given whether it had ended before the call and its
/// status after it.
pub fn cancel_outcome(id: &str, ended_before: bool, after: &pb::JobStatus) -> Result<()> {
    let state = pb::JobState::try_from(after.state);
    match (ended_before, state) {
        (false, Ok(pb::JobState::Cancelled)) => {
            eprintln!("{id} cancelled: its uploads are aborted");
            Ok(())
        }
        (true, Ok(pb::JobState::Cancelled)) => {
            eprintln!("{id} already ended: it was cancelled before");
            Ok(())
        }
        (_, Ok(pb::JobState::Committing)) => Err(Error::job(
            id,
            format!(
                "{id} is committing (every data file is written): too late to cancel; it finishes"
            ),
        )),
        (_, _) if terminal(after) => Err(Error::job(
            id,
            format!(
                "{id} already ended ({}): nothing to cancel",
                state_name(after.state)
            ),
        )),
        (_, _) => Err(Error::job(
            id,
            format!("{id} is still {} after the cancel", state_name(after.state)),
        )),
    }
}

/// What a finished job read: the input bytes it read from storage, every pass included, against
/// the plan's figure and, when known, the input tensors' bytes.
pub fn reads_line(s: &pb::JobStatus, inputs: Option<u64>) -> String {
    let mut line = format!(
        "read {} from storage (planned {})",
        size::human(s.bytes_read),
        size::human(s.bytes_read_total)
    );
    if let Some(n) = inputs.filter(|&n| n > 0) {
        line.push_str(&format!(
            ", {:.2}x the input tensors' {}",
            s.bytes_read as f64 / n as f64,
            size::human(n)
        ));
    }
    line
}

/// What a job read from each of its inputs (each model's location: its store), every pass
/// included, against the plan's figure: one line each, each starting with a line break; empty
/// for a status without them (an older coordinator's).
pub fn input_lines(s: &pb::JobStatus) -> String {
    let line = |i: &pb::InputRead| {
        format!(
            "\n  read from {}: {} (planned {})",
            i.input,
            size::human(i.bytes_read),
            size::human(i.bytes_read_total)
        )
    };
    s.inputs.iter().map(line).collect()
}

/// Writes `text` to standard output. A reader that went away (`shardmerge status | head -1`)
/// ends the program quietly, as the pipe asked; another failure to write is reported, exit 1.
pub(crate) fn stdout(text: &str) {
    use std::io::Write;
    let mut o = std::io::stdout().lock();
    if let Err(e) = o.write_all(text.as_bytes()).and_then(|()| o.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("error: writing to standard output: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(state: pb::JobState, work_done: u64, work_total: u64) -> pb::JobStatus {
        pb::JobStatus {
            state: state as i32,
            work_done,
            work_total,
            ..Default::default()
        }
    }

    /// A failed job once showed 500.0%: its work done had counted five rewrites of one file.
    #[test]
    fn percent_stays_within_0_and_100() {
        assert_eq!(percent(&status(pb::JobState::Failed, 500, 100)), 100.0);
        assert_eq!(percent(&status(pb::JobState::Running, 25, 100)), 25.0);
        assert_eq!(percent(&status(pb::JobState::Running, 0, 0)), 0.0);
        assert_eq!(percent(&status(pb::JobState::Succeeded, 0, 0)), 100.0);
    }
}
