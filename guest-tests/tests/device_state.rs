//! Device state, driven by the project's own vhost-user frontend: what belongs to the device,
//! not to one VMM connection (the write-cache mode a guest chose through CONFIG_WCE, virtio
//! 1.2 §5.2.6, still in force when the VMM reconnects, as for qemu-storage-daemon's block
//! device), and what must follow a renegotiation on the same connection (the request types
//! served).

use ringfence_guest_tests::blk::*;
use ringfence_guest_tests::frontend::*;
use ringfence_guest_tests::rig::*;

/// Offset of `writeback` in `virtio_blk_config`.
const WRITEBACK: u32 = 32;

fn negotiated(rig: &mut Rig) -> Frontend {
    let mut fe = Frontend::connect(&rig.socket).expect("connect");
    Session::negotiate(&mut fe, &SessionCfg::default()).expect("negotiate");
    fe
}

fn writeback_byte(fe: &Frontend) -> u8 {
    let c = fe.get_config(0, 60).expect("GET_CONFIG");
    assert_eq!(c.data.len(), 60, "config space");
    c.data[WRITEBACK as usize]
}

#[test]
fn the_guests_write_cache_choice_survives_a_reconnect() {
    let mut rig = Rig::start(RigOpts::default());
    if !rig.strict() {
        // qemu-storage-daemon keeps it too, but through QMP state this test does not set up.
        rig.finish();
        return;
    }
    let fe = negotiated(&mut rig);
    assert_eq!(
        writeback_byte(&fe),
        1,
        "FLUSH negotiated: writeback by default"
    );
    fe.set_acked(
        code::SET_CONFIG,
        &config_payload(WRITEBACK, 1, 0, &[0]),
        &[],
    )
    .expect("the writeback byte is writable with CONFIG_WCE");
    assert_eq!(writeback_byte(&fe), 0, "writethrough, as the guest chose");
    drop(fe);
    // The VMM reconnects (a QEMU restart of its vhost-user chardev, say): same device.
    let fe = negotiated(&mut rig);
    assert_eq!(
        writeback_byte(&fe),
        0,
        "the guest's writethrough choice was lost across a reconnect"
    );
    fe.set_acked(
        code::SET_CONFIG,
        &config_payload(WRITEBACK, 1, 0, &[1]),
        &[],
    )
    .expect("back to writeback");
    assert_eq!(writeback_byte(&fe), 1);
    drop(fe);
    rig.finish();
}

/// DISCARD and WRITE_ZEROES share the ring's FALLOCATE, so dropping one of them in a new
/// SET_FEATURES changes no ring; the limits the parser enforces must change all the same.
#[test]
fn a_renegotiation_that_drops_discard_stops_discards() {
    let mut rig = Rig::start(RigOpts::default());
    let mut s = rig.session(&SessionCfg::default());
    let seg = range_seg(64, 8, 0);
    // The image range these requests zero (bytes, as the rig's image oracle counts them).
    rig.image_writes.push((64 * 512, 8 * 512));
    let (st, _) = s.io(0, T_DISCARD, 0, &seg, 0).expect("discard");
    assert_eq!(status_name(st), status_name(S_OK), "DISCARD negotiated");
    let without = s.features & !vfeat::BLK_DISCARD;
    s.fe.set_features(without)
        .expect("SET_FEATURES without DISCARD");
    let (st, _) = s.io(0, T_DISCARD, 0, &seg, 0).expect("discard");
    if rig.strict() {
        assert_eq!(
            status_name(st),
            status_name(S_UNSUPP),
            "DISCARD after a SET_FEATURES that dropped it"
        );
    }
    let (st, _) = s.io(0, T_WRITE_ZEROES, 0, &seg, 0).expect("write-zeroes");
    assert_eq!(
        status_name(st),
        status_name(S_OK),
        "WRITE_ZEROES still negotiated"
    );
    rig.keep_session("the renegotiated session", s, &[]);
    rig.finish();
}
