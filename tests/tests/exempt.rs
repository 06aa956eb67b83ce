//! The NBD export ships its own writes, so the tracker must not hand them to the engine a
//! second time: the writes of the exempt process are marked in the intent log (crash safety)
//! and their completions are filtered out, while another process's write to the same extent is
//! still reported.

use bitvec::prelude::*;
use replicator_tests::*;

fn drain_except(recorder: &mut Recorder, exempt: &BitVec<u64, Lsb0>) -> Vec<u64> {
    recorder.tracker().drain_completed_except(exempt).flatten().collect()
}

#[test]
fn exempt_writes_are_logged_but_not_reported() {
    require_root();
    let device = LoopDevice::create("exempt", 64 * MIB).expect("creating a loop device");
    let mut recorder = Recorder::attach(&device.path, 64 * KIB, "exempt");
    recorder.reset();
    let extents = recorder.geometry().extent_count() as usize;
    let mut exempt = bitvec![u64, Lsb0; 0; extents];
    recorder.tracker().exempt_writes_of(std::process::id());

    // Our own write: in the intent log, not reported.
    exempt.set(5, true);
    write_direct(&device.path, 5 * 64 * KIB, 4096, 0xa5).expect("O_DIRECT write");
    assert_eq!(drain_except(&mut recorder, &exempt), Vec::<u64>::new(), "an exempt write was reported");
    let mut intent = BitVec::new();
    recorder.tracker().intent_into(&mut intent);
    assert!(intent[5], "an exempt write must still be in the intent log");

    // Another process writes the same extent: reported, even though the extent is exempt.
    let dev = device.path.to_str().expect("utf-8 path");
    run_command(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={dev}"),
            "bs=4096",
            "count=1",
            "seek=80",
            "oflag=direct",
            "status=none",
        ],
    )
    .expect("dd from a child process");
    assert_eq!(drain_except(&mut recorder, &exempt), vec![5], "another process's write was filtered");

    // Our own write outside the exempt mask is reported (the mask says what we ship ourselves).
    write_direct(&device.path, 9 * 64 * KIB, 4096, 0x5a).expect("O_DIRECT write");
    assert_eq!(drain_except(&mut recorder, &exempt), vec![9]);

    // Exemption off: our writes are ordinary writes again.
    recorder.tracker().exempt_writes_of(0);
    exempt.fill(false);
    write_direct(&device.path, 5 * 64 * KIB, 4096, 0x11).expect("O_DIRECT write");
    assert_eq!(drain_except(&mut recorder, &exempt), vec![5]);
    // Nothing waits for a completion: the exempt writes left no queued marks behind.
    assert!(!recorder.tracker().awaiting_completion());
}
