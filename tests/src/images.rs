//! Where the images are: the workspace root, the monitor and guest images `make` builds, and the
//! host tool `vmfork` (each overridable from the environment). A missing image is a panic that
//! names the path and says to run `make`.

use std::path::{Path, PathBuf};

/// The workspace root: the parent of this crate's directory.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    match manifest.parent() {
        Some(root) => root.to_path_buf(),
        None => manifest.to_path_buf(),
    }
}

/// A non-empty environment variable as a path.
fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Where `make` puts the bare-metal images: `<target dir>/aarch64-unknown-none/release`.
fn image_dir() -> PathBuf {
    let target = match env_path("CARGO_TARGET_DIR") {
        Some(dir) if dir.is_absolute() => dir,
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    };
    target.join("aarch64-unknown-none").join("release")
}

/// Panics with a clear message unless `path` is an existing file.
fn require_image(path: &Path, what: &str, var: &str) {
    if !path.is_file() {
        panic!(
            "{what} is missing: {}\n\
             Run `make` in the workspace root ({}) first: it builds the monitor and guest images \
             before running the tests (this harness never runs cargo itself).\n\
             Or set {var} to point at an existing image.",
            path.display(),
            workspace_root().display(),
        );
    }
}

/// The monitor image (`VMFORK_MONITOR_IMAGE`, or
/// `target/aarch64-unknown-none/release/vmfork-monitor`). Panics if it does not exist.
pub fn monitor_image() -> PathBuf {
    let path =
        env_path("VMFORK_MONITOR_IMAGE").unwrap_or_else(|| image_dir().join("vmfork-monitor"));
    require_image(&path, "the vmfork monitor image", "VMFORK_MONITOR_IMAGE");
    path
}

/// The host tool `vmfork` (`VMFORK_TOOL`, or `target/release/vmfork`, which `make` builds).
/// Panics if it does not exist.
pub fn vmfork_tool() -> PathBuf {
    let target = env_path("CARGO_TARGET_DIR").unwrap_or_else(|| workspace_root().join("target"));
    let path = env_path("VMFORK_TOOL").unwrap_or_else(|| target.join("release").join("vmfork"));
    require_image(&path, "the vmfork tool", "VMFORK_TOOL");
    path
}

/// The guest image `name` (in `VMFORK_GUEST_DIR`, or `target/aarch64-unknown-none/release`).
/// Panics if it does not exist.
pub fn guest_image(name: &str) -> PathBuf {
    let path = env_path("VMFORK_GUEST_DIR")
        .unwrap_or_else(image_dir)
        .join(name);
    require_image(
        &path,
        &format!("the guest image `{name}`"),
        "VMFORK_GUEST_DIR",
    );
    path
}
