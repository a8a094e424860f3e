//! Test support for the multi-process suites in `tests/`, and the synthetic model family used
//! by tests, `examples/` and `bench/`.

pub mod family;
