//! Block devices as the tracker needs them: which disk a device lives on, and where on it.
//!
//! Owns nothing but the answers read from `stat(2)` and sysfs. Invariant: for a partition,
//! `start_sector + nr_sectors` lies within its disk, and `disk_dev` is the whole disk, because
//! the block layer remaps a partition's bios to absolute sectors on its disk.

use std::fs;
use std::path::{Path, PathBuf};

use nix::sys::stat::{SFlag, major, minor, stat};
use replicator_common::SECTOR_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{path}: {source}")]
    Stat { path: PathBuf, source: nix::Error },
    #[error("{path} is not a block device")]
    NotBlockDevice { path: PathBuf },
    #[error("{path}: reading {sysfs}: {source}")]
    Sysfs { path: PathBuf, sysfs: PathBuf, source: std::io::Error },
    #[error("{path}: {sysfs} holds {value:?}, not a number")]
    SysfsValue { path: PathBuf, sysfs: PathBuf, value: String },
    #[error("{path} has size 0")]
    Empty { path: PathBuf },
}

/// A block device, whole disk or partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockDevice {
    pub path: PathBuf,
    pub major: u32,
    pub minor: u32,
    /// The whole disk's major and minor (the device's own for a whole disk).
    pub disk_major: u32,
    pub disk_minor: u32,
    /// First 512-byte sector of the device on its disk (0 for a whole disk).
    pub start_sector: u64,
    /// Length in 512-byte sectors.
    pub nr_sectors: u64,
    /// The device's logical block size: the alignment O_DIRECT needs.
    pub logical_block_bytes: u64,
    /// The disk's zone model (`queue/zoned`): "none", or "host-aware" / "host-managed" for a
    /// zoned disk, whose zone appends and resets the tracker cannot follow.
    pub zoned: String,
}

impl BlockDevice {
    pub fn resolve(path: &Path) -> Result<Self, DeviceError> {
        let st = stat(path).map_err(|source| DeviceError::Stat { path: path.into(), source })?;
        if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFBLK {
            return Err(DeviceError::NotBlockDevice { path: path.into() });
        }
        let (dev_major, dev_minor) = (major(st.st_rdev) as u32, minor(st.st_rdev) as u32);
        let sysfs = PathBuf::from(format!("/sys/dev/block/{dev_major}:{dev_minor}"));
        let sysfs = fs::canonicalize(&sysfs).map_err(|source| DeviceError::Sysfs {
            path: path.into(),
            sysfs: sysfs.clone(),
            source,
        })?;
        let read = |file: &Path| read_number(path, file);
        let nr_sectors = read(&sysfs.join("size"))?;
        if nr_sectors == 0 {
            return Err(DeviceError::Empty { path: path.into() });
        }
        let (disk_dir, start_sector) = if sysfs.join("partition").exists() {
            let disk_dir = sysfs.parent().unwrap_or(&sysfs).to_path_buf();
            (disk_dir, read(&sysfs.join("start"))?)
        } else {
            (sysfs.clone(), 0)
        };
        let (disk_major, disk_minor) = read_dev(path, &disk_dir.join("dev"))?;
        let logical_block_bytes = read(&disk_dir.join("queue/logical_block_size"))?;
        // Older kernels and some drivers have no such file: not zoned.
        let zoned = fs::read_to_string(disk_dir.join("queue/zoned"))
            .map_or_else(|_| "none".to_owned(), |s| s.trim().to_owned());
        Ok(Self {
            path: path.into(),
            major: dev_major,
            minor: dev_minor,
            disk_major,
            disk_minor,
            start_sector,
            nr_sectors,
            logical_block_bytes,
            zoned,
        })
    }

    pub fn size_bytes(&self) -> u64 {
        self.nr_sectors * SECTOR_BYTES
    }

    pub fn is_partition(&self) -> bool {
        (self.major, self.minor) != (self.disk_major, self.disk_minor)
    }
}

fn read_trimmed(path: &Path, sysfs: &Path) -> Result<String, DeviceError> {
    fs::read_to_string(sysfs).map(|s| s.trim().to_owned()).map_err(|source| DeviceError::Sysfs {
        path: path.into(),
        sysfs: sysfs.into(),
        source,
    })
}

fn read_number(path: &Path, sysfs: &Path) -> Result<u64, DeviceError> {
    let value = read_trimmed(path, sysfs)?;
    value.parse().map_err(|_| DeviceError::SysfsValue { path: path.into(), sysfs: sysfs.into(), value })
}

fn read_dev(path: &Path, sysfs: &Path) -> Result<(u32, u32), DeviceError> {
    let value = read_trimmed(path, sysfs)?;
    let parsed = value.split_once(':').and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
    parsed.ok_or(DeviceError::SysfsValue { path: path.into(), sysfs: sysfs.into(), value })
}
