//! The files shipped next to the binary, checked as data: the Grafana
//! dashboard against the metrics the service declares, and the compose file's
//! invariants that its schema cannot express. (Checks that need a running
//! Prometheus, nginx or Compose CLI stay in `scripts/`.)

mod compose;
mod dashboard;

use std::path::{Path, PathBuf};

/// The workspace root, where the shipped files live.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
