//! The pseudo-filesystems the tracker needs: tracefs (tracepoint formats and attach) and bpffs
//! (pins). Mounted here if the host has not, as `mount -t tracefs` / `mount -t bpf` would.

use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};

pub const TRACEFS: &str = "/sys/kernel/tracing";
pub const BPFFS: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
#[error("mounting {fstype} at {path}: {source} (are we root, and is the kernel built with it?)")]
pub struct MountError {
    pub fstype: &'static str,
    pub path: PathBuf,
    pub source: nix::Error,
}

/// Returns the tracefs mount point, mounting tracefs there if needed.
pub fn ensure_tracefs() -> Result<PathBuf, MountError> {
    let path = Path::new(TRACEFS);
    if !path.join("events").exists() {
        mount_fs("tracefs", path)?;
    }
    Ok(path.into())
}

/// Mounts bpffs at `/sys/fs/bpf` unless it is there already.
pub fn ensure_bpffs() -> Result<(), MountError> {
    let path = Path::new(BPFFS);
    if !is_mounted(path, "bpf") {
        mount_fs("bpf", path)?;
    }
    Ok(())
}

fn is_mounted(path: &Path, fstype: &str) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        let (_, point, kind) = (fields.next(), fields.next(), fields.next());
        point == path.to_str() && kind == Some(fstype)
    })
}

fn mount_fs(fstype: &'static str, path: &Path) -> Result<(), MountError> {
    mount(Some(fstype), path, Some(fstype), MsFlags::empty(), None::<&str>).map_err(|source| MountError {
        fstype,
        path: path.into(),
        source,
    })
}
