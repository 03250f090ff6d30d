//! Which control socket `vmfork` talks to when none is named.
//!
//! In order: `--socket PATH`; `VMFORK_SOCKET`; the checkout's `run/vmfork.sock` (the current
//! directory or the nearest parent directory that has one, so any directory inside a checkout
//! that runs `make qemu-virt` finds it); the per-user socket [`user_socket`], which `make
//! qemu-virt` makes a link to its socket while no other live monitor holds it, so a `vmfork`
//! run from anywhere else finds that one.

use std::ffi::OsString;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The socket `make qemu-virt` serves, relative to the checkout.
pub const CHECKOUT_SOCKET: &str = "run/vmfork.sock";

/// Where the chosen socket came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// `--socket`, `VMFORK_SOCKET`, a checkout's or the per-user socket: this path.
    At(PathBuf),
    /// Nothing named and nothing found: the places looked at, in order.
    Nowhere(Vec<PathBuf>),
}

/// The real user id.
fn uid() -> u32 {
    // SAFETY: getuid(2) has no preconditions, touches no memory of ours and cannot fail.
    unsafe { libc::getuid() }
}

/// The per-user socket: `$XDG_RUNTIME_DIR/vmfork/vmfork.sock` when `XDG_RUNTIME_DIR` is an
/// absolute path, else `/tmp/vmfork-$UID/vmfork.sock`.
pub fn user_socket() -> PathBuf {
    user_socket_in(std::env::var_os("XDG_RUNTIME_DIR"))
}

fn user_socket_in(runtime_dir: Option<OsString>) -> PathBuf {
    match runtime_dir.map(PathBuf::from) {
        Some(d) if d.is_absolute() => d.join("vmfork").join("vmfork.sock"),
        _ => PathBuf::from(format!("/tmp/vmfork-{}", uid())).join("vmfork.sock"),
    }
}

/// Whether `dir` is ours alone: owned by us, not writable by group or others.
fn is_private(dir: &Path) -> io::Result<bool> {
    let m = std::fs::symlink_metadata(dir)?;
    Ok(m.is_dir() && m.uid() == uid() && m.permissions().mode() & 0o022 == 0)
}

/// Makes sure the directory of `path` exists and is ours alone (created mode 0700 if missing):
/// in a shared `/tmp`, another user could otherwise put a socket of theirs there.
pub fn private_dir_for(path: &Path) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    if is_private(dir)? {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a directory of this user's alone (mode 0700)",
                dir.display()
            ),
        ))
    }
}

/// Picks the socket: `flag`, then `env` (non-empty), then `run/vmfork.sock` in `cwd` or its
/// nearest parent that has one, then `user` if it exists in a directory that is ours alone.
pub fn find(flag: Option<&Path>, env: Option<OsString>, cwd: &Path, user: &Path) -> Found {
    if let Some(p) = flag {
        return Found::At(p.to_path_buf());
    }
    if let Some(p) = env.filter(|e| !e.is_empty()) {
        return Found::At(PathBuf::from(p));
    }
    for dir in cwd.ancestors() {
        let p = dir.join(CHECKOUT_SOCKET);
        if std::fs::symlink_metadata(&p).is_ok() {
            return Found::At(p);
        }
    }
    let user_ok = std::fs::symlink_metadata(user).is_ok()
        && user
            .parent()
            .is_some_and(|d| is_private(d).unwrap_or(false));
    if user_ok {
        return Found::At(user.to_path_buf());
    }
    Found::Nowhere(vec![cwd.join(CHECKOUT_SOCKET), user.to_path_buf()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_socket_path() {
        assert_eq!(
            user_socket_in(Some("/run/user/7".into())),
            PathBuf::from("/run/user/7/vmfork/vmfork.sock")
        );
        let tmp = user_socket_in(Some("relative".into()));
        assert!(
            tmp.starts_with("/tmp") && tmp.ends_with("vmfork.sock"),
            "{tmp:?}"
        );
        assert_eq!(user_socket_in(None), tmp);
    }

    #[test]
    fn order_flag_env_checkout_user() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        let deep = root.join("a/b");
        std::fs::create_dir_all(&deep).unwrap();
        let user = root.join("user/vmfork.sock");
        let flag = Path::new("/x.sock");
        let f = |flag, env: Option<&str>| find(flag, env.map(OsString::from), &deep, &user);
        assert_eq!(f(Some(flag), Some("/env.sock")), Found::At(flag.into()));
        assert_eq!(f(None, Some("/env.sock")), Found::At("/env.sock".into()));
        assert_eq!(
            f(None, Some("")),
            Found::Nowhere(vec![deep.join(CHECKOUT_SOCKET), user.clone()])
        );
        // The per-user socket counts only in a directory of ours alone.
        private_dir_for(&user).unwrap();
        std::fs::write(&user, b"").unwrap();
        assert_eq!(f(None, None), Found::At(user.clone()));
        let dir = user.parent().unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(matches!(f(None, None), Found::Nowhere(_)));
        assert!(private_dir_for(&user).is_err());
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        // A checkout's socket in a parent wins over the per-user one.
        std::fs::create_dir_all(root.join("a/run")).unwrap();
        std::fs::write(root.join("a").join(CHECKOUT_SOCKET), b"").unwrap();
        assert_eq!(
            f(None, None),
            Found::At(root.join("a").join(CHECKOUT_SOCKET))
        );
    }
}
