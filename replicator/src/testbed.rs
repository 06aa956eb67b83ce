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

    /// A loop device over an existing file (removed with the device).
    pub fn over_file(backing: PathBuf) -> Result<Self, TestbedError> {
        Self::attach(backing, false)
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
    let file = open_direct(device, true)?;
    let mut buffer = Vec::new();
    let window = aligned_window(&mut buffer, len_bytes, fill);
    file.write_all_at(window, offset_bytes)
        .map_err(io(format!("writing {len_bytes} bytes at {offset_bytes} on {}", device.display())))
}

/// `device` opened with O_DIRECT, for reading or for writing.
fn open_direct(device: &Path, write: bool) -> Result<fs::File, TestbedError> {
    OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc_o_direct())
        .open(device)
        .map_err(io(format!("opening {} with O_DIRECT", device.display())))
}

/// A 4 KiB-aligned window of `len_bytes` filled with `fill`, inside `buffer` (made slightly
/// larger): O_DIRECT needs the memory aligned too.
fn aligned_window(buffer: &mut Vec<u8>, len_bytes: usize, fill: u8) -> &mut [u8] {
    const ALIGN: usize = 4096;
    *buffer = vec![fill; len_bytes + ALIGN];
    let skip = buffer.as_ptr().align_offset(ALIGN);
    &mut buffer[skip..skip + len_bytes]
}

fn libc_o_direct() -> i32 {
    nix::fcntl::OFlag::O_DIRECT.bits()
}

/// A network namespace of our own (`ip netns add`), deleted on drop with everything in it.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> Result<Self, TestbedError> {
        let _ = run_command("ip", &["netns", "del", name]);
        run_command("ip", &["netns", "add", name])?;
        let netns = Self { name: name.into() };
        run_command("ip", &["-n", name, "link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// A command that runs `program` inside this namespace's network (the mount namespace, and
    /// so bpffs and the block devices, stay the host's).
    pub fn command(&self, program: &Path) -> Command {
        let mut command = Command::new("nsenter");
        command.arg(format!("--net=/run/netns/{}", self.name)).arg(program);
        command
    }

    pub fn run(&self, args: &[&str]) -> Result<String, TestbedError> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run_command("ip", &all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run_command("ip", &["netns", "del", &self.name]) {
            eprintln!("testbed: deleting netns {}: {e}", self.name);
        }
    }
}

/// Connects two namespaces with a veth pair, addresses `a_cidr` and `b_cidr` (private ranges,
/// inside the namespaces only).
pub fn veth(
    a: &Netns,
    a_if: &str,
    a_cidr: &str,
    b: &Netns,
    b_if: &str,
    b_cidr: &str,
) -> Result<(), TestbedError> {
    run_command(
        "ip",
        &["link", "add", a_if, "netns", &a.name, "type", "veth", "peer", "name", b_if, "netns", &b.name],
    )?;
    a.run(&["addr", "add", a_cidr, "dev", a_if])?;
    b.run(&["addr", "add", b_cidr, "dev", b_if])?;
    a.run(&["link", "set", a_if, "up"])?;
    b.run(&["link", "set", b_if, "up"])?;
    Ok(())
}

/// A process that is stopped (SIGTERM, then SIGKILL after 3 s) when dropped.
pub struct Process {
    pub name: String,
    pub child: std::process::Child,
    pub log: PathBuf,
}

impl Process {
    pub fn spawn(name: &str, mut command: Command, log: PathBuf) -> Result<Self, TestbedError> {
        let out = fs::File::create(&log).map_err(io(format!("creating {}", log.display())))?;
        let err = out.try_clone().map_err(io("duplicating a log file"))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(io(format!("starting {name}")))?;
        Ok(Self { name: name.into(), child, log })
    }

    /// Sends SIGTERM and waits up to 3 s; returns whether it exited by itself.
    pub fn stop(&mut self) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        false
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// A primary and its secondaries on loop devices, each member in its own network namespace,
/// the primary linked to each secondary by a veth pair on its own 10.x subnet.
pub struct Lab {
    pub binary: PathBuf,
    pub dir: PathBuf,
    pub key_file: PathBuf,
    pub primary_device: LoopDevice,
    pub secondary_devices: Vec<LoopDevice>,
    pub primary_ns: Netns,
    pub secondary_ns: Vec<Netns>,
    /// The veth interface in the primary's namespace towards each secondary.
    pub primary_ifs: Vec<String>,
    pub secondary_addrs: Vec<std::net::SocketAddr>,
    pub processes: Vec<Process>,
}

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

impl Lab {
    pub const PORT: u16 = 7788;

    pub fn new(
        binary: &Path,
        label: &str,
        secondaries: usize,
        device_bytes: u64,
    ) -> Result<Self, TestbedError> {
        assert!((1..=8).contains(&secondaries));
        let id = (std::process::id() % 1000) * 10 + NEXT_LAB.fetch_add(1, Ordering::Relaxed) % 10;
        let dir = PathBuf::from(format!("/dev/shm/replicator-lab-{label}-{id}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let key_file = dir.join("key");
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).map_err(|e| TestbedError::Setup { what: format!("random key: {e}") })?;
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        write_private(&key_file, &hex)?;
        let primary_device = LoopDevice::create(&format!("{label}-p"), device_bytes)?;
        let secondary_devices = (0..secondaries)
            .map(|i| LoopDevice::create(&format!("{label}-s{i}"), device_bytes))
            .collect::<Result<Vec<_>, _>>()?;
        let primary_ns = Netns::create(&format!("rpl{id}p"))?;
        let mut secondary_ns = Vec::new();
        let mut primary_ifs = Vec::new();
        let mut secondary_addrs = Vec::new();
        for i in 0..secondaries {
            let ns = Netns::create(&format!("rpl{id}s{i}"))?;
            let (third, net) = (i + 1, 10 + (id % 200));
            let (p_if, s_if) = (format!("rp{id}p{i}"), format!("rp{id}s{i}"));
            veth(
                &primary_ns,
                &p_if,
                &format!("10.{net}.{third}.1/24"),
                &ns,
                &s_if,
                &format!("10.{net}.{third}.2/24"),
            )?;
            secondary_addrs
                .push(format!("10.{net}.{third}.2:{}", Self::PORT).parse().expect("valid address"));
            primary_ifs.push(p_if);
            secondary_ns.push(ns);
        }
        Ok(Self {
            binary: binary.into(),
            dir,
            key_file,
            primary_device,
            secondary_devices,
            primary_ns,
            secondary_ns,
            primary_ifs,
            secondary_addrs,
            processes: Vec::new(),
        })
    }

    pub fn state_dir(&self, member: &str) -> PathBuf {
        self.dir.join(member)
    }

    /// Starts secondary `i` with `extra` arguments; returns its index in `processes`.
    pub fn start_secondary(&mut self, i: usize, extra: &[&str]) -> Result<usize, TestbedError> {
        let mut command = self.secondary_ns[i].command(&self.binary);
        command
            .arg("secondary")
            .arg("--device")
            .arg(&self.secondary_devices[i].path)
            .arg("--listen")
            .arg(format!("0.0.0.0:{}", Self::PORT))
            .arg("--key-file")
            .arg(&self.key_file)
            .arg("--state-dir")
            .arg(self.state_dir(&format!("s{i}")))
            .args(extra);
        let log = self.dir.join(format!("s{i}.log"));
        self.processes.push(Process::spawn(&format!("secondary {i}"), command, log)?);
        Ok(self.processes.len() - 1)
    }

    /// Starts the primary with `extra` arguments; returns its index in `processes`.
    pub fn start_primary(&mut self, extra: &[&str]) -> Result<usize, TestbedError> {
        let mut command = self.primary_ns.command(&self.binary);
        command.arg("primary").arg("--device").arg(&self.primary_device.path);
        for (i, addr) in self.secondary_addrs.iter().enumerate() {
            command.arg("--secondary").arg(format!("s{i}={addr}"));
        }
        command.arg("--key-file").arg(&self.key_file).arg("--state-dir").arg(self.state_dir("p")).args(extra);
        let log = self.dir.join("p.log");
        self.processes.push(Process::spawn("primary", command, log)?);
        Ok(self.processes.len() - 1)
    }

    /// Starts the primary of a mirror made with `create` (device and secondaries come from its
    /// database); returns its index in `processes`.
    pub fn start_primary_from_db(&mut self, extra: &[&str]) -> Result<usize, TestbedError> {
        let mut command = self.primary_ns.command(&self.binary);
        command
            .arg("primary")
            .arg("--key-file")
            .arg(&self.key_file)
            .arg("--state-dir")
            .arg(self.state_dir("p"));
        command.args(extra);
        let log = self.dir.join("p.log");
        self.processes.push(Process::spawn("primary", command, log)?);
        Ok(self.processes.len() - 1)
    }

    /// The primary's status file, if written yet.
    pub fn status(&self) -> Option<serde_json::Value> {
        let text = fs::read_to_string(self.state_dir("p").join("status.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Waits until every secondary is connected and in sync, and stays so for `settle`.
    pub fn wait_in_sync(&self, timeout: Duration) -> Result<serde_json::Value, TestbedError> {
        let deadline = Instant::now() + timeout;
        let settle = Duration::from_millis(600);
        let mut synced_since: Option<Instant> = None;
        loop {
            let status = self.status();
            let all = status.as_ref().and_then(|s| s["secondaries"].as_array()).is_some_and(|peers| {
                !peers.is_empty() && peers.iter().all(|p| p["in_sync"].as_bool() == Some(true))
            });
            match (all, synced_since) {
                (true, Some(since)) if since.elapsed() > settle => return Ok(status.expect("checked")),
                (true, None) => synced_since = Some(Instant::now()),
                (false, _) => synced_since = None,
                _ => {}
            }
            if Instant::now() > deadline {
                return Err(TestbedError::Setup {
                    what: format!("secondaries not in sync after {timeout:?}; status: {status:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every secondary is SYNCHRONIZED (connected, not fractured, nothing pending)
    /// and stays so for a moment.
    pub fn wait_synchronized(&self, timeout: Duration) -> Result<serde_json::Value, TestbedError> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.wait_in_sync(deadline.saturating_duration_since(Instant::now()))?;
            let peers = status["secondaries"].as_array().cloned().unwrap_or_default();
            if peers.iter().all(|p| p["state"] == "SYNCHRONIZED" && p["in_sync"] == true) {
                return Ok(status);
            }
            if Instant::now() > deadline {
                return Err(TestbedError::Setup {
                    what: format!("secondaries not SYNCHRONIZED after {timeout:?}; status: {status}"),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs an operator command (`fracture s0`, `set sync-rate=0`, ...) against the primary;
    /// returns its JSON answer.
    pub fn operate(&self, args: &[&str]) -> Result<String, TestbedError> {
        let mut all: Vec<&str> = args.to_vec();
        all.push("--json");
        self.operate_text(&all)
    }

    /// Runs an operator command and returns what it prints for a person (`status`: a table).
    pub fn operate_text(&self, args: &[&str]) -> Result<String, TestbedError> {
        let state_dir = self.state_dir("p");
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--state-dir", state_dir.to_str().expect("utf-8 path")]);
        run_command(self.binary.to_str().expect("utf-8 path"), &all)
    }

    /// SHA-256 of each image, primary first, read with O_DIRECT.
    pub fn hashes(&self) -> Result<Vec<String>, TestbedError> {
        std::iter::once(&self.primary_device)
            .chain(&self.secondary_devices)
            .map(|d| hash_device(&d.path))
            .collect()
    }

    /// Removes the primary's pinned tracker (named after its device, the primary's default), as
    /// a host reboot would.
    pub fn untrack_primary(&self) {
        if let Some(name) = self.primary_device.path.file_name() {
            let _ = crate::tracker::unpin(&Path::new(crate::tracker::BPFFS_ROOT).join(name));
        }
    }

    /// Every log, for a failure message.
    pub fn logs(&self) -> String {
        self.processes.iter().map(|p| format!("--- {} ---\n{}\n", p.name, p.log_text())).collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for process in self.processes.iter_mut().rev() {
            if let Ok(None) = process.child.try_wait() {
                process.stop();
            }
        }
        self.processes.clear();
        // A stopped primary leaves its tracker pinned (by design), on whichever member was
        // primary last; the lab's loop devices go.
        for device in std::iter::once(&self.primary_device).chain(&self.secondary_devices) {
            if let Some(name) = device.path.file_name() {
                let _ = crate::tracker::unpin(&Path::new(crate::tracker::BPFFS_ROOT).join(name));
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn write_private(path: &Path, text: &str) -> Result<(), TestbedError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(format!("creating {}", path.display())))?;
    file.write_all(text.as_bytes()).map_err(io(format!("writing {}", path.display())))
}

/// Reads a whole block device with O_DIRECT (what is on the device, not what a page cache
/// remembers: a filesystem writes file data around the block device's cache), handing each
/// chunk to `consume` in order.
pub fn read_device_direct(device: &Path, mut consume: impl FnMut(&[u8])) -> Result<u64, TestbedError> {
    const CHUNK_BYTES: usize = 1 << 20;
    let file = open_direct(device, false)?;
    let mut buffer = Vec::new();
    let chunk = aligned_window(&mut buffer, CHUNK_BYTES, 0);
    let mut offset = 0u64;
    loop {
        let n =
            file.read_at(chunk, offset).map_err(io(format!("reading {} at {offset}", device.display())))?;
        if n == 0 {
            return Ok(offset);
        }
        consume(&chunk[..n]);
        offset += n as u64;
    }
}

/// `len_bytes` of a block device at `offset_bytes`, read with O_DIRECT (both multiples of its
/// logical block size).
pub fn read_range_direct(
    device: &Path,
    offset_bytes: u64,
    len_bytes: usize,
) -> Result<Vec<u8>, TestbedError> {
    let file = open_direct(device, false)?;
    let mut buffer = Vec::new();
    let window = aligned_window(&mut buffer, len_bytes, 0);
    file.read_exact_at(window, offset_bytes)
        .map_err(io(format!("reading {len_bytes} bytes at {offset_bytes} on {}", device.display())))?;
    Ok(window.to_vec())
}

/// SHA-256 of a whole block device, read with O_DIRECT.
pub fn hash_device(device: &Path) -> Result<String, TestbedError> {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    read_device_direct(device, |chunk| hasher.update(chunk))?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
