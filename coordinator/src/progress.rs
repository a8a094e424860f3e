//! What a client shows while it waits for a job: the progress bar and when to stop waiting.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use shardmerge_proto as pb;

/// A byte progress bar on stderr; hidden when `quiet` or stderr is not a terminal.
pub fn progress_bar(total: u64, quiet: bool) -> ProgressBar {
    if quiet || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
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
