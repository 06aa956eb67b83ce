//! Throwaway block devices for the demo, the kernel tests and the benchmarks: loop devices over
//! files in /dev/shm (optionally partitioned with sfdisk) and zram devices.
//!
//! Each device owns its backing (file, zram slot) and removes it on drop, also when a test
//! fails, so a run leaves no loop device, file or zram device behind.

use std::fs::{self, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("{command} failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("{what}")]
    Setup { what: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> TestbedError {
    let what = what.into();
    move |source| TestbedError::Io { what, source }
}

/// Runs a command, returning its trimmed stdout or an error carrying its stderr.
pub fn run_command(program: &str, args: &[&str]) -> Result<String, TestbedError> {
    let command = format!("{program} {}", args.join(" "));
    let output = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(io(format!("running {command}")))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
        return Err(TestbedError::Command { command, stderr });
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A loop device over a sparse file in /dev/shm.
pub struct LoopDevice {
    pub path: PathBuf,
    backing: PathBuf,
}

impl LoopDevice {
    pub fn create(label: &str, size_bytes: u64) -> Result<Self, TestbedError> {
        let backing = backing_file(label, size_bytes)?;
        Self::attach(backing, false)
    }

    /// A loop device with a GPT holding `partitions` as (start, size) in MiB, attached with
    /// `losetup -P` so the kernel creates `<loop>p1`, `<loop>p2`, ...
    pub fn create_partitioned(
        label: &str,
        size_bytes: u64,
        partitions: &[(u64, u64)],
    ) -> Result<Self, TestbedError> {
        let backing = backing_file(label, size_bytes)?;
        let script: String = std::iter::once("label: gpt\n".to_owned())
            .chain(partitions.iter().map(|(start, size)| format!("start={}MiB, size={}MiB\n", start, size)))
            .collect();
        let mut child = Command::new("sfdisk")
            .args(["--quiet", "--no-reread", "--no-tell-kernel"])
            .arg(&backing)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io("running sfdisk (package fdisk)"))?;
        child.stdin.take().expect("piped").write_all(script.as_bytes()).map_err(io("writing to sfdisk"))?;
        let output = child.wait_with_output().map_err(io("waiting for sfdisk"))?;
        if !output.status.success() {
            let _ = fs::remove_file(&backing);
            return Err(TestbedError::Command {
                command: "sfdisk".into(),
                stderr: String::from_utf8_lossy(&output.stderr).into(),
            });
        }
        let device = Self::attach(backing, true)?;
        // Kernels built without partition-table parsers (no CONFIG_MSDOS_PARTITION or
        // CONFIG_EFI_PARTITION) scan nothing: then partx adds the partitions with BLKPG.
        std::thread::sleep(Duration::from_millis(100));
        if !device.partition(1).exists() {
            run_command("partx", &["--add", device.path.to_str().expect("utf-8 path")])?;
        }
        for n in 1..=partitions.len() {
            wait_for_node(&device.partition(n))?;
        }
        Ok(device)
    }

    fn attach(backing: PathBuf, partitioned: bool) -> Result<Self, TestbedError> {
        let file = backing.to_str().expect("utf-8 path");
        let args: &[&str] = if partitioned { &["-f", "--show", "-P", file] } else { &["-f", "--show", file] };
        match run_command("losetup", args) {
            Ok(path) => Ok(Self { path: path.into(), backing }),
            Err(e) => {
                let _ = fs::remove_file(&backing);
                Err(e)
            }
        }
    }

    /// Path of partition `n` (1-based).
    pub fn partition(&self, n: usize) -> PathBuf {
        PathBuf::from(format!("{}p{n}", self.path.display()))
    }

    pub fn backing_file(&self) -> &Path {
        &self.backing
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let path = self.path.to_string_lossy().into_owned();
        if let Err(e) = run_command("losetup", &["-d", &path]) {
            eprintln!("testbed: detaching {path}: {e}");
        }
        let _ = fs::remove_file(&self.backing);
    }
}

fn backing_file(label: &str, size_bytes: u64) -> Result<PathBuf, TestbedError> {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let path = PathBuf::from(format!("/dev/shm/replicator-{label}-{}-{id}.img", std::process::id()));
    let file = fs::File::create(&path).map_err(io(format!("creating {}", path.display())))?;
    file.set_len(size_bytes).map_err(io(format!("sizing {}", path.display())))?;
    Ok(path)
}

fn wait_for_node(path: &Path) -> Result<(), TestbedError> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(TestbedError::Setup {
                what: format!("{} did not appear within 5 s", path.display()),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A zram device (bio-based: no request queue, no `block_rq_*` events).
pub struct ZramDevice {
    pub path: PathBuf,
    id: u32,
}

impl ZramDevice {
    pub fn create(size_bytes: u64) -> Result<Self, TestbedError> {
        let control = Path::new("/sys/class/zram-control/hot_add");
        if !control.exists() {
            let _ = run_command("modprobe", &["zram", "num_devices=0"]);
        }
        let id: u32 = fs::read_to_string(control)
            .map_err(io(format!("reading {} (is zram built?)", control.display())))?
            .trim()
            .parse()
            .map_err(|_| TestbedError::Setup { what: "zram hot_add returned no number".into() })?;
        let device = Self { path: PathBuf::from(format!("/dev/zram{id}")), id };
        let disksize = format!("/sys/block/zram{id}/disksize");
        fs::write(&disksize, size_bytes.to_string()).map_err(io(format!("writing {disksize}")))?;
        wait_for_node(&device.path)?;
        Ok(device)
    }
}

impl Drop for ZramDevice {
    fn drop(&mut self) {
        let _ = fs::write(format!("/sys/block/zram{}/reset", self.id), "1");
        if let Err(e) = fs::write("/sys/class/zram-control/hot_remove", self.id.to_string()) {
            eprintln!("testbed: removing zram{}: {e}", self.id);
        }
    }
}

/// Writes `len_bytes` of `fill` at `offset_bytes` with O_DIRECT and returns once the device has
/// the data. Offset and length must be multiples of the device's logical block size.
pub fn write_direct(
    device: &Path,
    offset_bytes: u64,
    len_bytes: usize,
    fill: u8,
) -> Result<(), TestbedError> {
    const ALIGN: usize = 4096;
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc_o_direct())
        .open(device)
        .map_err(io(format!("opening {} with O_DIRECT", device.display())))?;
    // An aligned window into a slightly larger buffer: O_DIRECT needs the memory aligned too.
    let mut buffer = vec![fill; len_bytes + ALIGN];
    let skip = buffer.as_ptr().align_offset(ALIGN);
    let window = &mut buffer[skip..skip + len_bytes];
    file.write_all_at(window, offset_bytes)
        .map_err(io(format!("writing {len_bytes} bytes at {offset_bytes} on {}", device.display())))
}

fn libc_o_direct() -> i32 {
    nix::fcntl::OFlag::O_DIRECT.bits()
}
