//! The hostile driver, descriptor and virtqueue level (issue 4).

use ringfence_guest_tests::rig::*;

#[test]
fn honest_write_read_round_trip() {
    let mut rig = Rig::start(RigOpts::default());
    let mut s = rig.session(&SessionCfg::default());
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 13) as u8).collect();
    s.write(0, 4096, &data).unwrap();
    assert_eq!(s.read(0, 4096, 8192).unwrap(), data);
    rig.image_writes.push((4096, 8192));
    drop(s);
    rig.finish();
}
