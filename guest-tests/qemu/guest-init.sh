#!/bin/sh
# /init of the test guest (busybox ash, PID 1). It loads the virtio modules, runs the checks of
# one scenario against /dev/vda and reports on the console, one line per check:
#   RINGFENCE-CHECK <name> PASS|FAIL|INFO <detail>
# then `RINGFENCE-DONE failed=<0|1>`, and powers the machine off.
#
# Parameters come from the kernel command line (rf_<name>=<value>):
#   rf_scenario  probe | identity | integrity | discard | readonly | multiqueue | hostwrite |
#                reboot1 | reboot2 | resize | crashload
#   rf_size rf_lbs rf_nq rf_ro rf_serial   what the disk must look like
#   rf_seed      makes every run's data different (stale data from an earlier run cannot pass)
#   rf_off rf_len                          a "known offset" the host seeded or will check
#   rf_zoff rf_zlen                        a range the host will check for zeroes (hostwrite)
#   rf_fio_mb    MiB each fio job writes and verifies
#   rf_newsize   resize: the size the host grows the disk to once the guest says
#                `RINGFENCE-RESIZE-READY` on the console
#   crashload:   the host kills and restarts the backend while fio runs (rf_nq jobs of
#                rf_fio_mb MiB each, one per CPU and so per queue, beside rf_nq random readers
#                of iodepth rf_reader_depth), from when the guest says
#                `RINGFENCE-CRASHLOAD-STARTED` until it says `RINGFENCE-CRASHLOAD-FIO-DONE`
#   migrate:     the host migrates the VM while fio runs (rounds of rf_nq jobs of rf_fio_mb MiB
#                each, random writes 4k-128k verified with crc32c, until the host's word) and
#                /usr/bin/holdbuf holds an O_DIRECT read of [rf_off, rf_off+rf_len) (seeded by
#                the host with `pattern MIG:rf_seed`) in its memory; the host talks to holdbuf
#                through the second serial port (/dev/ttyS1), see migrate() below;
#                rf_sweep_mb: MiB holdbuf dirties until its read has landed (holds the
#                migration back), rf_fio=0: no fio (an idle guest)

PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
cd /tmp || exit 1

FAILED=0
MiB=1048576
# util-linux's blkdiscard (it has -z); a bare `blkdiscard` would run busybox's applet.
BLKDISCARD=/usr/sbin/blkdiscard

check() { # name PASS|FAIL|INFO detail...
    name=$1
    status=$2
    shift 2
    echo "RINGFENCE-CHECK $name $status $*"
    if [ "$status" = FAIL ]; then FAILED=1; fi
}

finish() {
    sync
    if [ "$FAILED" != 0 ]; then
        echo "--- guest kernel log (tail) ---"
        dmesg | tail -n 40
        echo "--- end of guest kernel log ---"
    fi
    echo "RINGFENCE-DONE failed=$FAILED"
    poweroff -f
    # If poweroff fails, exiting PID 1 panics the kernel; panic=-1 and QEMU's -no-reboot end
    # the run.
    exit 1
}

read -r cmdline </proc/cmdline
for kv in $cmdline; do
    case "$kv" in
    rf_*=*)
        k=${kv%%=*}
        v=${kv#*=}
        case "$k$v" in
        *[!A-Za-z0-9_.,:+-]*)
            check cmdline FAIL "refusing odd parameter '$kv'"
            finish
            ;;
        esac
        eval "$k=\$v"
        ;;
    esac
done
: "${rf_scenario:=identity}" "${rf_size:=0}" "${rf_lbs:=512}" "${rf_nq:=1}" "${rf_ro:=0}"
: "${rf_serial:=}" "${rf_seed:=0}" "${rf_off:=0}" "${rf_len:=0}" "${rf_zoff:=0}" "${rf_zlen:=0}"
: "${rf_fio_mb:=16}" "${rf_newsize:=0}" "${rf_reader_depth:=2}" "${rf_ctl:=/dev/ttyS1}"
: "${rf_sweep_mb:=0}" "${rf_fio:=1}"

echo "RINGFENCE-BOOTED kernel=$(uname -r) scenario=$rf_scenario cpus=$(nproc)"

if [ "$rf_scenario" = probe ]; then
    finish
fi

# --- helpers ---------------------------------------------------------------------------------

pattern() { # tag length: the tag and a newline, repeated, cut at length bytes
    yes "$1" | head -c "$2"
}

dwrite() { # file offset: O_DIRECT write of the whole file at offset; errors in /tmp/err
    dd if="$1" of=/dev/vda bs="$(stat -c %s "$1")" count=1 seek="$2" \
        oflag=seek_bytes,direct conv=fsync 2>/tmp/err
}

dread() { # offset length outfile: O_DIRECT read
    dd if=/dev/vda of="$3" bs="$2" count=1 skip="$1" iflag=skip_bytes,direct,fullblock \
        2>/tmp/err
}

drop_caches() {
    sync
    sync /dev/vda
    echo 3 >/proc/sys/vm/drop_caches
}

err() { tr '\n' ' ' </tmp/err | cut -c1-200; }

# Read [off, off+len) and compare it with the file of expected bytes. Prints the cmp output on
# mismatch (into /tmp/err).
matches() { # offset length expected_file
    rm -f /tmp/got
    dread "$1" "$2" /tmp/got || return 1
    cmp "$3" /tmp/got >/tmp/err 2>&1
}

# --- the disk ----------------------------------------------------------------------------------

while read -r m; do
    [ -n "$m" ] || continue
    if ! insmod "/usr/lib/modules/ringfence/$m.ko" 2>/tmp/err; then
        check modules FAIL "insmod $m: $(err)"
        finish
    fi
done </etc/ringfence-modules

# virtio_blk probes synchronously while insmod runs; the wait only tolerates a slow devtmpfs.
n=0
while [ ! -b /dev/vda ] && [ "$n" -lt 50 ]; do
    sleep 0.1
    n=$((n + 1))
done
if [ ! -b /dev/vda ]; then
    check device FAIL "no /dev/vda; virtio devices: $(echo /sys/bus/virtio/devices/*)"
    finish
fi
check device PASS "/dev/vda"

identity() {
    size=$(blockdev --getsize64 /dev/vda 2>&1)
    sectors=$(cat /sys/block/vda/size)
    if [ "$size" = "$rf_size" ] && [ "$((sectors * 512))" = "$rf_size" ]; then
        check size PASS "$size bytes"
    else
        check size FAIL "got $size bytes ($sectors sectors), want $rf_size"
    fi

    lbs=$(cat /sys/block/vda/queue/logical_block_size)
    if [ "$lbs" = "$rf_lbs" ]; then
        check logical_block_size PASS "$lbs"
    else
        check logical_block_size FAIL "got $lbs, want $rf_lbs"
    fi

    nq=$(find /sys/block/vda/mq -mindepth 1 -maxdepth 1 | wc -l)
    if [ "$nq" = "$rf_nq" ]; then
        check queues PASS "$nq hardware queues"
    else
        check queues FAIL "got $nq hardware queues, want $rf_nq"
    fi

    ro=$(cat /sys/block/vda/ro)
    if [ "$ro" = "$rf_ro" ]; then
        check read_only_flag PASS "ro=$ro"
    else
        check read_only_flag FAIL "got ro=$ro, want $rf_ro"
    fi

    if serial=$(cat /sys/block/vda/serial 2>/tmp/err); then
        if [ "$serial" = "$rf_serial" ]; then
            check serial PASS "'$serial'"
        else
            check serial FAIL "got '$serial', want '$rf_serial'"
        fi
    else
        check serial FAIL "reading /sys/block/vda/serial: $(err)"
    fi
    echo "info: physical_block_size=$(cat /sys/block/vda/queue/physical_block_size)" \
        "write_cache=$(cat /sys/block/vda/queue/write_cache)" \
        "discard_max_bytes=$(cat /sys/block/vda/queue/discard_max_bytes)" \
        "write_zeroes_max_bytes=$(cat /sys/block/vda/queue/write_zeroes_max_bytes)"
}

# --- scenarios ---------------------------------------------------------------------------------

# Non-overlapping (offset:length) ranges in [0, 64 MiB) and at the very end of the disk: sector
# but not always page aligned, from one sector to 8 KiB, plus one 2 MiB + 512 B request at
# 120 MiB (above the 1 MiB segment limit, so the guest splits it). fio uses [64 MiB, 120 MiB).
pattern_ranges() {
    i=0
    while [ "$i" -lt 32 ]; do
        echo "$((i * 2 * MiB + (i % 8) * 512 + (i % 3) * 4096)):$((512 * (1 + (i * 7) % 16)))"
        i=$((i + 1))
    done
    echo "$((120 * MiB)):$((2 * MiB + 512))"
    echo "$((rf_size - 4096)):4096"
}

write_patterns() {
    i=0
    bad=""
    for r in $(pattern_ranges); do
        pattern "RF:$rf_seed:$i" "${r#*:}" >/tmp/pat$i
        dwrite /tmp/pat$i "${r%:*}" || bad="$bad $r($(err))"
        i=$((i + 1))
    done
    if [ -z "$bad" ]; then
        check pattern_write PASS "$i ranges written with O_DIRECT"
    else
        check pattern_write FAIL "failed:$bad"
    fi
}

verify_patterns() { # check-name
    i=0
    bad=""
    for r in $(pattern_ranges); do
        matches "${r%:*}" "${r#*:}" /tmp/pat$i || bad="$bad $r($(err))"
        i=$((i + 1))
    done
    if [ -z "$bad" ]; then
        check "$1" PASS "$i ranges read back with O_DIRECT after sync and dropping caches"
    else
        check "$1" FAIL "mismatch:$bad"
    fi
}

run_fio() { # check-name fio-args...
    name=$1
    shift
    if fio --output=/tmp/fio.out --filename=/dev/vda --direct=1 --ioengine=libaio \
        --verify=crc32c --verify_fatal=1 --do_verify=1 --verify_state_save=0 \
        --randseed="$rf_seed" "$@" >/tmp/err 2>&1 &&
        ! grep -qiE 'verify: bad|crc32c: verify failed|err= *[1-9]' /tmp/fio.out; then
        check "$name" PASS "$(grep -E '^ +(write|read):' /tmp/fio.out | tr -s ' ' | tr '\n' ';')"
    else
        check "$name" FAIL "$(err) $(grep -iE 'verify|err' /tmp/fio.out | head -n 5 | tr '\n' ';')"
        cat /tmp/fio.out
    fi
}

integrity() {
    if [ "$rf_fio_mb" -gt 56 ] || [ "$rf_size" -lt $((128 * MiB)) ]; then
        check integrity_layout FAIL "needs rf_fio_mb <= 56 and a disk of at least 128 MiB"
        return
    fi
    write_patterns
    drop_caches
    verify_patterns pattern_readback
    run_fio fio_randwrite_verify --name=randwrite-verify --rw=randwrite --bsrange=4k-128k \
        --iodepth=16 --offset=64M --size="${rf_fio_mb}M"
    drop_caches
    verify_patterns pattern_after_fio
}

discard() {
    max=$(cat /sys/block/vda/queue/discard_max_bytes)
    wz=$(cat /sys/block/vda/queue/write_zeroes_max_bytes)
    if [ "$max" -gt 0 ] && [ "$wz" -gt 0 ]; then
        check discard_limits PASS "discard_max_bytes=$max write_zeroes_max_bytes=$wz"
    else
        check discard_limits FAIL "discard_max_bytes=$max write_zeroes_max_bytes=$wz"
    fi

    base=$((16 * MiB))
    pattern "DZ:$rf_seed" $((8 * MiB)) >/tmp/dz
    dwrite /tmp/dz "$base" || check discard_setup FAIL "writing the pattern: $(err)"
    drop_caches

    # Write zeroes over [16M, 20M): it must read back as zeroes, whatever the device does.
    head -c $((4 * MiB)) /dev/zero >/tmp/zero4m
    if ! "$BLKDISCARD" -z -o "$base" -l $((4 * MiB)) /dev/vda 2>/tmp/err; then
        check write_zeroes_reads_zero FAIL "blkdiscard -z: $(err)"
    else
        drop_caches
        if matches "$base" $((4 * MiB)) /tmp/zero4m; then
            check write_zeroes_reads_zero PASS "4 MiB at $base"
        else
            check write_zeroes_reads_zero FAIL "4 MiB at $base: $(err)"
        fi
    fi

    # Write zeroes over 5 sectors starting 3 sectors into a page: neighbours keep their data.
    off=$((base + 4 * MiB))
    dd if=/tmp/dz of=/tmp/dz_at bs=8192 skip=$((4 * MiB / 8192)) count=1 2>/dev/null
    {
        head -c 1536 /tmp/dz_at
        head -c 2560 /dev/zero
        tail -c 4096 /tmp/dz_at
    } >/tmp/exp_sub4k
    if ! "$BLKDISCARD" -z -o $((off + 1536)) -l 2560 /dev/vda 2>/tmp/err; then
        check write_zeroes_sub_4k FAIL "blkdiscard -z of 5 sectors: $(err)"
    else
        drop_caches
        if matches "$off" 8192 /tmp/exp_sub4k; then
            check write_zeroes_sub_4k PASS "5 sectors at $((off + 1536)), neighbours intact"
        else
            check write_zeroes_sub_4k FAIL "8 KiB at $off: $(err)"
        fi
    fi

    # Discard [22M, 23M): accepted; virtio-blk does not promise zeroes after a plain discard,
    # so what it reads back is only reported. [21M, 22M) and [23M, 24M) must keep their data.
    doff=$((base + 6 * MiB))
    if "$BLKDISCARD" -o "$doff" -l "$MiB" /dev/vda 2>/tmp/err; then
        drop_caches
        head -c "$MiB" /dev/zero >/tmp/zero1m
        if matches "$doff" "$MiB" /tmp/zero1m; then z="reads back as zeroes"; else z="keeps data"; fi
        check discard_accepted PASS "1 MiB at $doff ($z)"
    else
        check discard_accepted FAIL "blkdiscard: $(err)"
    fi
    dd if=/tmp/dz of=/tmp/dz_before bs="$MiB" skip=5 count=1 2>/dev/null
    dd if=/tmp/dz of=/tmp/dz_after bs="$MiB" skip=7 count=1 2>/dev/null
    if matches $((base + 5 * MiB)) "$MiB" /tmp/dz_before &&
        matches $((base + 7 * MiB)) "$MiB" /tmp/dz_after; then
        check discard_bounded PASS "data on both sides of the discarded range intact"
    else
        check discard_bounded FAIL "data next to the discarded range changed: $(err)"
    fi
}

readonly_export() {
    pattern "RO:$rf_seed" "$rf_len" >/tmp/ro
    if matches "$rf_off" "$rf_len" /tmp/ro; then
        check ro_read_host_pattern PASS "$rf_len bytes at $rf_off"
    else
        check ro_read_host_pattern FAIL "$rf_len bytes at $rf_off: $(err)"
    fi
    pattern "NO:$rf_seed" 4096 >/tmp/no
    if dwrite /tmp/no "$rf_off"; then
        check ro_write_refused FAIL "an O_DIRECT write succeeded"
    else
        check ro_write_refused PASS "$(err)"
    fi
    if "$BLKDISCARD" -o 0 -l "$MiB" /dev/vda 2>/tmp/err; then
        check ro_discard_refused FAIL "blkdiscard succeeded"
    else
        check ro_discard_refused PASS "$(err)"
    fi
    if "$BLKDISCARD" -z -o 0 -l "$MiB" /dev/vda 2>/tmp/err; then
        check ro_zeroout_refused FAIL "blkdiscard -z succeeded"
    else
        check ro_zeroout_refused PASS "$(err)"
    fi
    drop_caches
    if matches "$rf_off" "$rf_len" /tmp/ro; then
        check ro_data_unchanged PASS "host pattern still there"
    else
        check ro_data_unchanged FAIL "$(err)"
    fi
}

queue_irqs() { # queue index: interrupts the device raised for that virtqueue's completions
    awk -v q="req.$1" '$NF ~ ("-" q "$") { for (i = 2; i < NF; i++) if ($i ~ /^[0-9]+$/) s += $i; n++ }
        END { if (n) print s; else print "missing" }' /proc/interrupts
}

multiqueue() {
    echo "info: cpu lists: $(cat /sys/block/vda/mq/*/cpu_list | tr '\n' ' ')"
    q0=$(queue_irqs 0)
    q1=$(queue_irqs 1)
    run_fio mq_parallel_fio_verify --name=mq --rw=randwrite --bs=4k --iodepth=8 --numjobs=2 \
        --cpus_allowed=0-1 --cpus_allowed_policy=split --offset=64M --offset_increment=16M \
        --size="${rf_fio_mb}M" --group_reporting
    p0=$(queue_irqs 0)
    p1=$(queue_irqs 1)
    case "$q0$q1$p0$p1" in
    *missing*)
        check mq_both_queues_used FAIL "no per-queue interrupts (virtioN-req.0/1) in" \
            "/proc/interrupts: $(grep virtio /proc/interrupts | tr -s ' ' | tr '\n' ';')"
        ;;
    *)
        if [ $((p0 - q0)) -gt 0 ] && [ $((p1 - q1)) -gt 0 ]; then
            check mq_both_queues_used PASS "completion interrupts during fio: queue 0" \
                "+$((p0 - q0)), queue 1 +$((p1 - q1))"
        else
            check mq_both_queues_used FAIL "completion interrupts during fio: queue 0" \
                "+$((p0 - q0)), queue 1 +$((p1 - q1))"
        fi
        ;;
    esac
}

hostwrite() {
    pattern "HOST:$rf_seed" "$rf_len" >/tmp/host
    if dwrite /tmp/host "$rf_off" && drop_caches && matches "$rf_off" "$rf_len" /tmp/host; then
        check host_pattern_written PASS "$rf_len bytes at $rf_off"
    else
        check host_pattern_written FAIL "$(err)"
    fi
    head -c "$rf_zlen" /dev/zero >/tmp/zeroes
    if "$BLKDISCARD" -z -o "$rf_zoff" -l "$rf_zlen" /dev/vda 2>/tmp/err && drop_caches &&
        matches "$rf_zoff" "$rf_zlen" /tmp/zeroes; then
        check host_zeroes_written PASS "$rf_zlen bytes at $rf_zoff"
    else
        check host_zeroes_written FAIL "$(err)"
    fi
}

reboot1() {
    pattern "BOOT:$rf_seed" "$rf_len" >/tmp/boot
    if dwrite /tmp/boot "$rf_off" && drop_caches && matches "$rf_off" "$rf_len" /tmp/boot; then
        check boot1_pattern_written PASS "$rf_len bytes at $rf_off"
    else
        check boot1_pattern_written FAIL "$(err)"
    fi
}

reboot2() {
    pattern "BOOT:$rf_seed" "$rf_len" >/tmp/boot
    if matches "$rf_off" "$rf_len" /tmp/boot; then
        check boot2_pattern_readback PASS "the first boot's $rf_len bytes at $rf_off"
    else
        check boot2_pattern_readback FAIL "$(err)"
    fi
    pattern "BOOT2:$rf_seed" 65536 >/tmp/boot2
    o=$((rf_off + rf_len + MiB))
    if dwrite /tmp/boot2 "$o" && drop_caches && matches "$o" 65536 /tmp/boot2; then
        check boot2_write_read PASS "64 KiB at $o"
    else
        check boot2_write_read FAIL "$(err)"
    fi
}

# The host grows the image and signals the backend once it reads the marker; the guest waits
# (bounded) for its virtio-blk driver to log the new capacity, which it does when the device
# raises a config interrupt, then uses the new end of the disk.
resize() {
    if [ "$rf_newsize" -le "$rf_size" ]; then
        check resize_setup FAIL "rf_newsize=$rf_newsize must exceed rf_size=$rf_size"
        return
    fi
    echo "RINGFENCE-RESIZE-READY old=$rf_size new=$rf_newsize"
    # /dev/kmsg yields the whole kernel log, then blocks for new records: the driver's
    # "new size" line is found whether it came before grep started or after.
    if line=$(timeout 60 grep -m 1 'new size' /dev/kmsg 2>/tmp/err); then
        seen=1
    else
        seen=0
    fi
    sectors=$(cat /sys/block/vda/size)
    if [ "$seen" = 1 ] && [ "$((sectors * 512))" = "$rf_newsize" ]; then
        check resize_seen PASS "the driver logged '${line#*;}'; /sys/block/vda/size=$sectors"
    else
        check resize_seen FAIL "no new size within 60 s (seen=$seen, $(err));" \
            "/sys/block/vda/size=$sectors, want $((rf_newsize / 512))"
        return
    fi
    # The last 64 KiB of the new disk lie past the old end.
    pattern "GROWN:$rf_seed" 65536 >/tmp/grown
    o=$((rf_newsize - 65536))
    if dwrite /tmp/grown "$o" && drop_caches && matches "$o" 65536 /tmp/grown; then
        check resize_write_read_new_end PASS "64 KiB at $o (the old end was $rf_size)"
    else
        check resize_write_read_new_end FAIL "at $o: $(err)"
    fi
}

# The host SIGKILLs the backend several times while fio writes with verification, and restarts
# it on the same socket; QEMU reconnects (`reconnect=1`). Random 4k readers run beside the
# writers on every queue, so that reads complete while the host holds writes in flight. Nothing
# may show inside the guest: fio verifies every block it wrote, and the kernel logs no I/O error.
crashload() {
    if [ $((rf_nq * rf_fio_mb)) -gt 56 ]; then
        check crashload_layout FAIL "needs rf_nq * rf_fio_mb <= 56 (fio uses [64 MiB, 120 MiB))"
        return
    fi
    cpus=0-$((rf_nq - 1))
    fio --output=/tmp/reader.out --filename=/dev/vda --direct=1 --ioengine=libaio \
        --name=reader --rw=randread --bs=4k --iodepth="$rf_reader_depth" --numjobs="$rf_nq" \
        --cpus_allowed="$cpus" --cpus_allowed_policy=split --offset=0 --size=64M \
        --time_based --runtime=3600 >/tmp/reader.err 2>&1 &
    reader=$!
    echo "RINGFENCE-CRASHLOAD-STARTED writers=$rf_nq size=${rf_fio_mb}M readers=$rf_nq"
    run_fio crashload_fio_verify --name=crashload --rw=randwrite --bsrange=4k-128k \
        --iodepth=16 --numjobs="$rf_nq" --cpus_allowed="$cpus" --cpus_allowed_policy=split \
        --offset=64M --offset_increment="${rf_fio_mb}M" --size="${rf_fio_mb}M" --group_reporting
    kill "$reader" 2>/dev/null
    wait "$reader"
    echo "RINGFENCE-CRASHLOAD-FIO-DONE"
    if dmesg | grep -iE 'I/O error|blk_update_request|critical medium error|not a head' \
        >/tmp/ioerr; then
        check crashload_no_io_errors FAIL "kernel log: $(head -n 5 /tmp/ioerr | tr '\n' ';')"
    else
        check crashload_no_io_errors PASS "no I/O error in the kernel log"
    fi
}

# Live migration under load (tests/migration.rs). The host seeded [rf_off, rf_off+rf_len) with
# `pattern MIG:rf_seed` and migrates the VM to another QEMU while:
#  - fio rounds run without pause (each: rf_nq jobs, one per CPU and so per queue, random writes
#    of 4k-128k over rf_fio_mb MiB each, then verified with crc32c; a new seed every round), so
#    that a round is in flight at the switchover; they stop after the round that runs when the
#    host's last word comes;
#  - holdbuf (holdbuf.c) fills a buffer, reads the region into it with O_DIRECT when the host
#    says `read` on /dev/ttyS1 (while the migration copies RAM), and hashes it when the host
#    says `check` (on the destination, after the switchover, once the host has overwritten the
#    region on disk with `pattern MIG2:rf_seed`).
# Console lines for the host: RINGFENCE-MIGRATE-FIO-ROUND-START n, RINGFENCE-MIGRATE-FIO-ROUND-END
# n PASS|FAIL, holdbuf's RINGFENCE-HOLDBUF-* lines.
migrate() {
    if [ $((rf_nq * rf_fio_mb)) -gt 56 ] || [ "$rf_off" -ge $((64 * MiB)) ] ||
        [ $((rf_off + rf_len)) -gt $((64 * MiB)) ] || [ "$rf_len" -le 0 ]; then
        check migrate_layout FAIL "needs rf_nq * rf_fio_mb <= 56 and the held region in [0, 64 MiB)"
        return
    fi
    pattern "MIG:$rf_seed" "$rf_len" >/tmp/mig
    pattern "MIG2:$rf_seed" "$rf_len" >/tmp/mig2
    want=$(holdbuf hash /tmp/mig)
    want2=$(holdbuf hash /tmp/mig2)
    echo "info: held region $rf_len bytes at $rf_off: original hash=$want, overwritten hash=$want2"
    cpus=0-$((rf_nq - 1))
    rm -f /tmp/stop /tmp/fio_failed
    [ "$rf_fio" = 1 ] || touch /tmp/stop
    (
        n=1
        while [ ! -e /tmp/stop ]; do
            echo "RINGFENCE-MIGRATE-FIO-ROUND-START $n"
            if fio --output=/tmp/fio.out --filename=/dev/vda --direct=1 --ioengine=libaio \
                --verify=crc32c --verify_fatal=1 --do_verify=1 --verify_state_save=0 \
                --randseed=$((rf_seed + n)) --name=mig --rw=randwrite --bsrange=4k-128k \
                --iodepth=16 --numjobs="$rf_nq" --cpus_allowed="$cpus" \
                --cpus_allowed_policy=split --offset=64M --offset_increment="${rf_fio_mb}M" \
                --size="${rf_fio_mb}M" --group_reporting >/tmp/fio.err 2>&1 &&
                ! grep -qiE 'verify: bad|crc32c: verify failed|err= *[1-9]' /tmp/fio.out; then
                echo "RINGFENCE-MIGRATE-FIO-ROUND-END $n PASS"
            else
                echo "RINGFENCE-MIGRATE-FIO-ROUND-END $n FAIL"
                echo "round $n: $(tr '\n' ' ' </tmp/fio.err | cut -c1-200)" \
                    "$(grep -iE 'verify|err' /tmp/fio.out | head -n 5 | tr '\n' ';')" \
                    >>/tmp/fio_failed
            fi
            n=$((n + 1))
        done
        echo $((n - 1)) >/tmp/fio_rounds
    ) &
    loop=$!
    holdbuf hold /dev/vda "$rf_off" "$rf_len" "$rf_ctl" "$rf_sweep_mb" 2>/tmp/hold.err |
        tee /tmp/hold.out
    touch /tmp/stop
    wait "$loop"
    held=$(sed -n 's/.*RINGFENCE-HOLDBUF-HOLDING hash=//p' /tmp/hold.out)
    got=$(sed -n 's/.*RINGFENCE-HOLDBUF-HASH hash=//p' /tmp/hold.out)
    if [ -z "$got" ]; then
        check held_buffer_intact FAIL "holdbuf did not finish: $(tr '\n' ' ' </tmp/hold.err)"
    elif [ "$held" != "$want" ]; then
        check held_buffer_intact FAIL "the O_DIRECT read got hash $held, want $want"
    elif [ "$got" = "$want" ]; then
        check held_buffer_intact PASS "the buffer read with O_DIRECT still hashes to $got"
    else
        check held_buffer_intact FAIL "the buffer read with O_DIRECT hashes to $got after the" \
            "migration, want $want (the O_DIRECT read itself hashed to $held)"
    fi
    # The host overwrote the region before its `check`: the disk itself no longer holds what
    # the buffer must hold, so only migrated RAM could give the right hash above.
    rm -f /tmp/now
    if dread "$rf_off" "$rf_len" /tmp/now && [ "$(holdbuf hash /tmp/now)" = "$want2" ]; then
        check region_overwritten_by_host PASS "the disk now holds the host's new content"
    else
        check region_overwritten_by_host FAIL "the disk does not hold the host's new content: $(err)"
    fi
    rounds=$(cat /tmp/fio_rounds 2>/dev/null)
    if [ -s /tmp/fio_failed ]; then
        check migrate_fio_verify FAIL "$(head -c 400 /tmp/fio_failed)"
    elif [ "$rf_fio" != 1 ]; then
        check migrate_fio_verify INFO "no load (rf_fio=$rf_fio)"
    elif [ "${rounds:-0}" -ge 1 ]; then
        check migrate_fio_verify PASS "$rounds rounds of ${rf_nq}x${rf_fio_mb} MiB verified"
    else
        check migrate_fio_verify FAIL "no fio round ran"
    fi
    if dmesg | grep -iE 'I/O error|blk_update_request|critical medium error|not a head' \
        >/tmp/ioerr; then
        check migrate_no_io_errors FAIL "kernel log: $(head -n 5 /tmp/ioerr | tr '\n' ';')"
    else
        check migrate_no_io_errors PASS "no I/O error in the kernel log"
    fi
}

identity
case "$rf_scenario" in
identity) ;;
integrity) integrity ;;
discard) discard ;;
readonly) readonly_export ;;
multiqueue) multiqueue ;;
hostwrite) hostwrite ;;
reboot1) reboot1 ;;
reboot2) reboot2 ;;
resize) resize ;;
crashload) crashload ;;
migrate) migrate ;;
*) check scenario FAIL "unknown scenario '$rf_scenario'" ;;
esac
finish
