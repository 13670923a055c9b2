//! Writing files that hold secrets (private keys, passwords, tokens), the
//! one way every writer in the agent, the fleet server and `fleetctl` uses.
//!
//! Opening the destination itself with `create` + `truncate` would keep an
//! existing file's mode (a key file left at 0644 stays world-readable) and
//! would follow a symlink planted at the destination, writing the secret
//! wherever it points. Instead the bytes go into a *new* file created
//! beside the destination under a random name (`O_CREAT | O_EXCL`, which
//! never follows a link), with mode 0600 set on the open file, fsynced,
//! and then moved into place: [`write`] renames it over the destination
//! (a rename replaces a symlink, it does not follow it), [`write_new`]
//! links it there only if nothing is there yet. Either way a reader sees
//! the old file or the whole new one, and after a crash at most a
//! temporary file (mode 0600) is left behind.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// The mode secrets are written with: readable and writable by the owner
/// only.
pub const SECRET_MODE: u32 = 0o600;

/// Writes `bytes` to `path` with mode 0600, replacing whatever is there (a
/// file of any mode, or a symlink, which is replaced rather than followed;
/// the file it pointed to is left alone).
pub fn write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_with_mode(path, bytes, SECRET_MODE)
}

/// Writes `bytes` to `path` with mode 0600 only if `path` does not exist
/// (not even as a dangling symlink): fails with
/// [`io::ErrorKind::AlreadyExists`] otherwise and changes nothing.
pub fn write_new(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = write_temp(path, bytes, SECRET_MODE)?;
    // link(2) fails if `path` exists, whatever it is, and never follows
    // a symlink there; a file that appeared meanwhile is never replaced.
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    linked?;
    sync_dir(path)
}

/// As [`write`], with another mode: the same atomic, link-safe replace
/// for files that are not secret (e.g. 0644 for a public document).
pub fn write_with_mode(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    let tmp = write_temp(path, bytes, mode)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(path)
}

/// Creates a new file beside `path` under a random name with `mode`,
/// writes and fsyncs `bytes`; returns its path.
fn write_temp(path: &Path, bytes: &[u8], mode: u32) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} names no file", path.display()),
            )
        })?
        .to_string_lossy();
    let dir = parent(path);
    let mut attempts = 0;
    let (tmp, mut file) = loop {
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).map_err(|e| io::Error::other(e.to_string()))?;
        let tmp = dir.join(format!(".{name}.{}.tmp", hex::encode(random)));
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
        match options.open(&tmp) {
            Ok(file) => break (tmp, file),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 8 => {
                attempts += 1;
            }
            Err(e) => return Err(e),
        }
    };
    let result = (|| {
        // The mode given at creation is narrowed by the umask; set it
        // exactly, on the open file (never through a path).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(fs::Permissions::from_mode(mode))?;
        }
        file.write_all(bytes)?;
        file.sync_all()
    })();
    drop(file);
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// fsyncs the directory holding `path`, so the new entry survives a crash.
#[cfg(unix)]
fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(parent(path))?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_path: &Path) -> io::Result<()> {
    Ok(())
}

#[cfg(test)]
#[cfg(unix)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// A fresh directory under the system's temporary one, removed on drop
    /// (`shared` has no dev-dependencies).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            let mut random = [0u8; 8];
            getrandom::fill(&mut random).unwrap();
            let dir = std::env::temp_dir().join(format!("secret-file-{}", hex::encode(random)));
            fs::create_dir(&dir).unwrap();
            Self(dir)
        }

        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn an_existing_world_readable_file_becomes_private() {
        let dir = TempDir::new();
        let path = dir.path().join("online.key");
        fs::write(&path, b"old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write(&path, b"secret").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"secret");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(names(dir.path()), vec!["online.key"], "no temporary left");
    }

    #[test]
    fn a_symlink_at_the_destination_is_replaced_not_followed() {
        let dir = TempDir::new();
        let elsewhere = TempDir::new();
        let target = elsewhere.path().join("victim");
        fs::write(&target, b"untouched").unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o644)).unwrap();
        let path = dir.path().join("admin.token");
        symlink(&target, &path).unwrap();

        write(&path, b"secret").unwrap();

        let meta = fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_file(), "a regular file, not a link");
        assert_eq!(mode(&path), 0o600);
        assert_eq!(fs::read(&path).unwrap(), b"secret");
        assert_eq!(fs::read(&target).unwrap(), b"untouched");
        assert_eq!(mode(&target), 0o644);

        // A dangling link is replaced the same way; nothing is created
        // where it pointed.
        let dangling = dir.path().join("passwords");
        let nowhere = elsewhere.path().join("created-by-a-follower");
        symlink(&nowhere, &dangling).unwrap();
        write(&dangling, b"pw").unwrap();
        assert!(fs::symlink_metadata(&dangling).unwrap().is_file());
        assert!(!nowhere.exists());
    }

    #[test]
    fn write_new_refuses_anything_already_there() {
        let dir = TempDir::new();
        let path = dir.path().join("root-1.key");
        write_new(&path, b"first").unwrap();
        assert_eq!(mode(&path), 0o600);
        let err = write_new(&path, b"second").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"first");

        let elsewhere = TempDir::new();
        let target = elsewhere.path().join("victim");
        let link = dir.path().join("online.key");
        symlink(&target, &link).unwrap();
        let err = write_new(&link, b"secret").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert!(!target.exists(), "the link was not followed");
        assert_eq!(names(dir.path()), vec!["online.key", "root-1.key"]);
    }

    #[test]
    fn a_public_document_gets_the_mode_asked_for() {
        let dir = TempDir::new();
        let path = dir.path().join("root.json");
        write_with_mode(&path, b"{}", 0o644).unwrap();
        assert_eq!(mode(&path), 0o644);
    }
}
