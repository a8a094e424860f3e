//! Test support for the multi-process suites in `tests/`.
