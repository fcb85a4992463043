#!/usr/bin/env python3
"""Write the hand-made seed inputs into fuzz/corpus/<target>/ (the layouts are documented at
the top of each fuzz target). Run from anywhere: python3 fuzz/seeds.py"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

# virtio-blk request types
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13


def u8(v):
    return struct.pack("<B", v)


def u16(v):
    return struct.pack("<H", v)


def u32(v):
    return struct.pack("<I", v)


def u64(v):
    return struct.pack("<Q", v)


# ---------------------------------------------------------------------------------------------
# parse_request
# ---------------------------------------------------------------------------------------------

READ_ONLY, FLUSH, DISCARD, WRITE_ZEROES, HIGH = 1, 2, 4, 8, 16
ALL = FLUSH | DISCARD | WRITE_ZEROES


def desc(region, offset, length, writable):
    """A descriptor relative to a region (offset < 64 KiB, length < 64 KiB)."""
    return u8((0x80 if writable else 0) | region) + u16(offset) + u16(length)


def raw_desc(addr, length, writable):
    return u8((0x80 if writable else 0) | 0x40 | 0x20) + u64(addr) + u32(length)


def header(req_type, sector):
    return u32(req_type) + u32(0) + u64(sector)


def parse_input(flags, regions, descs, memory, capacity=1000, seg_max=4, size_max=4096,
                max_discard_seg=2, max_discard_sectors=100, buf_sel=3):
    """regions: [(gap_pages, pages)] with pages in 1..4; memory: bytes from region 0 on."""
    out = u8(flags) + u8(len(regions) - 1)
    for gap, pages in regions:
        out += u8(gap) + u8(pages - 1)
    out += u64(capacity) + u16(seg_max) + u32(size_max) + u8(max_discard_seg)
    out += u32(max_discard_sectors) + u8(buf_sel) + u8(len(descs))
    out += b"".join(descs)
    return out + memory


def zero_seg(sector, num, flags):
    return u64(sector) + u32(num) + u32(flags)


def parse_request_seeds():
    seeds = {}
    one = [(0, 4)]
    # Linux-style read: header, one data buffer, status byte.
    seeds["read_linux"] = parse_input(
        ALL, one, [desc(0, 0, 16, False), desc(0, 0x1000, 4096, True), desc(0, 0x3000, 1, True)],
        header(T_IN, 8))
    # Write whose header is split across two regions, data glued to the header's tail, and the
    # status byte at the end of a larger writable buffer.
    two = [(0, 1), (2, 2)]  # region 0 at 0, region 1 at 0x3000
    mem = bytearray(0x1000)
    mem[0x100:0x10a] = header(T_OUT, 2)[:10]
    seeds["write_split"] = parse_input(
        ALL, two,
        [desc(0, 0x100, 10, False), desc(1, 0, 6 + 500, False), desc(1, 0x1000, 12, False),
         desc(0, 0x800, 8, True)],
        bytes(mem) + header(T_OUT, 2)[10:])
    # Multi-segment read crossing 1 KiB fixed buffers and a region gap (translation fails for
    # the segment in the gap).
    seeds["read_crossing"] = parse_input(
        ALL, [(0, 2), (1, 2)],
        [desc(0, 0, 16, False), desc(0, 0x0f00, 1024, True), desc(0, 0x1f00, 512, True),
         desc(1, 0x0200, 1024, True), desc(1, 0x1000, 1, True)],
        header(T_IN, 0), buf_sel=1)
    # Flush, GET_ID (long and short buffers).
    seeds["flush"] = parse_input(ALL, one, [desc(0, 0, 16, False), desc(0, 0x2000, 1, True)],
                                 header(T_FLUSH, 0))
    seeds["flush_read_only"] = parse_input(READ_ONLY, one, [desc(0, 0, 16, False),
                                                            desc(0, 0x2000, 1, True)],
                                           header(T_FLUSH, 0))
    seeds["get_id"] = parse_input(ALL, one, [desc(0, 0, 16, False), desc(0, 0x1000, 64, True),
                                             desc(0, 0x2000, 1, True)], header(T_GET_ID, 0))
    seeds["get_id_short"] = parse_input(ALL, one, [desc(0, 0, 16, False), desc(0, 0x1000, 5, True)],
                                        header(T_GET_ID, 0))
    # Write-zeroes with UNMAP and without; discard.
    seeds["write_zeroes"] = parse_input(
        ALL, one, [desc(0, 0, 48, False), desc(0, 0x2000, 1, True)],
        header(T_WRITE_ZEROES, 0) + zero_seg(10, 20, 0) + zero_seg(100, 1, 1))
    seeds["discard"] = parse_input(
        ALL, one, [desc(0, 0, 32, False), desc(0, 0x2000, 1, True)],
        header(T_DISCARD, 0) + zero_seg(990, 10, 0))
    # Read-only disk asked to write; sector past the capacity; sector overflowing.
    seeds["write_read_only"] = parse_input(
        READ_ONLY | FLUSH, one,
        [desc(0, 0, 16, False), desc(0, 0x1000, 512, False), desc(0, 0x2000, 1, True)],
        header(T_OUT, 0))
    seeds["read_past_capacity"] = parse_input(
        ALL, one, [desc(0, 0, 16, False), desc(0, 0x1000, 1024, True), desc(0, 0x2000, 1, True)],
        header(T_IN, 999))
    seeds["read_sector_overflow"] = parse_input(
        ALL, one, [desc(0, 0, 16, False), desc(0, 0x1000, 1024, True), desc(0, 0x2000, 1, True)],
        header(T_IN, 2**64 - 1), capacity=2**64 - 1)
    # Regions at the top of the address space; descriptors near 2^64 and huge lengths.
    seeds["high_wrapping"] = parse_input(
        ALL | HIGH, [(0, 4)],
        [desc(0, 0, 16, False), raw_desc(2**64 - 10, 4096, True),
         raw_desc(2**64 - 4096, 2**32 - 512, True), desc(0, 0x3fff, 1, True)],
        header(T_IN, 0), capacity=2**40, seg_max=16, size_max=2**32 - 1)
    # Readable after writable; header outside guest memory.
    seeds["readable_after_writable"] = parse_input(
        ALL, one, [desc(0, 0, 16, False), desc(0, 0x1000, 512, True), desc(0, 0x2000, 1, False)],
        header(T_IN, 0))
    seeds["header_unmapped"] = parse_input(
        ALL, [(0, 1)], [raw_desc(0x10_0000, 16, False), desc(0, 0x100, 513, True)], b"")
    seeds["empty"] = b"\x00"
    return seeds


# ---------------------------------------------------------------------------------------------
# vhost_messages
# ---------------------------------------------------------------------------------------------

GET_FEATURES, SET_FEATURES, GET_CONFIG, SET_CONFIG, INFLIGHT, SET_MEM_TABLE, \
    GET_VRING_BASE, LAYOUT, SET_LOG_BASE = range(9)
F_LOG_ALL = 26
F_CONFIG_WCE = 11


def device(read_only=False, two_queues=False, qsize_log2=3, pbe=3):
    return u8((1 if read_only else 0) | (2 if two_queues else 0)) + u8(qsize_log2 - 1) + u8(pbe)


def mem_table(regions, high=False, descending=False):
    """regions: [(gap_pages, pages, None | (offset_pages, file_pages))]"""
    out = u8(SET_MEM_TABLE) + u8((1 if high else 0) | (2 if descending else 0)) + u8(len(regions))
    for gap, pages, file in regions:
        out += u8(gap) + u8(pages - 1)
        if file is None:
            out += u8(0)
        else:
            out += u8(1) + u8(file[0]) + u8(file[1])
    return out


def get_config(offset, size):
    return u8(GET_CONFIG) + u32(offset) + u32(size)


def set_config(offset, data):
    return u8(SET_CONFIG) + u32(offset) + u8(len(data)) + bytes(data)


def layout(regions, max_buffer, ranges):
    """regions: [(small, gpa, len, host)]; ranges: [(gpa, len)] (4 are read)."""
    out = u8(LAYOUT) + u8(len(regions))
    for small, gpa, length, host in regions:
        out += u8(1 if small else 0) + u64(gpa) + u64(length) + u64(host)
    out += u64(max_buffer)
    for gpa, length in (ranges + [(0, 0)] * 4)[:4]:
        out += u64(gpa) + u32(length)
    return out


def log_base(sealed, file_pages, size, offset):
    return u8(SET_LOG_BASE) + u8(1 if sealed else 0) + u16(file_pages) + u64(size) + u64(offset)


def vhost_messages_seeds():
    seeds = {}
    # A QEMU-like negotiation: features, ack with WCE, config reads, writeback toggled,
    # memory table, event idx, queue stop.
    seeds["negotiate"] = (
        device() + u8(GET_FEATURES) + u8(SET_FEATURES) + u64(2**64 - 1)
        + get_config(0, 60) + get_config(32, 1) + set_config(32, [0]) + get_config(32, 1)
        + mem_table([(0, 8, None), (4, 2, (1, 8))]) + u8(INFLIGHT) + u8(1 | 2 | (3 << 3))
        + u8(GET_VRING_BASE) + u8(0))
    # Config accesses at and past the edges; writes that must be refused.
    seeds["config_edges"] = (
        device(two_queues=True) + get_config(56, 4) + get_config(56, 8) + get_config(60, 1)
        + get_config(92, 4) + get_config(90, 8) + get_config(96, 1) + get_config(2**32 - 1, 2) + get_config(4, 2**32 - 1) + set_config(32, [1])
        + u8(SET_FEATURES) + u64(1 << F_CONFIG_WCE) + set_config(33, [1]) + set_config(32, [1, 0])
        + set_config(32, [])
        + set_config(32, [7]))
    # Read-only disk: no write features, no WCE.
    seeds["read_only"] = (
        device(read_only=True, qsize_log2=10, pbe=0) + u8(GET_FEATURES) + u8(SET_FEATURES)
        + u64(2**64 - 1) + set_config(32, [0]) + get_config(36, 24)
        + mem_table([(0, 4, None)]))
    # Memory tables: a memfd region past the end of its file (must be refused), at the top of
    # the address space, emptied, then a good one again.
    seeds["mem_tables"] = (
        device(two_queues=True, qsize_log2=1) + mem_table([(0, 8, (2, 4))])
        + mem_table([(3, 2, None), (1, 8, (0, 8))], high=True) + mem_table([])
        + mem_table([(0, 1, (3, 4)), (15, 8, None), (0, 3, (0, 15))]) + u8(GET_VRING_BASE) + u8(7)
        + mem_table([(0, 2, None), (1, 8, None), (4, 1, (1, 4))], descending=True)
        + u8(SET_FEATURES) + u64(0) + u8(SET_FEATURES) + u64(1 << 9))
    # Fixed-buffer layouts: adjacent, overlapping, overflowing, too many buffers.
    seeds["layouts"] = (
        device()
        + layout([(True, 0, 4, 0x7000_0000), (True, 4, 4, 0x9000_0000)], 8192,
                 [(0, 4096 * 8), (4096 * 3, 8192), (4096 * 8, 1)])
        + layout([(True, 0, 4, 0), (True, 3, 2, 0x10000)], 1 << 30, [])
        + layout([(False, 2**64 - 4096, 4096, 0), (False, 0, 4096, 2**64 - 1)], 4096,
                 [(2**64 - 4096, 4096), (2**64 - 1, 2)])
        + layout([(False, 0, 2**40, 0x1000)], 2**20, [(2**39, 2**32 - 1)])
        + layout([(False, 2**63, 2**62, 0), (True, 5, 0, 0)], 1, [(2**63 + 5, 100)]))
    # Inflight regions: too many queues, a good one, an unsealed memfd, the largest queue.
    seeds["inflight"] = (
        device(two_queues=True, qsize_log2=7) + u8(INFLIGHT) + u8(1 | (3 << 1))
        + u8(INFLIGHT) + u8(1 | (2 << 1) | (7 << 3)) + u8(INFLIGHT) + u8(2 << 1)
        + u8(INFLIGHT) + u8(1 | (1 << 1) | (15 << 3)) + u8(INFLIGHT) + u8(1))
    # Dirty logs: a good one with LOG_ALL on and off, an unsealed one, one past its file, one
    # too small for the memory table, one at an unaligned offset.
    seeds["dirty_log"] = (
        device(two_queues=True) + mem_table([(0, 8, None), (4, 2, (1, 8))])
        + log_base(True, 1, 64, 0) + u8(SET_FEATURES) + u64(1 << F_LOG_ALL)
        + log_base(True, 2, 4096, 100) + log_base(False, 1, 64, 0)
        + log_base(True, 1, 4097, 0) + log_base(True, 1, 2**64 - 1, 2)
        + u8(SET_FEATURES) + u64(0) + log_base(True, 3, 1, 4095))
    seeds["empty"] = b"\x00"
    return seeds


def main():
    for target, seeds in (("parse_request", parse_request_seeds()),
                          ("vhost_messages", vhost_messages_seeds())):
        d = os.path.join(HERE, "corpus", target)
        os.makedirs(d, exist_ok=True)
        for name, data in seeds.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        print(f"{target}: {len(seeds)} seeds in {d}")


if __name__ == "__main__":
    main()
