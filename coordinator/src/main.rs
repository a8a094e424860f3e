//! The `shardmerge` command line: see `shardmerge::cli`.

fn main() -> std::process::ExitCode {
    shardmerge::cli::main()
}
