//! The embedded merge of one recipe with its summary lines: what `run` does for a recipe, for
//! each point of a sweep and for each stage of a multi-stage recipe.

use crate::embedded::{self, RunOptions};
use crate::error::Result;
use crate::size;
use shardmerge_worker::storage::Resolver;

/// The embedded merge of one recipe, with its summary lines.
pub(super) async fn run_one(
    text: &str,
    out: &str,
    o: &RunOptions,
    resolver: Resolver,
) -> Result<()> {
    let s = embedded::run(text, out, o, resolver).await?;
    if !o.quiet {
        summary_lines(&s);
    }
    Ok(())
}

/// The lines that end a merge: what it wrote and read.
pub(super) fn summary_lines(s: &embedded::Summary) {
    let peak = size::peak_rss().map_or(String::new(), |b| {
        format!(", peak memory {}", size::human(b))
    });
    eprintln!(
        "merged {} tensors into {} file(s), {}{peak} -> {}",
        s.plan.tensors.len(),
        s.plan.files.len(),
        size::bytes_in(s.plan.bytes_out(), s.status.elapsed_seconds),
        s.status.output_uri
    );
    eprintln!(
        "{}{}",
        crate::progress::reads_line(&s.status, Some(s.plan.bytes_in())),
        crate::progress::input_lines(&s.status)
    );
}
