#!/usr/bin/env python3
"""Where a request's time goes, from the kernel's own tracepoints (issue 12).

Runs one blkbench workload per target (native, fio, ringfence, qsd, fio-lb-ringfence...:
blkbench's own targets, one target per run) with tracefs recording io_uring, block, wake-up and write(2)
events, then reads the last stretch of the steady state out of the trace buffer and reports,
per target:

  - the data ring (the io_uring ring with the most submissions: the native client's own ring,
    or the backend's ring) and its IOPS;
  - how many of the client's QD requests are, on average, inside that ring (submitted and not
    yet completed), inside the disk (block_rq_issue .. block_rq_complete), and outside the
    ring: Little's law turns the last into the time per request spent outside the ring, which
    for a vhost-user backend is the time spent in the hand-offs between client and backend;
  - in the ring but not in the disk: submission to block issue, and block completion (the
    IRQ) to the CQE (the completing thread woken and running the task work);
  - wake-ups per I/O of the busiest threads (sched_wakeup);
  - for a vhost-user target, per completion burst: backend's call signal -> client woken ->
    client's next kick -> backend's next submission.

With `queues=N` in the job, the figures are those of the busiest ring and its share of the
depth (QD per queue); a backend that serves every queue from one ring (qemu-storage-daemon)
then holds N times that.

Needs root (tracefs), blkbench (cargo bench --bench blkbench builds it). It is a measurement
script, not a test: it prints figures and asserts nothing.

    python3 benches/trace/handoffs.py --job rw=randread,bs=4k,qd=32 --pattern 1 \
        --targets native,fio,ringfence
    # ringfence with other options: a wrapper script as the binary
    printf '#!/bin/sh\nexec target/release/ringfence "$@" --poll-us 2000\n' >/tmp/rf-p2000
    chmod +x /tmp/rf-p2000
    python3 benches/trace/handoffs.py --targets ringfence --ringfence-bin /tmp/rf-p2000

On this machine's kernel the scheduler's switch-in events from the idle task are mostly not
recorded, so thread CPU time is left to blkbench's /proc figures, and `syscalls:` events record
nothing: write(2) is traced through `raw_syscalls:sys_enter` filtered on its number.
"""

import argparse
import collections
import os
import re
import statistics
import subprocess
import sys
import tempfile

TRACEFS = "/sys/kernel/tracing"
EVENTS = [
    "io_uring/io_uring_submit_req",
    "io_uring/io_uring_complete",
    "block/block_rq_issue",
    "block/block_rq_complete",
    "sched/sched_wakeup",
    "raw_syscalls/sys_enter",
]
WRITE_NR = 1  # x86_64
LINE = re.compile(r"^\s*(.*?)-(\d+)\s+\[(\d+)\]\s+\S+\s+([\d.]+):\s+(\w+):\s?(.*)$")


def tracefs(path, value=None):
    p = os.path.join(TRACEFS, path)
    if value is None:
        with open(p) as f:
            return f.read()
    with open(p, "w") as f:
        f.write(value)


def setup_tracing(buffer_kb):
    tracefs("tracing_on", "0")
    tracefs("set_event", "")
    tracefs("trace", "")
    tracefs("buffer_size_kb", str(buffer_kb))
    tracefs("trace_clock", "mono")
    # write(2) only: the backend's call signals and the client's kicks.
    tracefs("events/raw_syscalls/sys_enter/filter", f"id == {WRITE_NR}")
    for e in EVENTS:
        tracefs(f"events/{e}/enable", "1")


def stop_tracing():
    tracefs("tracing_on", "0")
    tracefs("set_event", "")
    tracefs("events/raw_syscalls/sys_enter/filter", "0")


def parse(text):
    """Events as (ts_us, cpu, tid, comm, name, fields)."""
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = LINE.match(line)
        if not m:
            continue
        comm, tid, cpu, ts, name, rest = m.groups()
        out.append((float(ts) * 1e6, int(cpu), int(tid), comm, name, rest))
    return out


def fields(rest):
    """`ring 0x.., req 0x.., user_data 0x..` (io_uring events) as a dict."""
    out = {}
    for part in rest.split(", "):
        k, _, v = part.strip().partition(" ")
        out[k] = v
    return out


BURST_GAP_US = 3


def burst(times):
    """The mean size of the burst a request belongs to (events closer than BURST_GAP_US)."""
    times = sorted(times)
    sizes, n = [], 1
    for a, b in zip(times, times[1:]):
        if b - a < BURST_GAP_US:
            n += 1
        else:
            sizes.append(n)
            n = 1
    sizes.append(n)
    return sum(x * x for x in sizes) / sum(sizes)


def analyse(events, qd, label):
    if not events:
        print(f"{label}: no events traced")
        return
    # The trace buffer is per CPU and overwrites its oldest events: start where every CPU has
    # events. The steady state is the stretch of 10 ms buckets in which the data ring (the
    # ring with the most submissions) completes at least half its usual rate; 20 ms are left
    # off each end.
    first_per_cpu = {}
    for ev in events:
        first_per_cpu.setdefault(ev[1], ev[0])
    start = max(first_per_cpu.values())

    submits = [ev for ev in events if ev[4] == "io_uring_submit_req"]
    per_ring = collections.Counter(fields(ev[5]).get("ring") for ev in submits)
    if not per_ring:
        print(f"{label}: no io_uring submissions traced")
        return
    ring = per_ring.most_common(1)[0][0]
    ring_subs = [ev for ev in submits if fields(ev[5]).get("ring") == ring]
    buckets = collections.Counter(
        int(ev[0] // 10000)
        for ev in events
        if ev[4] == "io_uring_complete" and ev[0] >= start and fields(ev[5]).get("ring") == ring
    )
    if not buckets:
        print(f"{label}: no completions on the data ring")
        return
    counts = sorted(buckets.values())
    threshold = counts[len(counts) * 9 // 10] / 2
    steady = [b for b, n in buckets.items() if n >= threshold]
    start = max(start, min(steady) * 10000 + 20000)
    end = (max(steady) + 1) * 10000 - 20000
    span = end - start
    if span <= 100000:
        print(f"{label}: only {span / 1000:.1f} ms of steady trace; give a larger --buffer-kb")
        return
    win = [ev for ev in events if start <= ev[0] <= end]
    submitters = collections.Counter(ev[2] for ev in ring_subs if start <= ev[0] <= end)
    comm_of = {}
    for ev in events:
        comm_of.setdefault(ev[2], ev[3])
    ring_tids = set(submitters)

    # Ring occupancy and residence, matching requests by their kernel pointer.
    sub_at = {}
    residence = []
    occ_integral = 0.0
    completes = 0
    for ev in events:
        if ev[4] not in ("io_uring_submit_req", "io_uring_complete"):
            continue
        f = fields(ev[5])
        if f.get("ring") != ring:
            continue
        req, ts = f.get("req"), ev[0]
        if ev[4] == "io_uring_submit_req":
            sub_at[req] = ts
        else:
            s = sub_at.pop(req, None)
            if start <= ts <= end:
                completes += 1
                occ_integral += ts - max(s if s is not None else start, start)
                if s is not None and s >= start:
                    residence.append(ts - s)
            elif ts > end and s is not None and s <= end:
                occ_integral += end - max(s, start)
    for s in sub_at.values():
        if s <= end:
            occ_integral += end - max(s, start)
    iops = completes / span * 1e6
    ring_occ = occ_integral / span

    # Disk occupancy: block requests issued by the ring's submitters (or, issued from a
    # kworker, by anyone), matched by device and sector.
    issued = {}
    disk_integral = 0.0
    disk_res = []
    issue_ts, complete_ts = [], []
    for ev in events:
        if ev[4] == "block_rq_issue":
            m = re.match(r"(\d+,\d+) (\S+) \S+ \(.*?\) (\d+) \+ (\d+)", ev[5])
            if m and (ev[2] in ring_tids or ev[3].startswith("kworker")):
                issued[(m.group(1), m.group(3))] = ev[0]
                if start <= ev[0] <= end:
                    issue_ts.append(ev[0])
        elif ev[4] == "block_rq_complete":
            m = re.match(r"(\d+,\d+) (\S+) \(.*?\) (\d+) \+ (\d+)", ev[5])
            if not m:
                continue
            s = issued.pop((m.group(1), m.group(3)), None)
            if s is None or not (start <= ev[0] <= end):
                continue
            disk_integral += ev[0] - max(s, start)
            complete_ts.append(ev[0])
            if s >= start:
                disk_res.append(ev[0] - s)
    disk_occ = disk_integral / span

    # Wake-ups per I/O. (Thread CPU time is left to blkbench's /proc figures: on this
    # machine's kernel, sched_switch away from the idle task is mostly not traced.)
    wakeups = collections.Counter()
    for ev in win:
        if ev[4] == "sched_wakeup":
            m = re.search(r"pid=(\d+)", ev[5])
            if m:
                wakeups[int(m.group(1))] += 1
    ios = completes

    print(f"\n=== {label} ===")
    print(
        f"window {span / 1000:.0f} ms, data ring {ring} submitted by "
        + ", ".join(f"{comm_of.get(t, '?')}/{t}" for t in ring_tids)
    )
    print(f"IOPS {iops / 1000:.1f}k; Little: {qd} requests / IOPS = {qd / iops * 1e6:.0f} µs each")
    out_us = (qd - ring_occ) / iops * 1e6
    print(
        f"in the ring (submitted, not completed): {ring_occ:.1f} of {qd} on average"
        f" -> outside the ring {qd - ring_occ:.1f} = {out_us:.0f} µs per request"
    )
    if issue_ts and complete_ts:
        print(
            f"disk requests issued together (within {BURST_GAP_US} µs): {burst(issue_ts):.1f},"
            f" completed together: {burst(complete_ts):.1f} (per request)"
        )
    if residence:
        print(
            f"ring residence per request: mean {statistics.mean(residence):.0f} µs,"
            f" p50 {statistics.median(residence):.0f} µs"
        )
    if disk_res:
        print(
            f"in the disk (block issue..complete): {disk_occ:.1f} on average;"
            f" residence mean {statistics.mean(disk_res):.0f} µs"
        )
        print(
            f"in the ring, not in the disk: {ring_occ - disk_occ:.1f} on average"
            f" = {(ring_occ - disk_occ) / iops * 1e6:.0f} µs per request"
            " (submission to block issue; IRQ to CQE posted)"
        )
    print("wake-ups per I/O: " + ", ".join(
        f"{comm_of.get(t, '?')}/{t} {n / max(ios, 1):.3f}" for t, n in wakeups.most_common(4)))

    # vhost-user hand-offs: the backend thread signals the call eventfd (write), the client
    # wakes, runs, kicks (write), the backend submits again.
    backend_tids = ring_tids
    backend_tgid_comms = {comm_of.get(t) for t in backend_tids}
    writes = collections.defaultdict(list)
    for ev in win:
        if ev[4] == "sys_enter" and ev[5].startswith(f"NR {WRITE_NR} "):
            writes[ev[2]].append(ev[0])
    client_candidates = [
        (len(v), t)
        for t, v in writes.items()
        if t not in backend_tids and comm_of.get(t) not in backend_tgid_comms
    ]
    backend_writes = sorted(ts for t in backend_tids for ts in writes.get(t, []))
    if not backend_writes or not client_candidates:
        return
    client = max(client_candidates)[1]
    wake_times = sorted(ev[0] for ev in win if ev[4] == "sched_wakeup" and f"pid={client} " in ev[5] + " ")
    kick_times = sorted(writes[client])
    sub_times = sorted(ev[0] for ev in ring_subs if start <= ev[0] <= end)
    import bisect

    def after(xs, t):
        i = bisect.bisect_left(xs, t)
        return xs[i] if i < len(xs) else None

    chains = []
    for i, s in enumerate(backend_writes):
        nxt = backend_writes[i + 1] if i + 1 < len(backend_writes) else end
        w = after(wake_times, s)
        if w is None or w > nxt:
            continue
        k = after(kick_times, w)
        b = after(sub_times, k) if k is not None else None
        if None in (k, b):
            continue
        chains.append((w - s, k - w, b - k))
    print(
        f"client thread {comm_of.get(client, '?')}/{client}: "
        f"{len(backend_writes) / max(ios, 1):.3f} backend signals per I/O, "
        f"{len(chains)} signal->wake chains"
    )
    if chains:
        names = ["signal->client woken", "woken->next kick", "kick->backend submits"]
        for j, n in enumerate(names):
            xs = sorted(c[j] for c in chains)
            print(f"  {n:>24}: p50 {xs[len(xs) // 2]:7.1f} µs  mean {statistics.mean(xs):7.1f} µs")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--job", default="rw=randread,bs=4k,qd=32")
    ap.add_argument("--pattern", default="1", help="blkbench client pattern (1, N, round)")
    ap.add_argument("--targets", default="native,fio,ringfence")
    ap.add_argument("--duration", default="2", help="measured seconds per run")
    ap.add_argument("--buffer-kb", type=int, default=65536, help="trace buffer per CPU")
    ap.add_argument("--ringfence-bin", help="ringfence binary (blkbench's default otherwise)")
    ap.add_argument("--keep", help="directory to keep the raw traces in")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("handoffs.py: tracefs needs root")
    qd = int(re.search(r"qd=(\d+)", a.job).group(1)) if "qd=" in a.job else 1
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.exists(os.path.join(TRACEFS, "events")):
        subprocess.run(["mount", "-t", "tracefs", "nodev", TRACEFS], check=True)
    # The trace buffer's size before this run, given back at the end (it is kernel memory).
    old_buffer_kb = tracefs("buffer_size_kb").split()[0]
    try:
        run_targets(a, qd, repo)
    finally:
        tracefs("buffer_size_kb", old_buffer_kb)


def run_targets(a, qd, repo):
    for target in a.targets.split(","):
        cmd = [
            "cargo", "bench", "-q", "--bench", "blkbench", "--",
            "--targets", target, "--fio", "on" if target == "fio" else "off",
            "--fio-libblkio", "on" if target.startswith("fio-lb-") else "off",
            "--job", f"{a.job},batch={a.pattern}" if "batch=" not in a.job else a.job,
            "--rounds", "1", "--duration", a.duration, "--qd-scaling", "none",
            "--queue-scaling", "none", "--no-readme",
        ]
        if a.ringfence_bin:
            cmd += ["--ringfence-bin", a.ringfence_bin]
        with tempfile.TemporaryDirectory() as tmp:
            cmd += ["--results-dir", tmp]
            setup_tracing(a.buffer_kb)
            tracefs("tracing_on", "1")
            try:
                r = subprocess.run(cmd, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            finally:
                stop_tracing()
            if r.returncode != 0:
                print(r.stdout[-3000:])
                sys.exit(f"blkbench failed for {target}")
            text = tracefs("trace")
            tracefs("trace", "")
            if a.keep:
                os.makedirs(a.keep, exist_ok=True)
                with open(os.path.join(a.keep, f"{target}.trace"), "w") as f:
                    f.write(text)
            line = [l for l in r.stdout.splitlines() if l.startswith("| ") and f"| {target} |" in l]
            analyse(parse(text), qd, f"{target} ({a.job}, pattern {a.pattern})")
            if line:
                print("blkbench: " + line[0])


if __name__ == "__main__":
    main()
