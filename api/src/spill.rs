//! The spill file: what the final flush could not write before the shutdown
//! deadline, kept on local disk and replayed, exactly once, at the next start.
//!
//! Each part of a batch is kept as one line with its id, so a part whose
//! commit was in flight when the database went away is not applied twice on
//! replay (the id is then found in `flush_batches`). The file is written whole to a temporary name, fsync'd,
//! renamed over the real name and the directory fsync'd: after a crash there is
//! either the old file or the new one, never half of one.

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::batch::{Batch, Keyed};

/// Why the spill file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    #[error("spill file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("spill file {path} is not valid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "spill file {path} is in use by another running instance (its lock {lock} is held): \
         give each instance its own --spill-path, or let them share a --spill-dir"
    )]
    InUse { path: PathBuf, lock: PathBuf },
}

/// One part of a batch on disk (replayed as a batch of one part under the
/// same id). Deltas are decimal strings: a sum may exceed 64 bits.
#[derive(Serialize, Deserialize)]
struct SpilledBatch {
    batch_id: String,
    deltas: Vec<(String, String)>,
    /// Requests with an `Idempotency-Key` whose items `deltas` include (a
    /// batch holding any is one part); absent in files of earlier versions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    keyed: Vec<SpilledKeyed>,
}

#[derive(Serialize, Deserialize)]
struct SpilledKeyed {
    key: String,
    fingerprint: i64,
    items: Vec<(String, i64)>,
    /// When it was taken, in Unix milliseconds (`Keyed::taken_at`); absent
    /// in files of earlier versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    taken_ms: Option<i64>,
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> SpillError + '_ {
    move |source| SpillError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `batches` (after any batches already in the file) durably to `path`.
///
/// # Errors
/// [`SpillError`] when the file cannot be written or synced.
pub fn write(path: &Path, batches: &[Arc<Batch>]) -> Result<(), SpillError> {
    let mut all: Vec<SpilledBatch> = match read(path)? {
        Some(existing) => existing.iter().flat_map(to_disk).collect(),
        None => Vec::new(),
    };
    all.extend(batches.iter().flat_map(|b| to_disk(b)));
    let mut text = String::new();
    for batch in &all {
        let line = serde_json::to_string(batch).map_err(|e| SpillError::Invalid {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        text.push_str(&line);
        text.push('\n');
    }
    let directory = directory_of(path);
    // It existed at start (the probe); a person may have removed it since,
    // and the increments are better written than lost for that.
    fs::create_dir_all(directory).map_err(io_error(directory))?;
    let temporary = path.with_extension("tmp");
    let mut file = fs::File::create(&temporary).map_err(io_error(&temporary))?;
    file.write_all(text.as_bytes())
        .map_err(io_error(&temporary))?;
    file.sync_all().map_err(io_error(&temporary))?;
    drop(file);
    fs::rename(&temporary, path).map_err(io_error(path))?;
    // The file is in place once renamed and will be replayed: a failed
    // directory sync only leaves the rename exposed to a power loss, and
    // reporting the increments lost would invite an operator to resend them.
    if let Err(e) = fs::File::open(directory).and_then(|dir| dir.sync_all()) {
        tracing::warn!(path = %path.display(), error = %e, "the spill file is written, but its directory could not be synced: a power loss may still undo it");
    }
    Ok(())
}

fn to_disk(batch: &Batch) -> Vec<SpilledBatch> {
    batch
        .parts
        .iter()
        .map(|part| SpilledBatch {
            batch_id: part.id.clone(),
            deltas: batch
                .rows(part)
                .iter()
                .map(|(key, delta)| (key.clone(), delta.to_string()))
                .collect(),
            keyed: batch
                .keyed
                .iter()
                .map(|request| SpilledKeyed {
                    key: request.key.clone(),
                    fingerprint: request.fingerprint,
                    items: request.items.clone(),
                    taken_ms: request.taken_at.map(|at| at.timestamp_millis()),
                })
                .collect(),
        })
        .collect()
}

/// The batches in `path`, or `None` when there is no spill file.
///
/// # Errors
/// [`SpillError`] when the file exists but cannot be read or parsed.
pub fn read(path: &Path) -> Result<Option<Vec<Batch>>, SpillError> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(path)(e)),
    };
    parse(path, &text_of(path, bytes)?).map(Some)
}

/// A spill file's bytes as text: bytes that are not UTF-8 make the file
/// invalid (set aside), not an I/O error that would stop every start.
fn text_of(path: &Path, bytes: Vec<u8>) -> Result<String, SpillError> {
    String::from_utf8(bytes).map_err(|e| SpillError::Invalid {
        path: path.to_owned(),
        reason: format!("not UTF-8 ({e})"),
    })
}

/// The batches in the text of the spill file `path`.
fn parse(path: &Path, text: &str) -> Result<Vec<Batch>, SpillError> {
    let invalid = |reason: String| SpillError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let mut batches = Vec::new();
    for (number, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let spilled: SpilledBatch =
            serde_json::from_str(line).map_err(|e| invalid(format!("line {}: {e}", number + 1)))?;
        let mut deltas = Vec::with_capacity(spilled.deltas.len());
        for (key, delta) in spilled.deltas {
            let delta: i128 = delta
                .parse()
                .map_err(|_| invalid(format!("line {}: delta {delta:?}", number + 1)))?;
            deltas.push((key, delta));
        }
        let keyed = spilled
            .keyed
            .into_iter()
            .map(|request| Keyed {
                key: request.key,
                fingerprint: request.fingerprint,
                items: request.items,
                taken_at: request
                    .taken_ms
                    .and_then(chrono::DateTime::from_timestamp_millis),
            })
            .collect();
        batches.push(Batch::restored(spilled.batch_id, deltas).guarding(keyed));
    }
    Ok(batches)
}

/// Deletes the spill file once its batches are written.
///
/// # Errors
/// [`SpillError`] when it exists and cannot be removed.
pub fn remove(path: &Path) -> Result<(), SpillError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error(path)(e)),
    }
}

/// The directory `path` is in (`.` for a bare file name).
pub fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Renames a spill file that cannot be parsed out of the way of every later
/// start, to `….<unix ms>.invalid` beside it (a name no earlier one used),
/// and returns that name: kept for a person to look at.
///
/// # Errors
/// [`SpillError`] when it cannot be renamed.
pub fn set_aside(path: &Path) -> Result<PathBuf, SpillError> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis());
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{now_ms}.invalid"));
    let aside = PathBuf::from(name);
    fs::rename(path, &aside).map_err(io_error(path))?;
    Ok(aside)
}

/// Creates, writes, syncs and deletes a file in `dir`, where spill files
/// will be written: a location the final flush could not write to (a
/// read-only or missing directory, no permission) is found at start, not
/// at the shutdown that needed it. A missing directory is not made: a
/// mistyped path would put the spill files where no volume keeps them.
///
/// # Errors
/// [`SpillError`] naming the probe file and what failed.
pub fn probe(dir: &Path) -> Result<(), SpillError> {
    let probe = dir.join(format!(
        ".increment-probe-{}.tmp",
        uuid::Uuid::new_v4().simple()
    ));
    let written = fs::File::create(&probe)
        .and_then(|mut file| file.write_all(b"probe\n").and_then(|()| file.sync_all()));
    let removed = fs::remove_file(&probe);
    written.map_err(io_error(&probe))?;
    removed.map_err(io_error(&probe))
}

/// One spill file's lock, held by the process that spills to it
/// (`--spill-path`) for as long as it runs: two instances that shared the
/// file would replay and delete each other's spills (one replaying a file
/// while the other rewrote it lost the other's increments). The lock is a
/// file beside it (`….lock`), not the spill file, which each write replaces.
/// Deleted when dropped, while still held.
pub struct PathLock {
    lock: PathBuf,
    /// Holds the lock (when the filesystem has locks).
    _file: fs::File,
}

impl Drop for PathLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.lock);
    }
}

/// Takes `spill_path`'s lock for this process.
///
/// # Errors
/// [`SpillError::InUse`] when another process holds it; [`SpillError::Io`]
/// when the lock file cannot be created or locked.
pub fn lock_path(spill_path: &Path) -> Result<PathLock, SpillError> {
    let mut name = spill_path.as_os_str().to_owned();
    name.push(".lock");
    let lock = PathBuf::from(name);
    // A holder deletes the file as it lets go: a handle opened just before
    // that is of a file no longer named, so open it again.
    for _ in 0..10 {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock)
            .map_err(io_error(&lock))?;
        match take_lock(file, &lock).map_err(io_error(&lock))? {
            Locking::Held(file) => return Ok(PathLock { lock, _file: file }),
            Locking::HeldElsewhere => {
                return Err(SpillError::InUse {
                    path: spill_path.to_owned(),
                    lock,
                });
            }
            // Nothing to enforce with.
            Locking::Unlockable(file, e) => {
                tracing::warn!(path = %lock.display(), error = %e, "cannot lock the spill file; make sure no other instance uses it");
                return Ok(PathLock { lock, _file: file });
            }
            Locking::Replaced => {}
        }
    }
    Err(io_error(&lock)(io::Error::other(
        "its lock file kept being replaced",
    )))
}

/// How taking the lock of a file opened as `path` ended.
enum Locking {
    /// Locked by this process, and still the file named `path`.
    Held(fs::File),
    /// Another process holds it.
    HeldElsewhere,
    /// The filesystem has no locks (NFS mounted `nolock`); still the file
    /// named `path`.
    Unlockable(fs::File, io::Error),
    /// `path` no longer names the opened file: between the open and the
    /// lock, its holder removed (or replaced) it.
    Replaced,
}

/// Takes an exclusive lock on `file` without waiting. Open it for writing:
/// NFS emulates `flock` with POSIX locks, and an exclusive one needs that.
fn take_lock(file: fs::File, path: &Path) -> io::Result<Locking> {
    let unlockable = match file.try_lock() {
        Ok(()) => None,
        Err(fs::TryLockError::WouldBlock) => return Ok(Locking::HeldElsewhere),
        Err(fs::TryLockError::Error(e)) => Some(e),
    };
    if !same_file(&file, path)? {
        return Ok(Locking::Replaced);
    }
    Ok(match unlockable {
        None => Locking::Held(file),
        Some(e) => Locking::Unlockable(file, e),
    })
}

/// The extension of spill files; a directory shared by instances is
/// scanned for it (files being written have `.tmp` until renamed).
const EXTENSION: &str = "jsonl";

/// The spill file of one run of an instance in a shared directory: a name no
/// other run uses, so instances never write each other's files, beginning
/// with the run's start time so that names sort oldest first.
pub fn own_file(dir: &Path) -> PathBuf {
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| since.as_millis());
    dir.join(format!(
        "spill-{started_ms:013}-{}.{EXTENSION}",
        uuid::Uuid::new_v4().simple()
    ))
}

/// Spill files left in `dir` by earlier runs of any instance sharing it,
/// oldest name first; an absent directory has none.
///
/// # Errors
/// [`SpillError`] when the directory cannot be listed.
pub fn left_in(dir: &Path) -> Result<Vec<PathBuf>, SpillError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(dir)(e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(io_error(dir))?.path();
        if path.extension().is_some_and(|e| e == EXTENSION) && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// A spill file locked by this process for its replay: another instance
/// starting meanwhile skips it, and one that starts after finds it gone.
/// The lock goes with the process, so a replay cut short by a crash is
/// taken up by the next start (its batches keep their ids: nothing is
/// applied twice).
pub struct Claimed {
    path: PathBuf,
    /// Holds the lock (when the filesystem has locks; see [`claim`]).
    file: fs::File,
}

impl Claimed {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its batches, read through the locked handle (where locks are
    /// mandatory, as on SMB, another handle could not read it).
    ///
    /// # Errors
    /// [`SpillError`] when it cannot be read or parsed.
    pub fn read(&mut self) -> Result<Vec<Batch>, SpillError> {
        use std::io::Read as _;
        let mut bytes = Vec::new();
        self.file
            .read_to_end(&mut bytes)
            .map_err(io_error(&self.path))?;
        parse(&self.path, &text_of(&self.path, bytes)?)
    }

    /// Sets a file that cannot be parsed aside, as [`set_aside`] does.
    ///
    /// # Errors
    /// [`SpillError`] when it cannot be renamed.
    pub fn set_aside(self) -> Result<PathBuf, SpillError> {
        set_aside(&self.path)
    }

    /// Deletes the file once its batches are written, then lets go of it.
    ///
    /// # Errors
    /// [`SpillError`] when it cannot be removed.
    pub fn remove(self) -> Result<(), SpillError> {
        remove(&self.path)
    }
}

/// Locks `path` for replay; `None` when another process holds it or it was
/// replayed and removed since it was listed.
///
/// # Errors
/// [`SpillError`] when it cannot be opened or locked for another reason.
pub fn claim(path: &Path) -> Result<Option<Claimed>, SpillError> {
    let file = match fs::OpenOptions::new().read(true).write(true).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error(path)(e)),
    };
    let file = match take_lock(file, path).map_err(io_error(path))? {
        Locking::Held(file) => file,
        // Being replayed, or replayed and removed since it was listed.
        Locking::HeldElsewhere | Locking::Replaced => return Ok(None),
        // Replay anyway. Two instances replaying one file at once stay
        // exact: each part is applied under its id, once (the ledger), only
        // the slower replay then finds its parts applied.
        Locking::Unlockable(file, e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot lock the spill file; replaying it unlocked");
            file
        }
    };
    Ok(Some(Claimed {
        path: path.to_owned(),
        file,
    }))
}

#[cfg(unix)]
fn same_file(file: &fs::File, path: &Path) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let open = file.metadata()?;
    match fs::metadata(path) {
        Ok(named) => Ok(named.dev() == open.dev() && named.ino() == open.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(not(unix))]
fn same_file(_: &fs::File, path: &Path) -> io::Result<bool> {
    Ok(path.exists())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_directory_lists_finished_spill_files_and_claims_each_once() {
        let dir = tempfile::tempdir().unwrap();
        assert!(left_in(&dir.path().join("absent")).unwrap().is_empty());
        let batch = Arc::new(Batch::new([("a".to_owned(), 1)], 1));
        let first = own_file(dir.path());
        let second = own_file(dir.path());
        assert_ne!(first, second, "each run has its own file");
        write(&first, std::slice::from_ref(&batch)).unwrap();
        write(&second, std::slice::from_ref(&batch)).unwrap();
        fs::write(dir.path().join("spill-x.tmp"), "half written").unwrap();
        let mut expected = vec![first.clone(), second.clone()];
        expected.sort();
        assert_eq!(left_in(dir.path()).unwrap(), expected, "not the .tmp");

        let claimed = claim(&first).unwrap().expect("free");
        assert!(claim(&first).unwrap().is_none(), "held by another replay");
        let before_removal = fs::File::open(&first).unwrap();
        claimed.remove().unwrap();
        assert!(claim(&first).unwrap().is_none(), "gone");
        // A handle opened before the removal locks a file no longer there.
        before_removal.try_lock().unwrap();
        assert!(!same_file(&before_removal, &first).unwrap());
        assert!(claim(&second).unwrap().is_some());
    }

    #[test]
    fn batches_round_trip_with_their_ids_and_wide_deltas() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.jsonl");
        assert!(read(&path).unwrap().is_none());
        let first = Arc::new(Batch::new(
            [("a".to_owned(), 1), ("b\n\"q\"".to_owned(), -2)],
            3,
        ));
        let wide = Arc::new(
            Batch::new([("w".to_owned(), 3 * i128::from(i64::MAX))], 0).guarding(vec![
                Keyed {
                    key: "retry-1".to_owned(),
                    fingerprint: -5,
                    items: vec![("w".to_owned(), 7)],
                    taken_at: chrono::DateTime::from_timestamp_millis(1_765_000_000_123),
                },
                Keyed {
                    key: "retry-2".to_owned(),
                    fingerprint: 6,
                    items: vec![("w".to_owned(), 1)],
                    taken_at: None,
                },
            ]),
        );
        write(&path, std::slice::from_ref(&first)).unwrap();
        write(&path, std::slice::from_ref(&wide)).unwrap();
        let back = read(&path).unwrap().unwrap();
        assert_eq!(back.len(), 2, "a second spill appends");
        assert_eq!(back[0].id, first.id);
        assert_eq!(back[0].deltas, first.deltas);
        assert_eq!(back[1].deltas, wide.deltas);
        assert!(back[0].keyed.is_empty());
        assert_eq!(
            back[1].keyed, wide.keyed,
            "keyed requests are kept, with when they were taken"
        );
        remove(&path).unwrap();
        assert!(read(&path).unwrap().is_none());
    }

    /// The directory exists at start (the probe), but a person may remove it
    /// while the instance runs; the shutdown that spills must not fail for that.
    #[test]
    fn a_spill_into_a_directory_removed_since_the_start_makes_it_again() {
        let dir = tempfile::tempdir().unwrap();
        let spill_dir = dir.path().join("spill");
        fs::create_dir(&spill_dir).unwrap();
        probe(&spill_dir).unwrap();
        fs::remove_dir(&spill_dir).unwrap();
        let path = own_file(&spill_dir);
        let batch = Arc::new(Batch::new([("a".to_owned(), 1)], 1));
        write(&path, &[batch]).unwrap();
        let read_back = read(&path).unwrap().unwrap();
        assert_eq!(read_back.len(), 1);
    }

    #[test]
    fn each_part_of_a_large_batch_is_kept_under_its_own_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.jsonl");
        let keys = crate::batch::PART_ROWS + 5;
        let large = Arc::new(Batch::new((0..keys).map(|i| (format!("k{i:07}"), 1)), 4));
        assert_eq!(large.parts.len(), 2);
        write(&path, std::slice::from_ref(&large)).unwrap();
        let back = read(&path).unwrap().unwrap();
        let ids: Vec<&str> = back.iter().map(|b| b.id.as_str()).collect();
        let part_ids: Vec<&str> = large.parts.iter().map(|p| p.id.as_str()).collect();
        assert_eq!(ids, part_ids);
        assert!(back.iter().all(|b| b.parts.len() == 1));
        let rows: Vec<(String, i128)> = back.iter().flat_map(|b| b.deltas.clone()).collect();
        assert_eq!(rows, large.deltas);
    }

    #[test]
    fn a_damaged_file_is_an_error_not_an_empty_spill() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spill.jsonl");
        fs::write(&path, "{not json\n").unwrap();
        assert!(matches!(read(&path), Err(SpillError::Invalid { .. })));
    }
}
