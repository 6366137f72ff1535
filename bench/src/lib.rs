//! Benchmark harness for increment: a keep-alive HTTP/1.1 load generator
//! (`loadgen`), the ceiling servers it is compared with (`ceiling`), and the
//! pieces they share. `scripts/bench.sh` drives them; `BENCHMARKS.md` holds
//! the results.

pub mod http;
pub mod keys;
