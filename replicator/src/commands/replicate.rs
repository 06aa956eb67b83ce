//! `replicator primary` and `replicator secondary`: the two ends of a live mirror.
//!
//! Every setting can come from the command line or from `--config FILE` (TOML, the same names
//! in kebab-case); the command line wins. Defaults are applied after the two are merged.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context as _;

use serde::Deserialize;

use crate::auth::Key;
use crate::link::Congestion;
use crate::metrics::{self, PrimaryMetrics, SecondaryMetrics};
use crate::mirror::MirrorDb;
use crate::model::{ExtentBytes, NameOf, RecoveryPolicy, WritePolicy, check_name};
use crate::poll::PollSetting;
use crate::primary::{Engine, PrimaryConfig};
use crate::secondary::{self, SecondaryConfig};

/// A size from the config file: a number of bytes or a string such as "64KiB".
fn size<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Option::<Size>::deserialize(deserializer)? {
        None => Ok(None),
        Some(Size::Bytes(bytes)) => Ok(Some(bytes)),
        Some(Size::Text(text)) => {
            crate::units::parse_bytes(&text).map(Some).map_err(serde::de::Error::custom)
        }
    }
}

/// An extent size from the config file, as `size` reads it, then the rule.
fn extent_size<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<ExtentBytes>, D::Error> {
    size(deserializer)?.map(ExtentBytes::new).transpose().map_err(serde::de::Error::custom)
}

fn read_config<T: for<'de> Deserialize<'de> + Default>(path: Option<&Path>) -> anyhow::Result<T> {
    let Some(path) = path else { return Ok(T::default()) };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn required<T>(value: Option<T>, flag: &str) -> anyhow::Result<T> {
    value
        .ok_or_else(|| anyhow::anyhow!("--{flag} is required (on the command line or as {flag} in --config)"))
}

/// `replicator primary` settings.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct PrimaryArgs {
    /// TOML file with any of these settings (kebab-case names); the command line wins.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Block device to replicate.
    #[arg(long)]
    pub device: Option<PathBuf>,
    /// A secondary as NAME=ADDR:PORT; repeat for more (up to 8).
    #[arg(long = "secondary", value_name = "NAME=ADDR:PORT")]
    #[serde(default, rename = "secondary")]
    pub secondaries: Vec<String>,
    /// File holding the shared key (at least 16 bytes, mode 0600); the same on every member.
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Directory for this member's state: the write-intent and fracture logs, status.json, and
    /// the control socket that `replicator status|fracture|restore|verify|sync|set` talk to.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Extent size, a power of two from 4KiB to 64MiB [default: 64KiB]. Must match the
    /// secondaries'.
    #[arg(long)]
    #[serde(default, deserialize_with = "extent_size")]
    pub extent_size: Option<ExtentBytes>,
    /// Identifies the mirror [default: 1]; secondaries started with --mirror-id refuse another.
    #[arg(long)]
    pub mirror_id: Option<u64>,
    /// Unacknowledged bytes allowed per secondary before it stops being fed [default: 64MiB].
    #[arg(long, value_parser = crate::units::parse_bytes)]
    #[serde(default, deserialize_with = "size")]
    pub backlog: Option<u64>,
    /// A secondary silent this long (no ack, no keepalive) is disconnected [default: 5000]; so
    /// is one whose oldest frame has waited four times this for its ack (its disk hangs).
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Do not ship the whole device to a secondary that has no fracture log yet: only for
    /// secondaries known to be identical (e.g. all freshly zeroed).
    #[arg(long)]
    #[serde(default)]
    pub skip_initial_sync: bool,
    /// Use plain sends instead of zero-copy sends. Without it, zero-copy is tried, and a
    /// secondary whose first 64 zero-copy sends the kernel all copied (veth, loopback, a NIC
    /// without scatter-gather) gets plain sends from then on.
    #[arg(long)]
    #[serde(default)]
    pub no_zero_copy: bool,
    /// Resync rate limit per secondary, bytes per second (0: unlimited) [default: 100MiB]. It
    /// applies while a secondary catches up (resync, full sync, verify), so the application's
    /// I/O keeps its share; `replicator set sync-rate=...` changes it at run time.
    #[arg(long, value_parser = crate::units::parse_bytes)]
    #[serde(default, deserialize_with = "size")]
    pub sync_rate: Option<u64>,
    /// What brings a fractured secondary back: automatic (it resyncs as soon as it is
    /// reachable) or manual (it waits for `replicator restore NAME`) [default: automatic].
    #[arg(long, value_enum)]
    pub recovery_policy: Option<RecoveryPolicy>,
    /// How often the write-intent and fracture logs are checkpointed, in ms [default: 1000]. A
    /// host crash loses at most this interval of tracking, which the verify after restart
    /// covers.
    #[arg(long)]
    pub checkpoint_ms: Option<u64>,
    /// The least time between two consistent cuts, in ms [default: 100; 1 to 60000]. Each
    /// secondary's image moves from cut to cut atomically; a secondary keeping up is at most
    /// about this much (plus the time to ship one interval's writes) behind. Shorter costs a
    /// few more commits per second on every secondary. 0 takes no cuts (only to compare: the
    /// secondaries' images are then no consistent copy while writes flow).
    #[arg(long)]
    pub cut_interval_ms: Option<u64>,
    /// The longest wait between two attempts to reach an unreachable secondary, in ms
    /// [default: 1000]: retries start at 100 ms and double up to it, so a secondary that
    /// returns is found within this long.
    #[arg(long)]
    pub retry_max_ms: Option<u64>,
    /// Serve Prometheus metrics on http://ADDR:PORT/metrics.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Serve the device to NBD clients (QEMU, qemu-io, libnbd, nbd-client) at nbd:ADDR:PORT or
    /// nbd+unix:PATH. Writes through the export follow the write policy; the device is opened
    /// exclusively, so it cannot be mounted meanwhile.
    #[arg(long, value_name = "nbd:ADDR:PORT|nbd+unix:PATH")]
    pub export: Option<String>,
    /// For a mirror given with --secondary (a database has its own, see `set`): sync makes an
    /// export write wait until every SYNCHRONIZED secondary has it durably; async acknowledges
    /// it after the primary's write and ships it behind [default: async].
    #[arg(long, value_enum)]
    pub write_policy: Option<WritePolicy>,
    /// For a mirror given with --secondary: images (the primary counts as one) a sync write must
    /// reach, or it fails with EIO [default: 1].
    #[arg(long)]
    pub minimum_images: Option<u32>,
    /// Busy-poll: after submitting its work, spin up to this many µs (at most 1000) for the
    /// next completion before sleeping, yielding the CPU to any thread that needs it, while
    /// writes flow; 0 never spins [default: 200 while sync writes through the NBD export flow,
    /// no spin otherwise]. Halves the latency of sync export writes at low queue depth on VMs
    /// (where waking an idle vCPU is slow), for up to a core of CPU while they flow; a mirror
    /// with no writes never spins. Per process: set it on the primary and on each secondary.
    #[arg(long)]
    pub poll_us: Option<u64>,
    /// TCP congestion control of the replication connections: a name the kernel has (cubic,
    /// reno, bbr, ...), or `system` for the host's default (net.ipv4.tcp_congestion_control)
    /// [default: cubic]. BBR, a common host default, paces every send and shrinks its window to
    /// four packets for 200 ms every 10 s: on a mirror's link that stalls the sync writes
    /// waiting on it. Set on the primary and on each secondary (the acks flow back on its side).
    /// A name the kernel lacks, or lets only CAP_NET_ADMIN use, stops the start.
    #[arg(long, value_name = "NAME|system")]
    pub tcp_congestion: Option<String>,
}

/// `replicator secondary` settings.
#[derive(clap::Args, Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SecondaryArgs {
    /// TOML file with any of these settings (kebab-case names); the command line wins.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Block device holding the secondary image; same size as the primary.
    #[arg(long)]
    pub device: Option<PathBuf>,
    /// Address and port to listen on, e.g. 0.0.0.0:7788.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// File holding the shared key (at least 16 bytes, mode 0600).
    #[arg(long)]
    pub key_file: Option<PathBuf>,
    /// Directory for this member's state.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Refuse primaries of another mirror.
    #[arg(long)]
    pub mirror_id: Option<u64>,
    /// Refuse primaries with another extent size.
    #[arg(long)]
    #[serde(default, deserialize_with = "extent_size")]
    pub extent_size: Option<ExtentBytes>,
    /// A session with no frame from the primary for this long ends [default: 5000].
    #[arg(long)]
    pub timeout_ms: Option<u64>,
    /// Serve Prometheus metrics on http://ADDR:PORT/metrics.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// Busy-poll: after submitting its work, spin up to this many µs (at most 1000) for the
    /// next completion before sleeping, yielding the CPU to any thread that needs it, while
    /// writes flow; 0 never spins [default: 200 while sync writes through the NBD export flow,
    /// no spin otherwise]. Halves the latency of sync export writes at low queue depth on VMs
    /// (where waking an idle vCPU is slow), for up to a core of CPU while they flow; a mirror
    /// with no writes never spins. Per process: set it on the primary and on each secondary.
    #[arg(long)]
    pub poll_us: Option<u64>,
    /// TCP congestion control of the replication connections: a name the kernel has (cubic,
    /// reno, bbr, ...), or `system` for the host's default (net.ipv4.tcp_congestion_control)
    /// [default: cubic]. BBR, a common host default, paces every send and shrinks its window to
    /// four packets for 200 ms every 10 s: on a mirror's link that stalls the sync writes
    /// waiting on it. Set on the primary and on each secondary (the acks flow back on its side).
    /// A name the kernel lacks, or lets only CAP_NET_ADMIN use, stops the start.
    #[arg(long, value_name = "NAME|system")]
    pub tcp_congestion: Option<String>,
    /// Size of the redo journal in the state directory (preallocated), e.g. 1GiB. Frames of a
    /// cut the primary has not committed yet wait there, so the image moves from one consistent
    /// cut to the next atomically; a catch-up (a resync, a verify) up to about this size keeps
    /// the image consistent throughout, a larger one is applied in place and the image is not
    /// consistent until it ends [default: 1GiB; at least 16MiB].
    #[arg(long, value_parser = crate::units::parse_bytes)]
    #[serde(default, deserialize_with = "size")]
    pub journal_bytes: Option<u64>,
}

impl PrimaryArgs {
    /// These settings, with `file`'s where none was given.
    fn over(self, file: Self) -> Self {
        Self {
            config: self.config,
            device: self.device.or(file.device),
            secondaries: if self.secondaries.is_empty() { file.secondaries } else { self.secondaries },
            key_file: self.key_file.or(file.key_file),
            state_dir: self.state_dir.or(file.state_dir),
            extent_size: self.extent_size.or(file.extent_size),
            mirror_id: self.mirror_id.or(file.mirror_id),
            backlog: self.backlog.or(file.backlog),
            timeout_ms: self.timeout_ms.or(file.timeout_ms),
            skip_initial_sync: self.skip_initial_sync || file.skip_initial_sync,
            no_zero_copy: self.no_zero_copy || file.no_zero_copy,
            sync_rate: self.sync_rate.or(file.sync_rate),
            recovery_policy: self.recovery_policy.or(file.recovery_policy),
            checkpoint_ms: self.checkpoint_ms.or(file.checkpoint_ms),
            cut_interval_ms: self.cut_interval_ms.or(file.cut_interval_ms),
            retry_max_ms: self.retry_max_ms.or(file.retry_max_ms),
            metrics: self.metrics.or(file.metrics),
            export: self.export.or(file.export),
            write_policy: self.write_policy.or(file.write_policy),
            minimum_images: self.minimum_images.or(file.minimum_images),
            poll_us: self.poll_us.or(file.poll_us),
            tcp_congestion: self.tcp_congestion.or(file.tcp_congestion),
        }
    }
}

/// What the mirror is: from its database, or from the command line.
struct Mirror {
    device: Option<PathBuf>,
    secondaries: Vec<(String, SocketAddr)>,
    mirror_id: Option<u64>,
    extent_size: Option<ExtentBytes>,
    backlog: Option<u64>,
}

/// Runs `replicator primary` with command-line `cli` merged over its config file.
pub fn run_primary(cli: PrimaryArgs, stop: &AtomicBool) -> anyhow::Result<()> {
    let file: PrimaryArgs = read_config(cli.config.as_deref())?;
    let args = cli.over(file);
    let state_dir = required(args.state_dir.clone(), "state-dir")?;
    let db = MirrorDb::load(&state_dir)?;
    let mirror = match &db {
        Some(db) => from_database(db, &state_dir, &args)?,
        None => from_arguments(&args)?,
    };
    let key_file = required(args.key_file.clone(), "key-file")?;
    let metrics = args.metrics;
    let config = primary_config(args, state_dir, db, mirror)?;
    primary(config, &key_file, metrics, stop)
}

/// A mirror given on the command line: at least one secondary.
fn from_arguments(args: &PrimaryArgs) -> anyhow::Result<Mirror> {
    let secondaries = args
        .secondaries
        .iter()
        .map(|s| parse_secondary(s).map_err(|e| anyhow::anyhow!("--secondary {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(
        !secondaries.is_empty(),
        "--secondary NAME=ADDR:PORT is required, at least once (or make a mirror with `replicator create`)"
    );
    Ok(Mirror {
        device: args.device.clone(),
        secondaries,
        mirror_id: args.mirror_id,
        extent_size: args.extent_size,
        backlog: args.backlog,
    })
}

/// A mirror made with `create`: its database says what it is, and the options that would
/// contradict it are refused, as is a secondary's state directory.
fn from_database(db: &MirrorDb, state_dir: &Path, args: &PrimaryArgs) -> anyhow::Result<Mirror> {
    anyhow::ensure!(
        args.device.is_none()
            && args.secondaries.is_empty()
            && args.mirror_id.is_none()
            && args.extent_size.is_none(),
        "{}: mirror {:?} is defined by its database there (device, secondaries, mirror id, extent size); \
         drop those options, and change the mirror with `replicator add-secondary`, `remove-secondary` or `set`",
        state_dir.display(),
        db.name
    );
    anyhow::ensure!(
        args.write_policy.is_none() && args.minimum_images.is_none(),
        "{}: mirror {:?} keeps its write policy and minimum images in its database; \
         change them with `replicator set write-policy=...` or `set minimum-images=...`",
        state_dir.display(),
        db.name
    );
    let primary = db.primary().ok_or_else(|| anyhow::anyhow!("mirror {:?} has no primary image", db.name))?;
    // A secondary's state directory holds the mirror database too (with the primary's
    // device path): `primary` there would full-sync this image over every secondary.
    let here = crate::failback::image_name(state_dir).map_err(anyhow::Error::msg)?;
    if let Some(here) = here.as_deref().filter(|here| db.secondaries().any(|i| i.name == *here)) {
        anyhow::bail!(
            "{}: this is secondary {here} of mirror {:?}, whose primary is {}; run `replicator secondary` \
             here, or `replicator promote` to make this image the primary",
            state_dir.display(),
            db.name,
            primary.name
        );
    }
    Ok(Mirror {
        device: primary.device.as_ref().map(PathBuf::from),
        secondaries: db.secondaries().filter_map(|i| i.address.map(|addr| (i.name.clone(), addr))).collect(),
        mirror_id: Some(db.id),
        extent_size: Some(db.extent_bytes),
        backlog: args.backlog.or(Some(db.write_backlog_bytes)),
    })
}

/// The engine's configuration: the mirror, the settings given, and the defaults.
fn primary_config(
    args: PrimaryArgs,
    state_dir: PathBuf,
    db: Option<MirrorDb>,
    mirror: Mirror,
) -> anyhow::Result<PrimaryConfig> {
    let export = args
        .export
        .map(|target| -> anyhow::Result<_> {
            Ok(crate::export::ExportConfig {
                target: target.parse()?,
                buffers: crate::export::BUFFERS_DEFAULT,
                block_bytes_max: crate::export::BLOCK_BYTES_MAX_DEFAULT,
            })
        })
        .transpose()?;
    let timeout_ms = args.timeout_ms.unwrap_or(PrimaryConfig::TIMEOUT_MS_DEFAULT);
    Ok(PrimaryConfig {
        device: required(mirror.device, "device")?,
        secondaries: mirror.secondaries,
        state_dir,
        tracker_name: None,
        mirror_id: mirror.mirror_id.unwrap_or(1),
        extent_bytes: mirror.extent_size.unwrap_or(ExtentBytes::DEFAULT),
        run_bytes_max: PrimaryConfig::RUN_BYTES_MAX_DEFAULT,
        buffers: PrimaryConfig::BUFFERS_DEFAULT,
        backlog_bytes_max: mirror.backlog.unwrap_or(PrimaryConfig::BACKLOG_BYTES_MAX_DEFAULT),
        timeout_ms,
        keepalive_ms: (timeout_ms / 5).max(100),
        retry_max_ms: args.retry_max_ms.unwrap_or(PrimaryConfig::RETRY_MAX_MS_DEFAULT).clamp(100, 3_600_000),
        initial_sync: !args.skip_initial_sync,
        zero_copy: !args.no_zero_copy,
        checkpoint_ms: args.checkpoint_ms.unwrap_or(PrimaryConfig::CHECKPOINT_MS_DEFAULT).max(10),
        cut_interval_ms: cut_interval_ms(args.cut_interval_ms)?,
        sync_rate_bytes_per_s: args.sync_rate.unwrap_or(PrimaryConfig::SYNC_RATE_BYTES_PER_S_DEFAULT),
        recovery_policy: args.recovery_policy.unwrap_or(RecoveryPolicy::Automatic),
        mirror: db,
        export,
        write_policy: args.write_policy.unwrap_or(WritePolicy::Async),
        minimum_images: args.minimum_images.unwrap_or(1),
        poll: poll_setting(args.poll_us)?,
        tcp_congestion: Congestion::resolve(args.tcp_congestion.as_deref())?,
    })
}

/// Runs `replicator secondary` with command-line `cli` merged over its config file.
pub fn run_secondary(cli: SecondaryArgs, stop: &AtomicBool) -> anyhow::Result<()> {
    let file: SecondaryArgs = read_config(cli.config.as_deref())?;
    let config = SecondaryConfig {
        device: required(cli.device.or(file.device), "device")?,
        listen: required(cli.listen.or(file.listen), "listen")?,
        state_dir: required(cli.state_dir.or(file.state_dir), "state-dir")?,
        mirror_id: cli.mirror_id.or(file.mirror_id),
        extent_bytes: cli.extent_size.or(file.extent_size),
        queue_depth: SecondaryConfig::QUEUE_DEPTH_DEFAULT,
        frame_data_bytes_max: SecondaryConfig::FRAME_DATA_BYTES_MAX_DEFAULT,
        timeout_ms: cli.timeout_ms.or(file.timeout_ms).unwrap_or(SecondaryConfig::TIMEOUT_MS_DEFAULT),
        poll: poll_setting(cli.poll_us.or(file.poll_us))?,
        tcp_congestion: Congestion::resolve(cli.tcp_congestion.or(file.tcp_congestion).as_deref())?,
        journal_bytes: journal_bytes(cli.journal_bytes.or(file.journal_bytes))?,
    };
    let key_file = required(cli.key_file.or(file.key_file), "key-file")?;
    secondary(&config, &key_file, cli.metrics.or(file.metrics), stop)
}

fn cut_interval_ms(value: Option<u64>) -> anyhow::Result<u64> {
    let ms = value.unwrap_or(crate::primary::CUT_INTERVAL_MS_DEFAULT);
    anyhow::ensure!(ms <= 60_000, "--cut-interval-ms {ms}: from 1 to 60000, or 0 for no cuts");
    Ok(ms)
}

fn journal_bytes(value: Option<u64>) -> anyhow::Result<u64> {
    use crate::secondary::journal::{JOURNAL_BYTES_DEFAULT, JOURNAL_BYTES_MIN};
    let bytes = value.unwrap_or(JOURNAL_BYTES_DEFAULT);
    anyhow::ensure!(
        bytes >= JOURNAL_BYTES_MIN && bytes.is_multiple_of(4096),
        "--journal-bytes {bytes}: at least {JOURNAL_BYTES_MIN} (a few of the largest frames), a multiple of 4KiB"
    );
    Ok(bytes)
}

fn poll_setting(value: Option<u64>) -> anyhow::Result<PollSetting> {
    let Some(poll_us) = value else { return Ok(PollSetting::Auto) };
    anyhow::ensure!(
        poll_us <= crate::poll::POLL_US_MAX,
        "--poll-us {poll_us}: at most {} (a longer spin only burns CPU)",
        crate::poll::POLL_US_MAX
    );
    Ok(PollSetting::Fixed(poll_us))
}

/// `NAME=ADDR:PORT`, as `--secondary` takes it.
pub fn parse_secondary(text: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = text.split_once('=').ok_or_else(|| format!("{text:?}: expected NAME=ADDR:PORT"))?;
    check_name(NameOf::Secondary, name).map_err(|e| e.to_string())?;
    let addr = addr.parse().map_err(|e| format!("{addr:?}: {e}; expected ADDR:PORT, e.g. 10.0.0.2:7788"))?;
    Ok((name.to_owned(), addr))
}

pub fn primary(
    config: PrimaryConfig,
    key_file: &Path,
    metrics_addr: Option<SocketAddr>,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let key = Arc::new(Key::from_file(key_file)?);
    let device = config.device.clone();
    let metrics = Arc::new(PrimaryMetrics::default());
    if let Some(addr) = metrics_addr {
        let mirror =
            config.mirror.as_ref().map_or_else(|| format!("{:#x}", config.mirror_id), |db| db.name.clone());
        let mut registry = prometheus_client::registry::Registry::default();
        metrics.register(registry.sub_registry_with_label(("mirror".into(), mirror.into())));
        metrics::serve(addr, registry)?;
    }
    let engine = Engine::new(config, key, metrics)
        .with_context(|| format!("starting the primary on {}", device.display()))?;
    engine.run(stop).context("primary engine")?;
    Ok(())
}

pub fn secondary(
    config: &SecondaryConfig,
    key_file: &Path,
    metrics_addr: Option<SocketAddr>,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let key = Arc::new(Key::from_file(key_file)?);
    let stats = SecondaryMetrics::default();
    if let Some(addr) = metrics_addr {
        let mirror = MirrorDb::load(&config.state_dir)
            .ok()
            .flatten()
            .map(|db| db.name)
            .or_else(|| config.mirror_id.map(|id| format!("{id:#x}")))
            .unwrap_or_else(|| "unknown".into());
        let mut registry = prometheus_client::registry::Registry::default();
        stats.register(registry.sub_registry_with_label(("mirror".into(), mirror.into())));
        metrics::serve(addr, registry)?;
    }
    secondary::serve(config, key, stop, &stats)
        .with_context(|| format!("serving {}", config.device.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_settings() {
        let file: PrimaryArgs = toml::from_str(
            "device = \"/dev/vdb\"\nsecondary = [\"b=10.0.0.2:7788\"]\nextent-size = \"128KiB\"\nbacklog = 1048576\n",
        )
        .expect("valid config");
        assert_eq!(file.extent_size.map(ExtentBytes::get), Some(128 * 1024));
        assert_eq!(file.backlog, Some(1 << 20));
        assert_eq!(file.secondaries, ["b=10.0.0.2:7788"]);
        let unknown = toml::from_str::<PrimaryArgs>("devcie = \"/dev/vdb\"\n").unwrap_err().to_string();
        assert!(unknown.contains("devcie"), "{unknown}");
        let secondary: SecondaryArgs = toml::from_str("tcp-congestion = \"system\"\n").expect("valid config");
        assert_eq!(secondary.tcp_congestion.as_deref(), Some(crate::link::CONGESTION_SYSTEM));
    }

    #[test]
    fn secondary_arguments() {
        assert_eq!(parse_secondary("b=10.0.0.2:7788").unwrap().0, "b");
        assert!(parse_secondary("10.0.0.2:7788").is_err());
        assert!(parse_secondary("b=nohost").is_err());
        assert!(parse_secondary("a b=10.0.0.2:1").is_err());
    }
}
