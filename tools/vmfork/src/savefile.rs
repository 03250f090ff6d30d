//! Writing a file so that it is either the old one or the whole new one, never half of either
//! (`vmfork dump FILE`): the data goes to a temporary file beside FILE (same directory, so the
//! rename cannot cross file systems), which is fsynced, then renamed over FILE, then the
//! directory is fsynced so the rename itself survives a crash. Until [`SaveFile::commit`] FILE is
//! untouched; on any error, or if the `SaveFile` is dropped, only the temporary file is removed.
//!
//! Without `overwrite`, an existing FILE is refused up front ([`SaveFile::create`]) and again at
//! the end: the new file is put in place with a hard link, which fails if FILE appeared
//! meanwhile, instead of a rename, which would replace it.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Why a file could not be saved. FILE is unchanged in every case.
#[derive(Debug)]
pub enum SaveError {
    /// FILE exists and overwriting was not asked for.
    Exists(PathBuf),
    /// An I/O error, with what was being done.
    Io(String, io::Error),
}

impl std::fmt::Display for SaveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SaveError::Exists(p) => write!(
                f,
                "{} already exists (use --force to replace it)",
                p.display()
            ),
            SaveError::Io(what, e) => write!(f, "{what}: {e}"),
        }
    }
}

impl std::error::Error for SaveError {}

fn io_err(what: String) -> impl FnOnce(io::Error) -> SaveError {
    move |e| SaveError::Io(what, e)
}

/// A file being written in place of `dest`.
pub struct SaveFile {
    dest: PathBuf,
    tmp: PathBuf,
    file: Option<File>,
    overwrite: bool,
}

/// The directory `path` is in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

impl SaveFile {
    /// Starts writing `dest`: creates a new, uniquely named temporary file beside it. Refuses
    /// an existing `dest` unless `overwrite`.
    pub fn create(dest: &Path, overwrite: bool) -> Result<SaveFile, SaveError> {
        if !overwrite && fs::symlink_metadata(dest).is_ok() {
            return Err(SaveError::Exists(dest.to_path_buf()));
        }
        let name = dest.file_name().ok_or_else(|| {
            SaveError::Io(
                format!("cannot write {}", dest.display()),
                io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
            )
        })?;
        let dir = parent_dir(dest);
        loop {
            let mut tmp_name = OsString::from(".");
            tmp_name.push(name);
            tmp_name.push(format!(
                ".tmp-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let tmp = dir.join(tmp_name);
            // create_new: O_EXCL, so two writers never share a temporary file.
            match OpenOptions::new().write(true).create_new(true).open(&tmp) {
                Ok(file) => {
                    return Ok(SaveFile {
                        dest: dest.to_path_buf(),
                        tmp,
                        file: Some(file),
                        overwrite,
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(SaveError::Io(
                        format!("cannot create a temporary file in {}", dir.display()),
                        e,
                    ))
                }
            }
        }
    }

    /// The temporary file's path (for tests and messages).
    pub fn temp_path(&self) -> &Path {
        &self.tmp
    }

    /// Makes the written data FILE: fsync, then rename (or link, without `overwrite`) into
    /// place, then fsync the directory.
    pub fn commit(mut self) -> Result<(), SaveError> {
        let file = self.file.take().expect("a SaveFile is committed once");
        let tmp_s = self.tmp.display().to_string();
        file.sync_all()
            .map_err(io_err(format!("cannot sync {tmp_s}")))?;
        drop(file);
        if self.overwrite {
            fs::rename(&self.tmp, &self.dest).map_err(io_err(format!(
                "cannot rename {tmp_s} to {}",
                self.dest.display()
            )))?;
        } else {
            match fs::hard_link(&self.tmp, &self.dest) {
                Ok(()) => {
                    let _ = fs::remove_file(&self.tmp);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(SaveError::Exists(self.dest.clone()));
                }
                Err(e) => {
                    return Err(SaveError::Io(
                        format!("cannot link {tmp_s} to {}", self.dest.display()),
                        e,
                    ))
                }
            }
        }
        let dir = parent_dir(&self.dest);
        // The new name is in place; from here on there is no temporary file to remove.
        self.tmp = PathBuf::new();
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(format!("cannot sync directory {}", dir.display())))
    }
}

impl Write for SaveFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file
            .as_mut()
            .ok_or_else(|| io::Error::other("already committed"))?
            .write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }
}

impl Drop for SaveFile {
    fn drop(&mut self) {
        self.file.take();
        if !self.tmp.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temps(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect()
    }

    #[test]
    fn commit_puts_the_whole_file_in_place() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a.snap");
        let mut s = SaveFile::create(&f, false).unwrap();
        assert_eq!(s.temp_path().parent(), Some(d.path()));
        s.write_all(b"new").unwrap();
        assert!(!f.exists(), "nothing is at FILE before the commit");
        s.commit().unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"new");
        assert!(temps(d.path()).is_empty());
    }

    #[test]
    fn an_existing_file_is_refused_without_overwrite_and_kept() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a.snap");
        fs::write(&f, b"old").unwrap();
        assert!(matches!(
            SaveFile::create(&f, false),
            Err(SaveError::Exists(_))
        ));
        // FILE appearing while the data is written is not replaced either.
        let g = d.path().join("b.snap");
        let mut s = SaveFile::create(&g, false).unwrap();
        s.write_all(b"new").unwrap();
        fs::write(&g, b"theirs").unwrap();
        assert!(matches!(s.commit(), Err(SaveError::Exists(_))));
        assert_eq!(fs::read(&g).unwrap(), b"theirs");
        assert_eq!(fs::read(&f).unwrap(), b"old");
        assert!(temps(d.path()).is_empty());
    }

    #[test]
    fn overwrite_replaces_only_at_the_commit() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a.snap");
        fs::write(&f, b"old").unwrap();
        let mut s = SaveFile::create(&f, true).unwrap();
        s.write_all(b"new data").unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"old");
        s.commit().unwrap();
        assert_eq!(fs::read(&f).unwrap(), b"new data");
        assert!(temps(d.path()).is_empty());
    }

    #[test]
    fn dropping_without_commit_removes_only_the_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a.snap");
        fs::write(&f, b"old").unwrap();
        let mut s = SaveFile::create(&f, true).unwrap();
        s.write_all(b"half").unwrap();
        assert_eq!(temps(d.path()).len(), 1);
        drop(s);
        assert_eq!(fs::read(&f).unwrap(), b"old");
        assert!(temps(d.path()).is_empty());
    }

    #[test]
    fn temporary_names_are_unique() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a.snap");
        let a = SaveFile::create(&f, true).unwrap();
        let b = SaveFile::create(&f, true).unwrap();
        assert_ne!(a.temp_path(), b.temp_path());
    }

    #[test]
    fn a_bare_file_name_lives_in_the_current_directory() {
        assert_eq!(parent_dir(Path::new("x.snap")), Path::new("."));
        assert_eq!(parent_dir(Path::new("/d/x.snap")), Path::new("/d"));
    }
}
