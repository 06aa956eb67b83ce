//! A live mirror on the real kernel: a primary and secondaries on loop devices, each in its own
//! network namespace over veth. Every test ends by hashing the images and comparing, and checks
//! how much was shipped.

use std::time::{Duration, Instant};

use replicator_tests::*;

const DEVICE_BYTES: u64 = 256 * MIB;

fn lab(label: &str, secondaries: usize) -> Lab {
    require_root();
    Lab::new(&replicator_bin(), label, secondaries, DEVICE_BYTES)
        .expect("setting up namespaces, veths and loop devices")
}

fn assert_images_equal(lab: &Lab) {
    let hashes = lab.hashes().expect("hashing the images");
    eprintln!("image hashes: {hashes:?}");
    assert!(hashes.iter().all(|h| *h == hashes[0]), "images differ: {hashes:?}\n{}", lab.logs());
}

fn peer_u64(status: &serde_json::Value, peer: usize, field: &str) -> u64 {
    status["secondaries"][peer][field].as_u64().unwrap_or_else(|| panic!("status has no {field}: {status}"))
}

fn fio(device: &std::path::Path, args: &[&str]) {
    let filename = format!("--filename={}", device.display());
    let mut all = vec![
        "--name=workload",
        filename.as_str(),
        "--direct=1",
        "--ioengine=io_uring",
        "--output-format=terse",
    ];
    all.extend_from_slice(args);
    run_command("fio", &all).expect("fio (package fio)");
}

/// 1. A fio random-write workload for 20 s while replicating to two secondaries, with the
///    initial full sync running underneath; afterwards the three images are equal.
#[test]
fn steady_state_random_writes_two_secondaries() {
    let mut lab = lab("steady", 2);
    lab.start_secondary(0, &[]).expect("secondary 0");
    lab.start_secondary(1, &[]).expect("secondary 1");
    lab.start_primary(&[]).expect("primary");
    fio(
        &lab.primary_device.path,
        &["--rw=randwrite", "--bsrange=4k-1m", "--iodepth=8", "--runtime=20", "--time_based"],
    );
    let status = lab.wait_in_sync(Duration::from_secs(90)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert_images_equal(&lab);
    for peer in 0..2 {
        let shipped = peer_u64(&status, peer, "shipped_bytes");
        eprintln!("secondary {peer}: shipped {} MiB", shipped / MIB);
        assert!(shipped >= DEVICE_BYTES, "the initial sync ships the whole device at least once");
        assert_eq!(peer_u64(&status, peer, "disconnects"), 0, "{}", lab.logs());
    }
}

/// Without an initial sync, exactly the extents written are shipped, once each.
#[test]
fn ships_exactly_the_extents_written() {
    let mut lab = lab("exact", 2);
    lab.start_secondary(0, &["--metrics", "127.0.0.1:9102"]).expect("secondary 0");
    // Secondary 1 takes part of its settings from a config file.
    let config = lab.dir.join("s1.toml");
    std::fs::write(&config, "mirror-id = 1\nextent-size = \"64KiB\"\ntimeout-ms = 4000\n")
        .expect("config file");
    lab.start_secondary(1, &["--config", config.to_str().expect("utf-8")]).expect("secondary 1");
    lab.start_primary(&["--skip-initial-sync", "--metrics", "127.0.0.1:9101"]).expect("primary");
    let started = Instant::now();
    lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    eprintln!("connected and in sync after {:?}", started.elapsed());
    let mut rng = Rng::new(0xe7ac7);
    let mut extents = std::collections::BTreeSet::new();
    while extents.len() < 100 {
        let extent = rng.below(DEVICE_BYTES / (64 * KIB));
        if extents.contains(&extent) {
            continue;
        }
        write_direct(&lab.primary_device.path, extent * 64 * KIB + 4096 * rng.below(16), 4096, 0xab)
            .expect("write");
        extents.insert(extent);
    }
    let started = Instant::now();
    let status = lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    eprintln!("in sync {:?} after the writes", started.elapsed());
    assert_images_equal(&lab);
    for peer in 0..2 {
        let shipped_extents = peer_u64(&status, peer, "shipped_extents");
        eprintln!("secondary {peer}: {} extents written, {shipped_extents} shipped", extents.len());
        assert_eq!(shipped_extents, extents.len() as u64, "each written extent is shipped exactly once");
        assert_eq!(peer_u64(&status, peer, "shipped_bytes"), extents.len() as u64 * 64 * KIB);
    }
    // The same figures through Prometheus metrics, on the primary and on a secondary.
    let shipped = extents.len() as u64 * 64 * KIB;
    let primary_metrics = http_get(&lab.primary_ns.name, "127.0.0.1:9101", "/metrics");
    for (name, secondary, value) in [
        ("replicator_shipped_bytes_total", "s0", shipped),
        ("replicator_shipped_bytes_total", "s1", shipped),
        ("replicator_secondary_connected", "s0", 1),
        ("replicator_out_of_sync_bytes", "s1", 0),
    ] {
        assert!(
            has_metric(&primary_metrics, name, &format!("secondary=\"{secondary}\""), value),
            "primary metrics lack {name}{{secondary={secondary}}} {value}:\n{primary_metrics}"
        );
    }
    let secondary_metrics = http_get(&lab.secondary_ns[0].name, "127.0.0.1:9102", "/metrics");
    assert!(
        has_metric(&secondary_metrics, "replicator_written_bytes_total", "mirror=", shipped),
        "secondary metrics lack replicator_written_bytes_total {shipped}:\n{secondary_metrics}"
    );
}

/// Whether `text` has a sample of metric `name` with a label containing `label` and `value`.
fn has_metric(text: &str, name: &str, label: &str, value: u64) -> bool {
    text.lines().any(|line| {
        line.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('{'))
            .and_then(|rest| rest.split_once("} "))
            .is_some_and(|(labels, v)| labels.contains(label) && v == value.to_string())
    })
}

/// 2. A filesystem workload gives identical images too.
#[test]
fn filesystem_workload_two_secondaries() {
    let mut lab = lab("fs", 2);
    lab.start_secondary(0, &[]).expect("secondary 0");
    lab.start_secondary(1, &[]).expect("secondary 1");
    lab.start_primary(&["--skip-initial-sync"]).expect("primary");
    // Writes made before the primary's tracker is attached are not tracked: wait for it.
    lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let dev = lab.primary_device.path.to_str().expect("utf-8").to_owned();
    run_command("mkfs.ext4", &["-q", "-F", &dev]).expect("mkfs.ext4");
    let mut mount = Mount::new(&lab.primary_device.path, "rw");
    let tree = mount.dir.join("tree");
    run_command("cp", &["-a", "/usr/share/doc", tree.to_str().expect("utf-8")])
        .expect("copying a tree of files");
    run_command(
        "cp",
        &["-a", "/usr/lib/x86_64-linux-gnu/perl-base", mount.dir.join("perl").to_str().expect("utf-8")],
    )
    .or_else(|_| run_command("cp", &["-a", "/etc", mount.dir.join("etc").to_str().expect("utf-8")]))
    .expect("copying a second tree");
    for entry in std::fs::read_dir(&tree).expect("listing the tree").flatten().step_by(3) {
        let _ = std::fs::remove_dir_all(entry.path()).or_else(|_| std::fs::remove_file(entry.path()));
    }
    run_command("sync", &[]).expect("sync");
    mount.unmount();
    let status = lab.wait_in_sync(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert_images_equal(&lab);
    eprintln!("shipped {} KiB to each secondary", peer_u64(&status, 0, "shipped_bytes") / KIB);
}

fn primary_rss_kib(lab: &Lab, index: usize) -> u64 {
    let pid = lab.processes[index].child.id();
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading the primary's status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// 3. A secondary rate-limited with tbf does not slow shipping to the fast one, its backlog
///    stays within its limit, and it catches up once the limit is lifted.
#[test]
fn slow_secondary_does_not_hold_back_the_fast_one() {
    let mut lab = lab("slow", 2);
    lab.start_secondary(0, &[]).expect("secondary 0");
    lab.start_secondary(1, &[]).expect("secondary 1");
    let primary = lab.start_primary(&["--skip-initial-sync", "--backlog", "8MiB"]).expect("primary");
    lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let slow_if = lab.primary_ifs[1].clone();
    run_command(
        "tc",
        &[
            "-n",
            &lab.primary_ns.name,
            "qdisc",
            "add",
            "dev",
            &slow_if,
            "root",
            "tbf",
            "rate",
            "16mbit",
            "burst",
            "64kb",
            "latency",
            "3000ms",
        ],
    )
    .expect("tc qdisc add tbf");
    fio(&lab.primary_device.path, &["--rw=write", "--bs=1m", "--size=96m", "--iodepth=4"]);

    let started = Instant::now();
    let mut fast_in_sync_with_slow_behind = false;
    let mut backlog_max = 0;
    let mut rss_max_kib = 0;
    while started.elapsed() < Duration::from_secs(30) && !fast_in_sync_with_slow_behind {
        if let Some(status) = lab.status() {
            backlog_max = backlog_max.max(peer_u64(&status, 1, "backlog_bytes"));
            rss_max_kib = rss_max_kib.max(primary_rss_kib(&lab, primary));
            let fast = status["secondaries"][0]["in_sync"].as_bool() == Some(true);
            let slow_pending =
                peer_u64(&status, 1, "pending_extents") + peer_u64(&status, 1, "inflight_frames");
            fast_in_sync_with_slow_behind = fast && slow_pending > 0;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let fast_secs = started.elapsed().as_secs_f64();
    eprintln!(
        "fast secondary in sync {fast_secs:.1} s after the workload, slow backlog max {} KiB, primary RSS max {} MiB",
        backlog_max / KIB,
        rss_max_kib / 1024
    );
    assert!(
        fast_in_sync_with_slow_behind,
        "the fast secondary did not get in sync while the slow one lagged\n{}",
        lab.logs()
    );
    assert!(backlog_max <= 8 * MIB, "slow secondary's backlog {backlog_max} passed its 8 MiB limit");
    assert!(rss_max_kib < 160 * 1024, "primary RSS {rss_max_kib} KiB: memory must stay bounded");

    run_command("tc", &["-n", &lab.primary_ns.name, "qdisc", "del", "dev", &slow_if, "root"])
        .expect("tc qdisc del");
    lab.wait_in_sync(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert_images_equal(&lab);
}

/// 4. Hostile peers: a wrong key, a wrong image size, random bytes, and a valid handshake
///    followed by malformed frames. Each is refused with a log line, the image is unchanged,
///    and the secondary then serves the real primary.
#[test]
fn hostile_peers_are_refused_and_write_nothing() {
    use std::io::{Read as _, Write as _};

    use replicator::auth::{self, Key, Params};
    use replicator::wire::{self, Message};

    let mut lab = lab("hostile", 1);
    let secondary = lab.start_secondary(0, &[]).expect("secondary");
    std::thread::sleep(Duration::from_millis(500));
    let before = hash_device(&lab.secondary_devices[0].path).expect("hash");
    let addr = lab.secondary_addrs[0];
    let key_bytes = std::fs::read(&lab.key_file).expect("key file");
    let right = Params { mirror_id: 1, image_bytes: DEVICE_BYTES, extent_bytes: 64 * KIB };

    let outcomes = in_netns(&lab.primary_ns.name, move || {
        let connect = || std::net::TcpStream::connect(addr).expect("connecting to the secondary");
        let mut outcomes = Vec::new();
        // Wrong key.
        let wrong = Key::from_bytes(b"definitely-not-the-right-key");
        outcomes
            .push(format!("wrong key: {:?}", auth::primary_handshake(&mut connect(), &wrong, &right).err()));
        // Right key, wrong image size.
        let key = Key::from_bytes(key_bytes.trim_ascii());
        let small = Params { image_bytes: DEVICE_BYTES / 2, ..right };
        outcomes
            .push(format!("wrong size: {:?}", auth::primary_handshake(&mut connect(), &key, &small).err()));
        // Random bytes.
        let mut stream = connect();
        let mut rng = Rng::new(0xbad);
        let garbage: Vec<u8> = (0..4096).map(|_| rng.next_u64() as u8).collect();
        let _ = stream.write_all(&garbage);
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
        outcomes.push("random bytes: sent".into());
        // A valid handshake, then an extent outside the image, then one with a bad checksum.
        let data = vec![0xeeu8; 64 * KIB as usize];
        for corrupt in [false, true] {
            let mut stream = connect();
            let sequence = auth::primary_handshake(&mut stream, &key, &right).expect("valid handshake");
            let offset_bytes = if corrupt { 0 } else { DEVICE_BYTES };
            let mut frame = Vec::new();
            wire::encode(&Message::ExtentData { offset_bytes, data: &data }, sequence, &mut frame);
            if corrupt {
                let last = frame.len() - 1;
                frame[last] ^= 1;
            }
            let _ = stream.write_all(&frame);
            let mut reply = Vec::new();
            let _ = stream.read_to_end(&mut reply);
            outcomes.push(format!("malformed frame (corrupt={corrupt}): {} bytes of reply", reply.len()));
        }
        outcomes
    });
    eprintln!("{outcomes:#?}");
    assert!(outcomes[0].contains("BadProof") || outcomes[0].contains("Refused"), "{}", outcomes[0]);
    assert!(outcomes[1].contains("268435456") && outcomes[1].contains("134217728"), "{}", outcomes[1]);

    std::thread::sleep(Duration::from_millis(300));
    let log = lab.processes[secondary].log_text();
    assert!(log.matches("refused a connection").count() >= 3, "three refusals logged:\n{log}");
    assert!(log.matches("session ended").count() >= 2, "two sessions ended on malformed frames:\n{log}");
    assert_eq!(
        hash_device(&lab.secondary_devices[0].path).expect("hash"),
        before,
        "hostile peers changed the image"
    );

    // The real primary is still served.
    lab.start_primary(&["--skip-initial-sync"]).expect("primary");
    lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    write_direct(&lab.primary_device.path, 5 * MIB, 128 * KIB as usize, 0x42).expect("write");
    lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert_images_equal(&lab);
}

/// A flood of connections that never handshake, and one that sends its Hello a byte at a
/// time: the secondary serves at most 8 at once (the rest are closed at once), each for at
/// most its timeout (1 s here) in all, not per read; then the real primary is served.
#[test]
fn handshakes_have_a_deadline_and_connections_a_bound() {
    use std::io::{Read as _, Write as _};

    let mut lab = lab("handshake", 1);
    let secondary = lab.start_secondary(0, &["--timeout-ms", "1000"]).expect("secondary");
    std::thread::sleep(Duration::from_millis(500));
    let addr = lab.secondary_addrs[0];
    let (idle_closed_s, trickle_closed_s) = in_netns(&lab.primary_ns.name, move || {
        let connect = || std::net::TcpStream::connect(addr).expect("connecting to the secondary");
        let started = Instant::now();
        let idle: Vec<_> = (0..12).map(|_| connect()).collect();
        // Closed by the secondary: each read ends (0 bytes or an error) once it gives up.
        let closed = |mut stream: std::net::TcpStream| {
            stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
            let mut byte = [0u8; 1];
            let _ = stream.read(&mut byte);
        };
        idle.into_iter().for_each(closed);
        let idle_closed_s = started.elapsed().as_secs_f64();
        // A frame trickled a byte every 150 ms: its 32-byte header alone would take 4.8 s.
        let mut trickle = connect();
        let started = Instant::now();
        let mut frame = Vec::new();
        replicator::wire::encode(&replicator::wire::Message::Keepalive, 0, &mut frame);
        for byte in &frame {
            if trickle.write_all(std::slice::from_ref(byte)).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(150));
        }
        closed(trickle);
        (idle_closed_s, started.elapsed().as_secs_f64())
    });
    eprintln!(
        "12 idle connections all closed after {idle_closed_s:.2} s; the trickling one after {trickle_closed_s:.2} s"
    );
    assert!(idle_closed_s < 3.0, "idle connections held for {idle_closed_s:.2} s\n{}", lab.logs());
    assert!(trickle_closed_s < 3.0, "a trickled handshake held for {trickle_closed_s:.2} s\n{}", lab.logs());
    let log = lab.processes[secondary].log_text();
    assert!(log.contains("are open already"), "connections past the bound refused:\n{log}");
    assert!(log.contains("handshake not done within 1000 ms"), "the deadline named:\n{log}");

    // The real primary is served, and ships what it is given.
    lab.start_primary(&["--skip-initial-sync"]).expect("primary");
    lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    write_direct(&lab.primary_device.path, 5 * MIB, 128 * KIB as usize, 0x42).expect("write");
    lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let status = lab.status().expect("status");
    assert_eq!(peer_u64(&status, 0, "shipped_bytes"), 128 * KIB, "{status}");
    assert_images_equal(&lab);
}

/// Writes `count` distinct extents not in `written`, 4 KiB into each, and records them.
fn write_distinct_extents(
    lab: &Lab,
    rng: &mut Rng,
    written: &mut std::collections::BTreeSet<u64>,
    count: usize,
) {
    let target = written.len() + count;
    while written.len() < target {
        let extent = rng.below(DEVICE_BYTES / (64 * KIB));
        if written.insert(extent) {
            write_direct(&lab.primary_device.path, extent * 64 * KIB, 4096, 0x5c).expect("write");
        }
    }
}

/// A link that goes down is detected by the ack/keepalive timeout, a secondary killed with
/// SIGKILL by the closed connection; in both cases writes go on, the secondary is reconnected
/// when it returns, and only the extents it missed are shipped.
#[test]
fn link_down_and_secondary_kill_resync_only_what_was_missed() {
    let mut lab = lab("outage", 1);
    let secondary = lab.start_secondary(0, &[]).expect("secondary");
    lab.start_primary(&["--skip-initial-sync", "--timeout-ms", "2000"]).expect("primary");
    lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let mut rng = Rng::new(0x0u64.wrapping_add(0xdead));
    let mut written = std::collections::BTreeSet::new();
    write_distinct_extents(&lab, &mut rng, &mut written, 50);
    lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));

    // A resync copies the fracture log and the write-intent log: extents written in the last
    // few checkpoint intervals go again. Noted at each outage, for the bound below.
    let intent_extents =
        |lab: &Lab| lab.status().map_or(0, |s| s["intent_log_extents"].as_u64().unwrap_or(0));
    let mut intent_at_outages = intent_extents(&lab);
    // The link goes down: writes go on; the primary notices within its timeout.
    let link = lab.primary_ifs[0].clone();
    lab.primary_ns.run(&["link", "set", &link, "down"]).expect("link down");
    write_distinct_extents(&lab, &mut rng, &mut written, 50);
    let started = Instant::now();
    while lab.status().is_none_or(|s| s["secondaries"][0]["connected"].as_bool() != Some(false)) {
        assert!(started.elapsed() < Duration::from_secs(10), "a dead link was not detected\n{}", lab.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("dead link detected after {:.1} s", started.elapsed().as_secs_f64());
    lab.primary_ns.run(&["link", "set", &link, "up"]).expect("link up");
    lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert_images_equal(&lab);

    // The secondary is killed, writes go on, it comes back.
    std::thread::sleep(Duration::from_millis(300)); // a status refresh after the last resync
    intent_at_outages += intent_extents(&lab);
    lab.processes[secondary].kill();
    write_distinct_extents(&lab, &mut rng, &mut written, 50);
    lab.start_secondary(0, &[]).expect("secondary restarted");
    let status = lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    assert_images_equal(&lab);
    let shipped = peer_u64(&status, 0, "shipped_extents");
    let disconnects = peer_u64(&status, 0, "disconnects");
    eprintln!(
        "{} extents written, {shipped} shipped, {disconnects} disconnects, {intent_at_outages} in the intent log at the outages",
        written.len()
    );
    assert!(disconnects >= 2, "both outages were seen: {status}");
    assert!(shipped >= written.len() as u64, "every written extent shipped");
    // Frames in flight when a link dropped (at most one per pool buffer, 32) and the extents
    // still in the write-intent log at each outage are shipped again; nothing else is.
    assert!(
        shipped <= written.len() as u64 + intent_at_outages + 2 * 32,
        "resync shipped {shipped} extents for {} written ({intent_at_outages} in the intent log at the outages)\n{}",
        written.len(),
        lab.logs()
    );
}

/// Hot extents rewritten all the time while they are read and shipped: the newest data must
/// land last on every secondary (frames of one extent are never reordered).
#[test]
fn hot_extents_rewritten_while_shipping_end_equal() {
    let mut lab = lab("hot", 2);
    lab.start_secondary(0, &[]).expect("secondary 0");
    lab.start_secondary(1, &[]).expect("secondary 1");
    lab.start_primary(&["--skip-initial-sync"]).expect("primary");
    lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    for round in 0..3 {
        fio(
            &lab.primary_device.path,
            &[
                "--rw=randwrite",
                "--bsrange=4k-1m",
                "--iodepth=16",
                "--offset=8m",
                "--size=4m",
                "--runtime=4",
                "--time_based",
                &format!("--randseed={round}"),
            ],
        );
        lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
        assert_images_equal(&lab);
    }
}

/// Writes anywhere on a device whose bitmaps have several words at every level (3 GiB at
/// 4 KiB extents: as many extents as 48 GiB at 64 KiB), across the words of the tracker's
/// bitmaps and of both levels of their summaries, are each shipped once; the ranges written
/// are equal on the secondary, and so are the whole images.
#[test]
fn large_device_ships_writes_anywhere_on_it() {
    const LARGE_BYTES: u64 = 3 << 30;
    const EXTENT_BYTES: u64 = 4 * KIB;
    require_root();
    let mut lab = Lab::new(&replicator_bin(), "large", 1, LARGE_BYTES)
        .expect("setting up namespaces, veths and loop devices");
    lab.start_secondary(0, &[]).expect("secondary");
    lab.start_primary(&["--skip-initial-sync", "--extent-size", "4KiB"]).expect("primary");
    lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    let last = LARGE_BYTES / EXTENT_BYTES - 1;
    // Bitmap words hold 64 extents, summary words 64 words, top words 64 summary words.
    let per_top_word = 64 * 64 * 64;
    let extents = [0, 63, 64, 4095, 4096, per_top_word - 1, per_top_word, 2 * per_top_word + 12_345, last];
    for (i, &extent) in extents.iter().enumerate() {
        write_direct(&lab.primary_device.path, extent * EXTENT_BYTES, 4096, 0x40 + i as u8).expect("write");
    }
    let status = lab.wait_in_sync(Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}\n{}", lab.logs()));
    for &extent in &extents {
        let first = extent.saturating_sub(1);
        let end = (extent + 2).min(last + 1);
        let read = |device: &std::path::Path| {
            read_range_direct(device, first * EXTENT_BYTES, ((end - first) * EXTENT_BYTES) as usize)
                .expect("reading a written range")
        };
        assert!(
            read(&lab.primary_device.path) == read(&lab.secondary_devices[0].path),
            "extents {first}..{end} differ\n{}",
            lab.logs()
        );
    }
    assert_eq!(peer_u64(&status, 0, "shipped_extents"), extents.len() as u64, "{}", lab.logs());
    assert_eq!(peer_u64(&status, 0, "shipped_bytes"), extents.len() as u64 * EXTENT_BYTES);
    assert_images_equal(&lab);
}
