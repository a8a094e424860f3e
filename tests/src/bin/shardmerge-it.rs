//! The `shardmerge` program, for the multi-process suites (see `Cargo.toml`).

fn main() -> std::process::ExitCode {
    shardmerge::cli::main()
}
