#!/bin/sh
# /init of the kernel-matrix guest (busybox ash, PID 1); kernel-matrix.sh builds its initramfs.
# It prepares what ringfence's own test binaries expect of a machine, runs each of them and
# prints everything on the serial console:
#   RINGFENCE-MATRIX-BOOTED kernel=<release> cpus=<n> mem_kib=<n>
#   RINGFENCE-MATRIX-BEGIN <name>
#   ... the test binary's own output (libtest) ...
#   RINGFENCE-MATRIX-END <name> rc=<exit status> secs=<duration>
#   RINGFENCE-MATRIX-DONE
# or `RINGFENCE-MATRIX-SETUP-FAILED <reason>` if the machine could not be prepared; then it
# powers the machine off.
#
# Inputs, written by kernel-matrix.sh:
#   /etc/ringfence-modules   modules to insmod from /usr/lib/modules/ringfence, in order
#   /etc/matrix.conf         shell assignments: MATRIX_REPO, MATRIX_BIN, MATRIX_THREADS
#   /etc/matrix-tests        one test binary a line: <name> <absolute path> [libtest args...]

PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# Like any Linux machine's: some tests put an image on tmpfs there.
mkdir -p /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /dev/shm

echo "RINGFENCE-MATRIX-BOOTED kernel=$(uname -r) cpus=$(nproc)" \
    "mem_kib=$(awk '/^MemTotal:/ { print $2 }' /proc/meminfo)"

off() {
    sync
    poweroff -f
    # If poweroff fails, exiting PID 1 panics the kernel; panic=-1 and QEMU's -no-reboot end the
    # run.
    exit 1
}

setup_failed() {
    echo "RINGFENCE-MATRIX-SETUP-FAILED $*"
    echo "--- guest kernel log (tail) ---"
    dmesg | tail -n 30
    echo "--- end of guest kernel log ---"
    off
}

# shellcheck disable=SC1091 # written by kernel-matrix.sh
. /etc/matrix.conf || setup_failed "no /etc/matrix.conf"

# A test binds 127.0.0.1.
ip link set lo up 2>/tmp/err || setup_failed "ip link set lo up: $(cat /tmp/err)"

while read -r m; do
    [ -n "$m" ] || continue
    insmod "/usr/lib/modules/ringfence/$m.ko" 2>/tmp/err ||
        setup_failed "insmod $m: $(cat /tmp/err)"
done </etc/ringfence-modules

# The scratch disk (ext4, made on the host) becomes /scratch, the tests' TMPDIR: they put images
# there and open them with O_DIRECT, which tmpfs supports only from Linux 6.6. Not /tmp: the
# repository (and so the test binaries, at their host paths) may live under /tmp, as a CI clone
# can. virtio_blk probes while insmod
# runs; the bounded wait only tolerates a slow devtmpfs.
n=0
while [ ! -b /dev/vda ] && [ "$n" -lt 50 ]; do
    sleep 0.1
    n=$((n + 1))
done
[ -b /dev/vda ] || setup_failed "no /dev/vda; virtio devices: $(echo /sys/bus/virtio/devices/*)"
mkdir -p /scratch
mount -t ext4 -o noatime /dev/vda /scratch 2>/dev/console ||
    setup_failed "mount -t ext4 /dev/vda /scratch failed"

export TMPDIR=/scratch HOME=/scratch RINGFENCE_BIN="$MATRIX_BIN"
# cargo runs test binaries from the package's directory; so do we.
cd "$MATRIX_REPO" || setup_failed "no $MATRIX_REPO in the initramfs"

while read -r name path args; do
    [ -n "$name" ] || continue
    echo "RINGFENCE-MATRIX-BEGIN $name"
    start=$(date +%s)
    # shellcheck disable=SC2086 # the libtest arguments are words
    "$path" --test-threads="$MATRIX_THREADS" $args </dev/null 2>&1
    rc=$?
    echo "RINGFENCE-MATRIX-END $name rc=$rc secs=$(($(date +%s) - start))"
done </etc/matrix-tests

cd /
umount /scratch 2>/dev/null
echo "RINGFENCE-MATRIX-DONE"
off
