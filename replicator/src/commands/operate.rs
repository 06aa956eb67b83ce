//! The operator's commands on a running primary: `status`, `fracture`, `restore`, `verify`,
//! `sync`, `set`, `checkpoint`. Each sends one request over the control socket in the state
//! directory and prints what the primary answers.

use std::path::PathBuf;

use crate::control::{self, Request};
use crate::units::format_bytes;

/// The state directory when none is given.
pub const STATE_DIR_DEFAULT: &str = "/var/lib/replicator";

#[derive(clap::Args, Debug)]
pub struct Target {
    /// The primary's state directory (where its control socket is).
    #[arg(long, default_value = STATE_DIR_DEFAULT)]
    pub state_dir: PathBuf,
    /// Print the primary's answer as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Sends `request` and prints the answer: JSON, or a table of the secondaries.
pub fn run(target: &Target, request: Request) -> anyhow::Result<()> {
    let result = control::call(&target.state_dir, &request)?;
    if target.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
        return Ok(());
    }
    if let Some(mirror) = result.get("mirror").filter(|m| !m.is_null()) {
        let cause = mirror["state_cause"].as_str().unwrap_or("");
        println!(
            "mirror {} (generation {}, revision {}): {}{}",
            mirror["name"].as_str().unwrap_or("?"),
            mirror["generation"],
            mirror["revision"],
            mirror["state"].as_str().unwrap_or("?"),
            if cause.is_empty() { String::new() } else { format!(" ({cause})") }
        );
    }
    let secondaries = result.get("secondaries").unwrap_or(&result);
    let extents_total = match (result["image_bytes"].as_u64(), result["extent_bytes"].as_u64()) {
        (Some(image), Some(extent)) if extent > 0 => Some(image.div_ceil(extent)),
        _ => None,
    };
    print_table(secondaries, extents_total);
    Ok(())
}

/// `set KEY=VALUE...`: one request per setting.
pub fn set(target: &Target, secondary: Option<String>, settings: &[String]) -> anyhow::Result<()> {
    anyhow::ensure!(!settings.is_empty(), "nothing to set: give KEY=VALUE, e.g. sync-rate=200MiB");
    for setting in settings {
        let (key, value) = setting
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("{setting:?}: expected KEY=VALUE, e.g. sync-rate=200MiB"))?;
        let request = Request::Set { secondary: secondary.clone(), key: key.into(), value: value.into() };
        control::call(&target.state_dir, &request)?;
    }
    run(target, Request::Status)
}

/// `checkpoint [--freeze MOUNTPOINT]`: a consistency point, the filesystem frozen meanwhile.
pub fn consistency_point(target: &Target, freeze: Option<PathBuf>, timeout_ms: u64) -> anyhow::Result<()> {
    let frozen = freeze.map(|mount| Frozen::new(mount, &target.state_dir)).transpose()?;
    let result = control::call(&target.state_dir, &Request::ConsistencyPoint { timeout_ms });
    frozen.map(Frozen::thaw).transpose()?;
    let result = result?;
    if target.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        let names: Vec<&str> =
            result["secondaries"].as_array().into_iter().flatten().filter_map(|n| n.as_str()).collect();
        println!(
            "consistency point {} (generation {}) recorded on {}",
            result["point_unix_ms"],
            result["generation"],
            names.join(", ")
        );
    }
    Ok(())
}

/// A filesystem frozen with `fsfreeze`; thawed by `thaw`, or when dropped, whatever happened
/// meanwhile. While it is frozen, SIGINT, SIGTERM, SIGHUP and SIGQUIT are held: a Ctrl-C takes
/// effect after the thaw instead of killing the process with the filesystem still frozen.
struct Frozen {
    mount: PathBuf,
    /// The signal mask to restore after the thaw; `None` once thawed.
    mask_before: Option<nix::sys::signal::SigSet>,
}

impl Frozen {
    fn new(mount: PathBuf, state_dir: &std::path::Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let device_of = |path: &std::path::Path| {
            std::fs::metadata(path).map(|m| m.dev()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
        };
        anyhow::ensure!(
            device_of(&mount)? != device_of(state_dir)?,
            "{} is on the filesystem to freeze: the primary could not write its logs while it is frozen",
            state_dir.display()
        );
        let mount_text = mount.to_str().ok_or_else(|| anyhow::anyhow!("{}: not UTF-8", mount.display()))?;
        let mask_before = hold_signals()?;
        if let Err(error) = fsfreeze("--freeze", mount_text) {
            // It may have frozen before it failed (killed after its freeze call): thaw anyway.
            let _ = fsfreeze("--unfreeze", mount_text);
            restore_signals(&mask_before);
            return Err(error);
        }
        Ok(Self { mount, mask_before: Some(mask_before) })
    }

    /// Thaws; an error says how to thaw by hand. Held signals take effect afterwards.
    fn thaw(mut self) -> anyhow::Result<()> {
        self.thaw_once()
    }

    fn thaw_once(&mut self) -> anyhow::Result<()> {
        let Some(mask_before) = self.mask_before.take() else { return Ok(()) };
        let mount = self.mount.to_string_lossy().into_owned();
        let thawed = fsfreeze("--unfreeze", &mount).map_err(|e| {
            anyhow::anyhow!(
                "THAWING {mount} FAILED: {e}; it is still frozen: run `fsfreeze --unfreeze {mount}`"
            )
        });
        if let Err(error) = &thawed {
            // Said before the held signals are let go: one of them may end the process.
            eprintln!("replicator: {error}");
        }
        restore_signals(&mask_before);
        thawed
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = self.thaw_once(); // a failure is printed there
    }
}

/// Blocks the signals that would end the process; returns the mask to restore.
fn hold_signals() -> anyhow::Result<nix::sys::signal::SigSet> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal, sigprocmask};
    let mut held = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP, Signal::SIGQUIT] {
        held.add(signal);
    }
    let mut before = SigSet::empty();
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&held), Some(&mut before))
        .map_err(|e| anyhow::anyhow!("holding signals while the filesystem is frozen: {e}"))?;
    Ok(before)
}

fn restore_signals(mask: &nix::sys::signal::SigSet) {
    let _ = nix::sys::signal::sigprocmask(nix::sys::signal::SigmaskHow::SIG_SETMASK, Some(mask), None);
}

/// Runs `fsfreeze FLAG MOUNTPOINT` (util-linux).
fn fsfreeze(flag: &str, mount: &str) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    let output = std::process::Command::new("fsfreeze")
        .args([flag, mount])
        // Its own process group: a Ctrl-C at the terminal does not kill it half-way.
        .process_group(0)
        .output()
        .map_err(|e| anyhow::anyhow!("running fsfreeze (util-linux): {e}"))?;
    anyhow::ensure!(
        output.status.success(),
        "fsfreeze {flag} {mount}: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

fn print_table(secondaries: &serde_json::Value, extents_total: Option<u64>) {
    let Some(peers) = secondaries.as_array() else {
        println!("{secondaries}");
        return;
    };
    println!(
        "{:<12} {:<21} {:<15} {:>12} {:>12} {:>10}  NOTES",
        "SECONDARY", "ADDRESS", "STATE", "OUT-OF-SYNC", "RESYNCED", "SYNC-RATE"
    );
    for p in peers {
        let bytes = |field: &str| format_bytes(p[field].as_u64().unwrap_or(0));
        let mut notes = Vec::new();
        for (flag, note) in [
            ("admin_fractured", "fractured by admin"),
            ("full_sync", "full sync"),
            ("verifying", "verifying"),
        ] {
            if p[flag].as_bool() == Some(true) {
                notes.push(note.to_owned());
            }
        }
        if p["verifying"].as_bool() == Some(true) {
            let next = p["verify_next_extent"].as_u64().unwrap_or(0);
            match extents_total.filter(|&total| total > 0) {
                Some(total) => {
                    notes.push(format!("verified {next} of {total} extents ({}%)", next * 100 / total))
                }
                None => notes.push(format!("verify at extent {next}")),
            }
        }
        if let Some(progress) = progress_bar(p) {
            notes.push(progress);
        }
        if let Some(lag_ms) = p["lag_ms"].as_u64().filter(|_| p["connected"].as_bool() == Some(true)) {
            notes.push(format!("lag {lag_ms} ms"));
        }
        if let Some(point_ms) = p["consistency_point_unix_ms"].as_u64().filter(|&t| t > 0) {
            let age_s = crate::logs::unix_ms_now().saturating_sub(point_ms) / 1000;
            notes.push(format!("consistency point {age_s} s ago"));
        }
        if let Some(error) = p["last_error"].as_str().filter(|e| !e.is_empty()) {
            notes.push(format!("last error: {error}"));
        }
        let rate = match p["sync_rate_bytes_per_s"].as_u64() {
            Some(0) | None => "unlimited".to_owned(),
            Some(rate) => format!("{}/s", format_bytes(rate)),
        };
        let line = format!(
            "{:<12} {:<21} {:<15} {:>12} {:>12} {:>10}  {}",
            p["name"].as_str().unwrap_or("?"),
            p["addr"].as_str().unwrap_or("?"),
            p["state"].as_str().unwrap_or("?"),
            bytes("out_of_sync_bytes"),
            bytes("resync_bytes_done"),
            rate,
            notes.join(", ")
        );
        println!("{}", line.trim_end());
    }
}

/// `[#####.....] 52% 120 MiB/s 3 s left` for a secondary that is resyncing (the rate and time
/// left once the rate has been sampled, a second into the resync).
fn progress_bar(p: &serde_json::Value) -> Option<String> {
    let done = p["resync_bytes_done"].as_u64()?;
    let left = p["out_of_sync_bytes"].as_u64()?;
    let resyncing = p["fractured"].as_bool() == Some(true)
        && p["connected"].as_bool() == Some(true)
        && p["verifying"].as_bool() != Some(true);
    if done + left == 0 || !resyncing {
        return None;
    }
    const WIDTH: u64 = 20;
    let filled = done * WIDTH / (done + left);
    let bar: String = (0..WIDTH).map(|i| if i < filled { '#' } else { '.' }).collect();
    let percent = done * 100 / (done + left);
    Some(match p["resync_eta_seconds"].as_f64().filter(|&eta| eta > 0.0) {
        Some(eta) => {
            let rate = left as f64 / eta;
            format!("[{bar}] {percent}% {}/s {eta:.0} s left", format_bytes(rate as u64))
        }
        None => format!("[{bar}] {percent}% measuring the rate"),
    })
}
