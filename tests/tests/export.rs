//! The NBD export and the sync write policy, on the real kernel: qemu-io writes through the
//! export on the primary's network namespace, secondaries in their own namespaces over veth.
//! Each test ends with the images hashed equal and the bytes on the wire counted.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use replicator_tests::*;

const DEVICE_BYTES: u64 = 64 * MIB;
const FAST: &[&str] =
    &["--sync-rate", "0", "--checkpoint-ms", "200", "--timeout-ms", "2000", "--skip-initial-sync"];

fn socket(lab: &Lab) -> PathBuf {
    lab.dir.join("nbd.sock")
}

/// `qemu-io` against the export with `commands` (each a `-c` argument); returns what it
/// printed, stdout and stderr, as `Ok` if it exited with success.
fn qemu_io(lab: &Lab, commands: &[String]) -> Result<String, String> {
    qemu_io_at(&socket(lab), commands)
}

fn qemu_io_at(socket: &std::path::Path, commands: &[String]) -> Result<String, String> {
    let mut command = std::process::Command::new("qemu-io");
    command.args(["-f", "raw"]);
    for c in commands {
        command.arg("-c").arg(c);
    }
    command.arg(format!("nbd+unix:///?socket={}", socket.display()));
    let output = command.output().map_err(|e| format!("running qemu-io (is qemu-utils installed?): {e}"))?;
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    if output.status.success() { Ok(text) } else { Err(text) }
}

/// Polls the primary's status until `check` holds (20 s at most).
fn until(lab: &Lab, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lab.status().is_some_and(|s| check(&s)) {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {:?}\n{}",
            lab.status(),
            lab.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for_socket(lab: &Lab) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket(lab).exists() {
        assert!(Instant::now() < deadline, "the export did not start\n{}", lab.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A lab of `secondaries` secondaries (processes 0..secondaries) and a primary exporting
/// over the lab's unix socket with `extra` options, every secondary SYNCHRONIZED and the export
/// listening.
fn export_lab(label: &str, secondaries: usize, extra: &[&str]) -> Lab {
    export_lab_with(label, secondaries, extra, &[])
}

/// `export_lab`, with `secondary_extra` options for every secondary.
fn export_lab_with(label: &str, secondaries: usize, extra: &[&str], secondary_extra: &[&str]) -> Lab {
    require_root();
    let lab = Lab::new(&replicator_bin(), label, secondaries, DEVICE_BYTES).expect("lab");
    start_export_lab(lab, extra, secondary_extra)
}

/// Starts `lab`'s secondaries and its primary, as `export_lab_with` says.
fn start_export_lab(mut lab: Lab, extra: &[&str], secondary_extra: &[&str]) -> Lab {
    for i in 0..lab.secondary_devices.len() {
        lab.start_secondary(i, secondary_extra).expect("secondary");
    }
    let export = format!("nbd+unix:{}", socket(&lab).display());
    let mut args = vec!["--export", export.as_str()];
    args.extend(extra);
    args.extend(FAST);
    lab.start_primary(&args).expect("primary");
    lab.wait_synchronized(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    wait_for_socket(&lab);
    lab
}

fn shipped_bytes(lab: &Lab) -> Vec<u64> {
    let status = lab.status().expect("status");
    status["secondaries"]
        .as_array()
        .expect("secondaries")
        .iter()
        .map(|p| p["shipped_bytes"].as_u64().unwrap_or(0))
        .collect()
}

/// Test 1: every write, 512 B to 4 MiB, is on every secondary when qemu-io gets its reply,
/// reads back through the export, and crosses the wire exactly once. The primary and the
/// secondaries busy-poll (`--poll-us`), which must change nothing of that.
#[test]
fn sync_writes_are_on_every_secondary_when_acknowledged() {
    let poll = ["--poll-us", "200"];
    let primary = ["--write-policy", "sync", "--minimum-images", "3", "--poll-us", "200"];
    require_root();
    let lab = Lab::new(&replicator_bin(), "nbdsync", 2, DEVICE_BYTES).expect("lab");
    // Every namespace defaults to reno, so the link's own congestion control shows below
    // whatever the host's default is.
    for ns in std::iter::once(&lab.primary_ns).chain(&lab.secondary_ns) {
        run_command(
            "ip",
            &["netns", "exec", &ns.name, "sysctl", "-qw", "net.ipv4.tcp_congestion_control=reno"],
        )
        .unwrap_or_else(|e| panic!("{}: setting its default congestion control to reno: {e}", ns.name));
    }
    let lab = start_export_lab(lab, &primary, &poll);
    let before = shipped_bytes(&lab);

    let mut written = 0u64;
    let sizes = [512u64, 4096, 12 * 1024, 64 * KIB, 192 * KIB, MIB, 4 * MIB];
    for (i, &len) in sizes.iter().enumerate() {
        let offset = 3 * MIB * i as u64 + 512 * (i as u64 * 7 % 64);
        let pattern = 0x11 * (i as u8 + 1);
        qemu_io(&lab, &[format!("write -P {pattern:#x} {offset} {len}")])
            .unwrap_or_else(|e| panic!("qemu-io write: {e}\n{}", lab.logs()));
        // Acknowledged: each secondary holds the bytes now, with no catch-up in between.
        for (s, device) in lab.secondary_devices.iter().enumerate() {
            let start = offset / 512 * 512;
            let bytes = read_range_direct(&device.path, start, len as usize).expect("reading a secondary");
            assert!(
                bytes.iter().all(|&b| b == pattern),
                "secondary s{s} lacks the {len}-byte write at {offset} when it was acknowledged\n{}",
                lab.logs()
            );
        }
        let out = qemu_io(&lab, &[format!("read -P {pattern:#x} {offset} {len}")])
            .unwrap_or_else(|e| panic!("qemu-io read: {e}\n{}", lab.logs()));
        assert!(!out.contains("Pattern verification failed"), "{out}");
        written += len;
    }
    lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    std::thread::sleep(Duration::from_millis(1500)); // a few drains and checkpoints
    let after = shipped_bytes(&lab);
    for (s, (before, after)) in before.iter().zip(&after).enumerate() {
        assert_eq!(
            after - before,
            written,
            "secondary s{s}: each export write must cross the wire exactly once\n{}",
            lab.logs()
        );
    }
    // The link runs the replicator's congestion control on both ends, not the namespaces' reno.
    let mut congestion = Vec::new();
    for (s, addr) in lab.secondary_addrs.iter().enumerate() {
        congestion.push((format!("primary to s{s}"), link_congestion(&lab.primary_ns.name, *addr)));
        congestion.push((format!("s{s}"), link_congestion(&lab.secondary_ns[s].name, *addr)));
    }
    for (end, names) in &congestion {
        assert!(
            names.len() == 1 && names[0] == replicator::link::CONGESTION_DEFAULT,
            "{end}: the link's connection should run {}: {congestion:?}",
            replicator::link::CONGESTION_DEFAULT
        );
    }
    let hashes = lab.hashes().expect("hashing");
    assert!(hashes.iter().all(|h| *h == hashes[0]), "images differ: {hashes:?}\n{}", lab.logs());
    eprintln!(
        "{written} bytes written through the export, {written} shipped to each secondary; images equal"
    );
}

/// The congestion control of each established TCP connection from or to `addr` in namespace
/// `ns`, as `ss -i` shows it: the first word of each connection's detail line (with no other
/// option that adds words before it).
fn link_congestion(ns: &str, addr: std::net::SocketAddr) -> Vec<String> {
    let filter = format!("( src {addr} or dst {addr} )");
    let output = run_command("ip", &["netns", "exec", ns, "ss", "-tin", "state", "established", &filter])
        .unwrap_or_else(|e| panic!("ss in {ns}: {e}"));
    // The header line comes first, so trimming the output leaves the detail lines' indent.
    output
        .lines()
        .filter(|line| line.starts_with(char::is_whitespace))
        .filter_map(|line| line.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// TRIM, WRITE_ZEROES and FLUSH through the export: every image reads zeroes over the range
/// when the reply comes, and the images stay equal.
#[test]
fn trim_and_write_zeroes_reach_every_image() {
    let lab = export_lab("nbdzero", 1, &["--write-policy", "sync"]);
    qemu_io(&lab, &["write -P 0x5a 0 8M".to_owned(), "flush".to_owned()])
        .unwrap_or_else(|e| panic!("qemu-io: {e}\n{}", lab.logs()));
    for (command, offset, len) in [("discard", MIB, 2 * MIB), ("write -z", 5 * MIB, 512 * KIB)] {
        let out = qemu_io(&lab, &[format!("{command} {offset} {len}")])
            .unwrap_or_else(|e| panic!("qemu-io {command}: {e}\n{}", lab.logs()));
        assert!(!out.contains("failed"), "{command}: {out}");
        for device in std::iter::once(&lab.primary_device).chain(&lab.secondary_devices) {
            let bytes = read_range_direct(&device.path, offset, len as usize).expect("reading an image");
            assert!(
                bytes.iter().all(|&b| b == 0),
                "{} does not read zeroes after {command}\n{}",
                device.path.display(),
                lab.logs()
            );
        }
    }
    let out = qemu_io(
        &lab,
        &["read -P 0x5a 0 1M".to_owned(), "read -P 0 1M 2M".to_owned(), "read -P 0x5a 3M 2M".to_owned()],
    )
    .unwrap_or_else(|e| panic!("qemu-io read: {e}\n{}", lab.logs()));
    assert!(!out.contains("verification failed"), "{out}");
    lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let hashes = lab.hashes().expect("hashing");
    assert!(hashes.iter().all(|h| *h == hashes[0]), "images differ: {hashes:?}\n{}", lab.logs());
}

/// A `qemu-io` run of `count` 64 KiB patterned writes, one every 128 KiB from `first_offset`.
fn write_stream(
    lab: &Lab,
    first_offset: u64,
    count: u64,
    pattern: u8,
) -> std::thread::JoinHandle<Result<String, String>> {
    let commands: Vec<String> =
        (0..count).map(|i| format!("write -P {pattern:#x} {} 64k", first_offset + i * 128 * KIB)).collect();
    let socket = socket(lab);
    std::thread::spawn(move || qemu_io_at(&socket, &commands))
}

fn peer_status(lab: &Lab, name: &str) -> serde_json::Value {
    let status = lab.status().expect("status");
    status["secondaries"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == name).cloned())
        .unwrap_or_default()
}

/// Test 2: a secondary killed during a stream of sync writes. With minimum images 1 every
/// write is still acknowledged; the dead secondary is fractured, and when it returns it gets
/// only the extents in its fracture log.
#[test]
fn a_secondary_killed_during_sync_writes_resyncs_from_its_fracture_log() {
    let mut lab = export_lab("nbdkill", 2, &["--write-policy", "sync", "--minimum-images", "1"]);
    let s0 = 0; // the first process: secondary 0

    const WRITES: u64 = 240;
    let stream = write_stream(&lab, 0, WRITES, 0xc3);
    std::thread::sleep(Duration::from_millis(300));
    lab.processes[s0].kill();
    let out =
        stream.join().expect("qemu-io thread").unwrap_or_else(|e| panic!("qemu-io: {e}\n{}", lab.logs()));
    assert!(!out.contains("failed"), "a write failed with minimum images 1:\n{out}\n{}", lab.logs());
    assert_eq!(out.matches("wrote 65536/65536 bytes").count() as u64, WRITES, "{out}");
    until(&lab, "the killed secondary fractured", |_| peer_status(&lab, "s0")["fractured"] == true);

    let written_bytes = WRITES * 64 * KIB;
    lab.start_secondary(0, &[]).expect("s0 again");
    let status =
        lab.wait_synchronized(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let s0_status =
        status["secondaries"].as_array().unwrap().iter().find(|p| p["name"] == "s0").unwrap().clone();
    let resync = s0_status["resync_bytes"].as_u64().unwrap_or(u64::MAX);
    eprintln!("stream of {written_bytes} bytes; s0 killed during it resynced {resync} bytes");
    assert!(
        resync <= written_bytes,
        "resync shipped {resync} bytes, more than the {written_bytes} bytes written"
    );
    let hashes = lab.hashes().expect("hashing");
    assert!(hashes.iter().all(|h| *h == hashes[0]), "images differ: {hashes:?}\n{}", lab.logs());
}

/// Test 3: minimum images not met. A sync mirror of two images loses its secondary: writes
/// fail with EIO and change no image, the mirror goes to ATTENTION; once the secondary is back
/// and synchronized, writes succeed again.
#[test]
fn writes_fail_when_minimum_images_are_not_met() {
    require_root();
    let mut lab = Lab::new(&replicator_bin(), "nbdmin", 1, DEVICE_BYTES).expect("lab");
    let s0 = lab.start_secondary(0, &[]).expect("s0");
    let (device, state) =
        (lab.primary_device.path.display().to_string(), lab.state_dir("p").display().to_string());
    run_command(
        lab.binary.to_str().unwrap(),
        &[
            "create",
            "vol1",
            "--device",
            &device,
            "--state-dir",
            &state,
            "--image-name",
            "p",
            "--minimum-images",
            "2",
            "--write-policy",
            "sync",
        ],
    )
    .expect("create");
    let export = format!("nbd+unix:{}", socket(&lab).display());
    let fast: Vec<&str> = FAST.iter().copied().filter(|a| *a != "--skip-initial-sync").collect();
    let mut args = vec!["--export", export.as_str()];
    args.extend(fast);
    lab.start_primary_from_db(&args).expect("primary");
    wait_for_socket(&lab);
    lab.operate(&["add-secondary", &format!("s0={}", lab.secondary_addrs[0])]).expect("add-secondary");
    lab.wait_synchronized(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let out =
        qemu_io(&lab, &["write -P 0x77 0 64k".to_owned()]).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert!(!out.contains("failed"), "{out}");

    lab.processes[s0].kill();
    until(&lab, "the mirror in ATTENTION", |s| s["mirror"]["state"] == "ATTENTION");
    let before = lab.hashes().expect("hashing");
    let out = qemu_io(&lab, &["write -P 0x99 1M 64k".to_owned()])
        .expect_err("a write with too few images must fail");
    assert!(out.contains("Input/output error"), "a write with too few images must fail with EIO:\n{out}");
    assert_eq!(lab.hashes().expect("hashing"), before, "a refused write changed an image");
    assert!(lab.logs().contains("the mirror's minimum is 2"), "{}", lab.logs());

    // The operator switches the mirror to async: writes go on without the secondary, which gets
    // them when it returns. Then back to sync.
    lab.operate(&["set", "write-policy=async"])
        .unwrap_or_else(|e| panic!("set write-policy: {e}\n{}", lab.logs()));
    until(&lab, "write policy async", |s| s["write_policy"] == "async");
    let out =
        qemu_io(&lab, &["write -P 0x66 2M 64k".to_owned()]).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert!(!out.contains("failed"), "an async write needs no secondary:\n{out}");
    lab.operate(&["set", "write-policy=sync"])
        .unwrap_or_else(|e| panic!("set write-policy: {e}\n{}", lab.logs()));
    until(&lab, "write policy sync", |s| s["write_policy"] == "sync");

    lab.start_secondary(0, &[]).expect("s0 again");
    lab.wait_synchronized(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    until(&lab, "the mirror ACTIVE again", |s| s["mirror"]["state"] == "ACTIVE");
    let out =
        qemu_io(&lab, &["write -P 0x99 1M 64k".to_owned()]).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert!(!out.contains("failed"), "{out}");
    lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let hashes = lab.hashes().expect("hashing");
    assert!(hashes.iter().all(|h| *h == hashes[0]), "images differ: {hashes:?}\n{}", lab.logs());
}

/// The async policy, over TCP (`--export nbd:ADDR:PORT`, the client in the primary's network
/// namespace): writes are acknowledged after the primary's and cross the wire once each.
#[test]
fn async_writes_over_tcp_are_shipped_behind_once() {
    require_root();
    let mut lab = Lab::new(&replicator_bin(), "nbdasync", 1, DEVICE_BYTES).expect("lab");
    lab.start_secondary(0, &[]).expect("s0");
    let mut args = vec!["--export", "nbd:127.0.0.1:10809", "--write-policy", "async"];
    args.extend(FAST);
    lab.start_primary(&args).expect("primary");
    lab.wait_synchronized(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let before = shipped_bytes(&lab)[0];
    const WRITES: u64 = 100;
    let mut command = std::process::Command::new("ip");
    command.args(["netns", "exec", &lab.primary_ns.name, "qemu-io", "-f", "raw"]);
    for i in 0..WRITES {
        command.arg("-c").arg(format!("write -P 0x3c {} 64k", i * 128 * KIB));
    }
    command.arg("nbd://127.0.0.1:10809");
    let deadline = Instant::now() + Duration::from_secs(20);
    let output = loop {
        let output = command.output().expect("running qemu-io in the primary's namespace");
        if output.status.success() || Instant::now() > deadline {
            break output;
        }
        std::thread::sleep(Duration::from_millis(100)); // the export may still be starting
    };
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && !out.contains("failed"),
        "{out}{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        lab.logs()
    );
    lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    std::thread::sleep(Duration::from_millis(1500));
    let shipped = shipped_bytes(&lab)[0] - before;
    assert_eq!(shipped, WRITES * 64 * KIB, "each written extent crosses the wire once\n{}", lab.logs());
    let hashes = lab.hashes().expect("hashing");
    assert!(hashes.iter().all(|h| *h == hashes[0]), "images differ: {hashes:?}\n{}", lab.logs());
}

/// A raw NBD client: the fixed-newstyle handshake up to `NBD_OPT_GO` on export "", so a test
/// can then send what it likes.
fn raw_client(lab: &Lab) -> std::os::unix::net::UnixStream {
    use std::io::{Read as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(socket(lab)).expect("connecting to the export");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).expect("greeting");
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    stream.write_all(&3u32.to_be_bytes()).expect("client flags");
    let mut go = b"IHAVEOPT".to_vec();
    go.extend_from_slice(&7u32.to_be_bytes());
    go.extend_from_slice(&6u32.to_be_bytes());
    go.extend_from_slice(&0u32.to_be_bytes());
    go.extend_from_slice(&0u16.to_be_bytes());
    stream.write_all(&go).expect("NBD_OPT_GO");
    loop {
        let mut head = [0u8; 20];
        stream.read_exact(&mut head).expect("option reply");
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        stream.read_exact(&mut data).expect("option reply data");
        if u32::from_be_bytes(head[12..16].try_into().unwrap()) == 1 {
            return stream;
        }
    }
}

fn request(command: u16, offset: u64, len: u32) -> Vec<u8> {
    let mut r = 0x2560_9513u32.to_be_bytes().to_vec();
    r.extend_from_slice(&0u16.to_be_bytes());
    r.extend_from_slice(&command.to_be_bytes());
    r.extend_from_slice(&42u64.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

/// Whether the server closed the connection (reads end) rather than answering.
fn closed_by_server(stream: &mut std::os::unix::net::UnixStream) -> bool {
    use std::io::Read as _;
    let mut byte = [0u8; 1];
    matches!(stream.read(&mut byte), Ok(0) | Err(_))
}

/// Test 4: malformed clients (bad magic in the handshake and in a request, an oversize write,
/// an offset past the end) are disconnected with a log line; no image changes, and the export
/// goes on serving a well-behaved client.
#[test]
fn malformed_nbd_clients_are_disconnected() {
    use std::io::Write as _;
    let lab = export_lab("nbdbad", 1, &["--write-policy", "sync"]);
    let before = lab.hashes().expect("hashing");

    // Bad magic in the option phase.
    let mut stream = std::os::unix::net::UnixStream::connect(socket(&lab)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut greeting = [0u8; 18];
    std::io::Read::read_exact(&mut stream, &mut greeting).expect("greeting");
    stream.write_all(&3u32.to_be_bytes()).expect("flags");
    stream.write_all(b"NOTANOPT\0\0\0\x07\0\0\0\0").expect("bad option");
    assert!(closed_by_server(&mut stream), "a bad option magic must end the connection");

    let payload = vec![0xeeu8; 4096];
    let cases: [(&str, Vec<u8>); 4] = [
        ("bad request magic", {
            let mut r = request(1, 0, 4096);
            r[0] ^= 0xff;
            r.extend_from_slice(&payload);
            r
        }),
        ("oversize write", {
            let mut r = request(1, 0, 64 << 20);
            r.extend_from_slice(&payload);
            r
        }),
        ("write past the end", {
            let mut r = request(1, DEVICE_BYTES, 4096);
            r.extend_from_slice(&payload);
            r
        }),
        ("read past the end", request(0, DEVICE_BYTES - 512, 4096)),
    ];
    for (what, bytes) in cases {
        let mut stream = raw_client(&lab);
        stream.write_all(&bytes).expect("sending the request");
        assert!(closed_by_server(&mut stream), "{what}: the export must disconnect the client");
    }
    // A zero-length write is valid NBD: answered, and nothing reaches the secondaries.
    let mut stream = raw_client(&lab);
    stream.write_all(&request(1, 4096, 0)).expect("a zero-length write");
    let mut reply = [0u8; 16];
    std::io::Read::read_exact(&mut stream, &mut reply).expect("its reply");
    assert_eq!(&reply[4..8], &[0, 0, 0, 0], "a zero-length write succeeds");
    drop(stream);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(peer_status(&lab, "s0")["disconnects"], 0, "the secondary's session survived\n{}", lab.logs());
    let logs = lab.logs();
    for reason in ["bad magic", "over the export's maximum", "outside the"] {
        assert!(logs.contains(reason), "no log line with {reason:?}:\n{logs}");
    }
    assert_eq!(lab.hashes().expect("hashing"), before, "a malformed client changed an image");

    let out = qemu_io(&lab, &["write -P 0x42 0 4k".to_owned(), "read -P 0x42 0 4k".to_owned()])
        .unwrap_or_else(|e| {
            panic!("the export stopped serving after malformed clients: {e}\n{}", lab.logs())
        });
    assert!(!out.contains("failed"), "{out}");

    // Clients that connect and never handshake hold every connection place, until the
    // handshake timeout (10 s) drops them; then the export serves again.
    let idle: Vec<_> = (0..16)
        .map(|_| std::os::unix::net::UnixStream::connect(socket(&lab)).expect("an idle client"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert!(qemu_io(&lab, &["read 0 4k".to_owned()]).is_err(), "a 17th client was served");
    std::thread::sleep(Duration::from_secs(11));
    for mut stream in idle {
        stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut greeting = [0u8; 18];
        std::io::Read::read_exact(&mut stream, &mut greeting).expect("the greeting came first");
        assert!(closed_by_server(&mut stream), "an idle client was kept past the handshake timeout");
    }
    qemu_io(&lab, &["read -P 0x42 0 4k".to_owned()])
        .unwrap_or_else(|e| panic!("not served after the idle clients went: {e}\n{}", lab.logs()));
    assert!(lab.logs().contains("no handshake within"), "no log line for the idle clients\n{}", lab.logs());
    lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let hashes = lab.hashes().expect("hashing");
    assert!(hashes.iter().all(|h| *h == hashes[0]), "images differ: {hashes:?}\n{}", lab.logs());
}

/// Overlapping writes in flight together (qemu-io `aio_write`), and a client that disconnects
/// right behind its last write: the images converge to the primary's bytes, and the write sent
/// just before `NBD_CMD_DISC` still gets its reply.
#[test]
fn overlapping_writes_converge_and_disconnect_waits_for_replies() {
    use std::io::{Read as _, Write as _};
    let lab = export_lab("nbdover", 1, &["--write-policy", "sync"]);
    let mut commands = Vec::new();
    for i in 0..64u64 {
        let base = (i % 8) * 256 * KIB;
        commands.push(format!("aio_write -P {:#x} {} 128k", i + 1, base));
        commands.push(format!("aio_write -P {:#x} {} 64k", i + 101, base + 64 * KIB));
    }
    commands.push("aio_flush".to_owned());
    let out = qemu_io(&lab, &commands).unwrap_or_else(|e| panic!("qemu-io: {e}\n{}", lab.logs()));
    assert!(!out.contains("failed"), "{out}");

    let mut stream = raw_client(&lab);
    let mut bytes = request(1, 8 * MIB, 4096);
    bytes.extend_from_slice(&[0x77u8; 4096]);
    bytes.extend_from_slice(&request(2, 0, 0));
    stream.write_all(&bytes).expect("a write, then NBD_CMD_DISC");
    let mut reply = [0u8; 16];
    stream.read_exact(&mut reply).expect("the write's reply comes before the connection closes");
    assert_eq!(&reply[4..8], &[0, 0, 0, 0], "the write succeeded");
    assert!(
        closed_by_server(&mut stream),
        "after NBD_CMD_DISC the server closes, though the client keeps its end"
    );

    lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let hashes = lab.hashes().expect("hashing");
    assert!(hashes.iter().all(|h| *h == hashes[0]), "images differ: {hashes:?}\n{}", lab.logs());
}

/// A client that pipelines far more requests than the export holds buffers and reply queue
/// for (all its writes, then all its reads, sent without waiting for replies; the reads' replies
/// left unread for a second): every request is answered, and the data read back is what was
/// written.
#[test]
fn pipelined_requests_past_every_bound_are_all_answered() {
    use std::io::{Read as _, Write as _};
    const REQUESTS: u64 = 600;
    let lab = export_lab("nbdpipe", 1, &["--write-policy", "sync"]);
    let mut stream = raw_client(&lab);
    for reads in [false, true] {
        let mut writer = stream.try_clone().expect("cloning the client socket");
        writer.set_write_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let sender = std::thread::spawn(move || {
            for i in 0..REQUESTS {
                let mut bytes = request(if reads { 0 } else { 1 }, i * 8 * KIB, 8192);
                bytes[8..16].copy_from_slice(&i.to_be_bytes());
                if !reads {
                    bytes.extend_from_slice(&[(i % 251) as u8; 8192]);
                }
                writer.write_all(&bytes).expect("a pipelined request");
            }
        });
        if reads {
            // The reads' replies fill the socket while nobody reads them: the replier's queue
            // reaches its bound and the export stops decoding, until the client reads again.
            std::thread::sleep(Duration::from_secs(1));
        }
        let mut data = vec![0u8; 8192];
        for n in 0..REQUESTS {
            let mut reply = [0u8; 16];
            stream.read_exact(&mut reply).unwrap_or_else(|e| panic!("reply {n}: {e}\n{}", lab.logs()));
            assert_eq!(&reply[4..8], &[0, 0, 0, 0], "request failed\n{}", lab.logs());
            if reads {
                let i = u64::from_be_bytes(reply[8..16].try_into().unwrap());
                stream.read_exact(&mut data).expect("a read's data");
                assert!(data.iter().all(|&b| b == (i % 251) as u8), "read {i} returned other bytes");
            }
        }
        sender.join().expect("sender thread");
    }
    half_closed_client_gets_every_reply(&lab);
    lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let hashes = lab.hashes().expect("hashing");
    assert!(hashes.iter().all(|h| *h == hashes[0]), "images differ: {hashes:?}\n{}", lab.logs());
}

/// A client that pipelines reads and then writes and closes its end (no `NBD_CMD_DISC`)
/// while the export has stopped decoding (the reads' replies unread): every request it sent
/// is still answered, then the server closes; the writes are on the primary.
fn half_closed_client_gets_every_reply(lab: &Lab) {
    use std::io::{Read as _, Write as _};
    const REQUESTS: u64 = 300;
    let mut stream = raw_client(lab);
    let mut writer = stream.try_clone().expect("cloning the client socket");
    writer.set_write_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let sender = std::thread::spawn(move || {
        for i in 0..2 * REQUESTS {
            let write = i >= REQUESTS;
            let mut bytes = request(u16::from(write), (i % REQUESTS) * 8 * KIB, 8192);
            bytes[8..16].copy_from_slice(&i.to_be_bytes());
            if write {
                bytes.extend_from_slice(&[0xc3; 8192]);
            }
            writer.write_all(&bytes).expect("a pipelined request");
        }
        writer.shutdown(std::net::Shutdown::Write).expect("closing the client's end");
    });
    std::thread::sleep(Duration::from_secs(1));
    let mut data = vec![0u8; 8192];
    for n in 0..2 * REQUESTS {
        let mut reply = [0u8; 16];
        stream
            .read_exact(&mut reply)
            .unwrap_or_else(|e| panic!("half-closed: reply {n}: {e}\n{}", lab.logs()));
        assert_eq!(&reply[4..8], &[0, 0, 0, 0], "request failed\n{}", lab.logs());
        if u64::from_be_bytes(reply[8..16].try_into().unwrap()) < REQUESTS {
            stream.read_exact(&mut data).expect("a read's data");
        }
    }
    sender.join().expect("sender thread");
    assert!(closed_by_server(&mut stream), "the server closes once every request is answered");
    let written =
        read_range_direct(&lab.primary_device.path, 0, (REQUESTS * 8 * KIB) as usize).expect("reading");
    assert!(written.iter().all(|&b| b == 0xc3), "a half-closed client's writes are not all on the primary");
}

/// `fsfreeze -f` on a mount, undone when dropped (before the processes stuck on it are
/// stopped, so none stays blocked).
struct Frozen<'a>(&'a std::path::Path);

impl<'a> Frozen<'a> {
    fn new(mount: &'a std::path::Path) -> Self {
        run_command("fsfreeze", &["-f", mount.to_str().expect("a UTF-8 path")]).expect("fsfreeze -f");
        Self(mount)
    }
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        let _ = run_command("fsfreeze", &["-u", self.0.to_str().unwrap_or_default()]);
    }
}

/// A secondary whose disk write hangs (the filesystem under its image's backing file is
/// frozen) while its session still answers keepalives is cut off once its oldest frame has
/// waited four timeouts: the sync write is acknowledged (minimum images 1), the secondary is
/// fractured, and once its disk is back it resyncs only what it missed.
#[test]
fn a_secondary_whose_disk_write_hangs_is_cut_off() {
    require_root();
    // s0's image file lives on an ext4 of its own (tmpfs cannot be frozen); dropped after the
    // lab, the mount before its loop device.
    let fs_device = LoopDevice::create("nbdhang-fs", 256 * MIB).expect("a loop device for the filesystem");
    run_command("mkfs.ext4", &["-q", "-F", fs_device.path.to_str().expect("a UTF-8 path")])
        .expect("mkfs.ext4");
    let mount = Mount::new(&fs_device.path, "rw");
    let mut lab = Lab::new(&replicator_bin(), "nbdhang", 1, DEVICE_BYTES).expect("lab");
    let backing = mount.dir.join("s0.img");
    std::fs::File::create(&backing).and_then(|f| f.set_len(DEVICE_BYTES)).expect("s0's image file");
    lab.secondary_devices[0] = LoopDevice::over_file(backing).expect("a loop device over the tmpfs file");
    // Its state directory (the journal, where frames wait for their cut) on that disk too: the
    // whole host's disk hangs.
    let state = mount.dir.join("s0-state");
    std::fs::create_dir_all(&state).expect("s0's state directory");
    std::os::unix::fs::symlink(&state, lab.state_dir("s0")).expect("s0's state directory on the ext4");
    lab.start_secondary(0, &["--journal-bytes", "32MiB"]).expect("secondary");
    let export = format!("nbd+unix:{}", socket(&lab).display());
    let mut args = vec!["--export", export.as_str(), "--write-policy", "sync", "--minimum-images", "1"];
    args.extend(FAST);
    lab.start_primary(&args).expect("primary");
    lab.wait_synchronized(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    wait_for_socket(&lab);
    qemu_io(&lab, &["write -P 0x21 0 64k".to_owned()])
        .unwrap_or_else(|e| panic!("qemu-io: {e}\n{}", lab.logs()));

    let started = Instant::now();
    {
        let _frozen = Frozen::new(&mount.dir);
        let out = qemu_io(&lab, &["write -P 0x42 1M 64k".to_owned()])
            .unwrap_or_else(|e| panic!("qemu-io during the hang: {e}\n{}", lab.logs()));
        assert!(!out.contains("failed"), "the write failed with minimum images 1:\n{out}\n{}", lab.logs());
        let waited = started.elapsed();
        // Cut off by the ack deadline (its write hangs in the kernel) or by its silence (its
        // session waits on a commit to the hung disk): either way after the timeout (2 s).
        assert!(waited >= Duration::from_secs(2), "acknowledged after {waited:?}, before s0 was cut off");
        until(&lab, "s0 fractured", |_| peer_status(&lab, "s0")["fractured"] == true);
        let logs = lab.logs();
        assert!(
            logs.contains("still not acknowledged") || logs.contains("no ack or keepalive"),
            "no log line names the hang\n{logs}"
        );
        eprintln!("the write through the export was acknowledged {waited:?} after s0's disk hung");
    }
    let status =
        lab.wait_synchronized(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let s0 = status["secondaries"][0]["resync_bytes"].as_u64().unwrap_or(u64::MAX);
    assert!(s0 <= 4 * MIB, "s0 resynced {s0} bytes for one 64 KiB write missed");
    let hashes = lab.hashes().expect("hashing");
    assert!(hashes.iter().all(|h| *h == hashes[0]), "images differ: {hashes:?}\n{}", lab.logs());
}

/// A cgroup (v1 blkio) that limits the writes of one process to one device to `bytes_per_s`;
/// the process goes back to the root cgroup, and the cgroup away, when dropped.
struct Throttled {
    dir: PathBuf,
}

impl Throttled {
    fn new(label: &str, pid: u32, device: &std::path::Path, bytes_per_s: u64) -> Self {
        let dir = PathBuf::from("/sys/fs/cgroup/blkio").join(format!("replicator-{label}"));
        let rdev = std::os::unix::fs::MetadataExt::rdev(&std::fs::metadata(device).expect("the device"));
        let (major, minor) = (nix::sys::stat::major(rdev), nix::sys::stat::minor(rdev));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("creating {} (the blkio cgroup controller): {e}", dir.display()));
        let throttled = Self { dir };
        let limit = format!("{major}:{minor} {bytes_per_s}");
        std::fs::write(throttled.dir.join("blkio.throttle.write_bps_device"), &limit)
            .unwrap_or_else(|e| panic!("limiting writes to {limit}: {e}"));
        std::fs::write(throttled.dir.join("cgroup.procs"), pid.to_string())
            .unwrap_or_else(|e| panic!("moving process {pid} into {}: {e}", throttled.dir.display()));
        throttled
    }
}

impl Drop for Throttled {
    fn drop(&mut self) {
        let procs = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        for pid in procs.lines() {
            let _ = std::fs::write("/sys/fs/cgroup/blkio/cgroup.procs", pid);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A TRIM that a secondary takes longer than the timeout to apply (its device zeroes at disk
/// speed: no discard here, and writes throttled to 16 MiB/s) is not taken for a dead link: the
/// secondary sends keepalives between the chunks it zeroes, stays connected and unfractured,
/// and the client's TRIM succeeds with minimum images 2.
#[test]
fn a_long_trim_does_not_look_like_a_dead_secondary() {
    let lab = export_lab("nbdslowzero", 1, &["--write-policy", "sync", "--minimum-images", "2"]);
    qemu_io(&lab, &["write -P 0x5a 0 48M".to_owned()])
        .unwrap_or_else(|e| panic!("qemu-io: {e}\n{}", lab.logs()));
    let pid = lab.processes[0].child.id();
    let throttled = Throttled::new("nbdslowzero", pid, &lab.secondary_devices[0].path, 16 * MIB);

    let started = Instant::now();
    let out = qemu_io(&lab, &["discard 0 48M".to_owned()])
        .unwrap_or_else(|e| panic!("qemu-io discard: {e}\n{}", lab.logs()));
    let took = started.elapsed();
    assert!(!out.contains("failed"), "the TRIM failed:\n{out}\n{}", lab.logs());
    assert!(took > Duration::from_secs(2), "the TRIM took {took:?}, not longer than the timeout (2 s)");
    drop(throttled);
    let s0 = peer_status(&lab, "s0");
    assert_eq!(s0["fractured"], false, "s0 was fractured by a slow TRIM: {s0}\n{}", lab.logs());
    assert_eq!(s0["connects"], 1, "s0 was disconnected by a slow TRIM: {s0}\n{}", lab.logs());
    for device in std::iter::once(&lab.primary_device).chain(&lab.secondary_devices) {
        let bytes = read_range_direct(&device.path, 0, 48 * MIB as usize).expect("reading an image");
        assert!(
            bytes.iter().all(|&b| b == 0),
            "{} does not read zeroes after the TRIM",
            device.path.display()
        );
    }
    lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let hashes = lab.hashes().expect("hashing");
    assert!(hashes.iter().all(|h| *h == hashes[0]), "images differ: {hashes:?}\n{}", lab.logs());
    eprintln!("a 48 MiB TRIM that s0 applied in {took:?} (timeout 2 s) left it connected and in sync");
}

/// `replicator_busy_poll_seconds_total` as the member in `netns` serves it on `addr`.
fn busy_poll_seconds(netns: &str, addr: &str) -> f64 {
    let text = http_get(netns, addr, "/metrics");
    text.lines()
        .filter(|line| line.starts_with("replicator_busy_poll_seconds_total"))
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no replicator_busy_poll_seconds_total in:\n{text}"))
}

/// Busy-polling by default (no `--poll-us`): neither member spins for the initial full sync
/// or for async writes through the export; both spin while sync writes flow (the secondary
/// learns it from the frames' flag). Each write crosses the wire once either way.
#[test]
fn busy_polling_by_default_only_while_sync_writes_flow() {
    require_root();
    let mut lab = Lab::new(&replicator_bin(), "nbdpoll", 1, DEVICE_BYTES).expect("lab");
    lab.start_secondary(0, &["--metrics", "127.0.0.1:9104"]).expect("s0");
    let export = format!("nbd+unix:{}", socket(&lab).display());
    let fast: Vec<&str> = FAST.iter().copied().filter(|a| *a != "--skip-initial-sync").collect();
    let start = |lab: &mut Lab, policy: &str| {
        let mut args =
            vec!["--export", export.as_str(), "--write-policy", policy, "--metrics", "127.0.0.1:9103"];
        args.extend(&fast);
        let primary = lab.start_primary(&args).expect("primary");
        lab.wait_synchronized(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
        wait_for_socket(lab);
        primary
    };
    let (p_ns, s_ns) = (lab.primary_ns.name.clone(), lab.secondary_ns[0].name.clone());
    const WRITES: u64 = 200;
    let stream = |lab: &Lab, first_offset: u64, pattern: u8| {
        let before = shipped_bytes(lab)[0];
        let out = write_stream(lab, first_offset, WRITES, pattern)
            .join()
            .expect("qemu-io thread")
            .unwrap_or_else(|e| panic!("qemu-io: {e}\n{}", lab.logs()));
        assert_eq!(out.matches("wrote 65536/65536 bytes").count() as u64, WRITES, "{out}");
        lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
        std::thread::sleep(Duration::from_millis(1000)); // a few drains
        let shipped = shipped_bytes(lab)[0] - before;
        assert_eq!(shipped, WRITES * 64 * KIB, "each write crosses the wire once\n{}", lab.logs());
    };

    // The initial full sync (64 MiB) and async writes: no spin on either member.
    let primary = start(&mut lab, "async");
    stream(&lab, 0, 0x5a);
    let (p_async, s_async) =
        (busy_poll_seconds(&p_ns, "127.0.0.1:9103"), busy_poll_seconds(&s_ns, "127.0.0.1:9104"));
    eprintln!(
        "busy-poll seconds after a full sync and {WRITES} async writes: primary {p_async}, secondary {s_async}"
    );
    assert_eq!((p_async, s_async), (0.0, 0.0), "spun without a client waiting\n{}", lab.logs());
    lab.processes[primary].stop();
    // The next primary's status, not this one's, must say when it is synchronized.
    std::fs::remove_file(lab.state_dir("p").join("status.json")).expect("removing the status file");

    // Sync writes: both spin while they flow.
    start(&mut lab, "sync");
    stream(&lab, 64 * KIB, 0xa5);
    let (p_sync, s_sync) =
        (busy_poll_seconds(&p_ns, "127.0.0.1:9103"), busy_poll_seconds(&s_ns, "127.0.0.1:9104"));
    eprintln!("busy-poll seconds after {WRITES} sync writes: primary {p_sync}, secondary {s_sync}");
    assert!(p_sync > 0.0 && s_sync > 0.0, "no spin while sync writes flowed\n{}", lab.logs());
    let hashes = lab.hashes().expect("hashing");
    assert!(hashes.iter().all(|h| *h == hashes[0]), "images differ: {hashes:?}\n{}", lab.logs());
}
