//! Write a pattern through a vhost-user-blk socket and read it back, with the `blkio` client.
//! Usage: cargo run --example smoke -- SOCKET
use std::mem::MaybeUninit;
use std::time::Duration;

use blkio::{Blkio, Completion, ReqFlags};

fn main() {
    let sock = std::env::args().nth(1).expect("usage: smoke SOCKET");
    let mut b = Blkio::new("virtio-blk-vhost-user").expect("new");
    b.set_str("path", &sock).expect("path");
    b.connect().expect("connect");
    b.set_i32("num-queues", 1).expect("queues");
    let mut out = b.start().expect("start");
    let cap = b.get_u64("capacity").expect("capacity");
    println!("capacity {cap}");
    let region = b.alloc_mem_region(1 << 20).expect("alloc");
    b.map_mem_region(&region).expect("map");
    let q = &mut out.queues[0];
    let buf = region.addr as *mut u8;
    // SAFETY: region is 1 MiB we own.
    unsafe {
        for i in 0..65536 {
            *buf.add(i) = (i % 251) as u8;
        }
    }
    let mut c: [MaybeUninit<Completion>; 4] = std::array::from_fn(|_| MaybeUninit::uninit());
    q.write(4096, buf, 65536, 1, ReqFlags::empty());
    let n = q
        .do_io(&mut c, 1, Some(&mut Duration::from_secs(5)), None)
        .expect("do_io");
    // SAFETY: do_io returned n >= 1, so it initialised the first completion.
    let r = unsafe { c[0].assume_init_read() };
    println!("write: n={n} ret={}", r.ret);
    // SAFETY: 65536 is inside the 1 MiB region.
    let rb = unsafe { buf.add(65536) };
    q.read(4096, rb, 65536, 2, ReqFlags::empty());
    let n = q
        .do_io(&mut c, 1, Some(&mut Duration::from_secs(5)), None)
        .expect("do_io");
    // SAFETY: do_io returned n >= 1, so it initialised the first completion.
    let r = unsafe { c[0].assume_init_read() };
    println!("read: n={n} ret={}", r.ret);
    let same =
        unsafe { std::slice::from_raw_parts(buf, 65536) == std::slice::from_raw_parts(rb, 65536) };
    println!("match: {same}");
    q.flush(3, ReqFlags::empty());
    let n = q
        .do_io(&mut c, 1, Some(&mut Duration::from_secs(5)), None)
        .expect("do_io");
    // SAFETY: do_io returned n >= 1, so it initialised the first completion.
    let r = unsafe { c[0].assume_init_read() };
    println!("flush: n={n} ret={}", r.ret);
    q.write_zeroes(4096, 4096, 4, ReqFlags::empty());
    let n = q
        .do_io(&mut c, 1, Some(&mut Duration::from_secs(5)), None)
        .expect("do_io");
    // SAFETY: do_io returned n >= 1, so it initialised the first completion.
    let r = unsafe { c[0].assume_init_read() };
    println!("wz: n={n} ret={}", r.ret);
    q.read(1 << 40, rb, 4096, 5, ReqFlags::empty());
    let n = q
        .do_io(&mut c, 1, Some(&mut Duration::from_secs(5)), None)
        .expect("do_io");
    // SAFETY: do_io returned n >= 1, so it initialised the first completion.
    let r = unsafe { c[0].assume_init_read() };
    println!("read past end: n={n} ret={}", r.ret);
}
