//! Benchmark harness for increment (see README in this crate).
