#!/usr/bin/env bash
# Boot the test guest once against a vhost-user-blk backend and report what it saw.
#
# The guest (guest-init.sh in an initramfs, see prepare-assets.sh) runs the checks of one
# scenario against its virtio-blk disk and prints `RINGFENCE-CHECK <name> PASS|FAIL|INFO ...`
# lines and a final `RINGFENCE-DONE failed=N` on its serial console, which this script copies to
# stdout. Exit status: 0 if the guest finished and no check failed, 1 if a check failed or the
# guest never finished, 2 for a usage or setup error, 124 if QEMU ran past --timeout.
#
# Usage:
#   run-guest.sh --socket PATH [options]             against a backend that is already running
#   run-guest.sh --backend ringfence|qsd --image IMG [options]
#                                                    start that backend for this one boot
# Options:
#   --scenario NAME     identity (default), integrity, discard, readonly, multiqueue, hostwrite,
#                       reboot1, reboot2, resize, crashload (see guest-init.sh)
#   --num-queues N      queues of the vhost-user-blk-pci device (and guest CPUs); default 1
#   --read-only         the export is read-only (with --backend: export it so)
#   --size BYTES        disk size the guest must see (default: the size of --image)
#   --serial STR        serial the guest must see (default with --backend: ringfence gets
#                       --serial rf-guest; qemu-storage-daemon always says vhost_user_blk)
#   --lbs N             logical block size the guest must see (default 512)
#   --param rf_X=V      another guest parameter (repeatable), e.g. --param rf_seed=42
#   --timeout SECS      limit for the whole QEMU run, a failure detector (default 300)
#   --log FILE          also write the console to FILE
#   --reconnect SECS    QEMU reconnects to the backend's socket SECS seconds after losing it
#                       (`-chardev socket,...,reconnect=SECS`, QEMU 7.2's spelling; QEMU 9.2
#                       deprecated it for reconnect-ms): a backend may be restarted under the
#                       running guest
#   --pidfile FILE      QEMU writes its pid to FILE (for a host that inspects the VMM)
# Environment:
#   RINGFENCE_GUEST_KERNEL, RINGFENCE_GUEST_INITRD, RINGFENCE_GUEST_ACCEL: use these instead of
#   asking prepare-assets.sh; RINGFENCE_BIN: the ringfence binary for --backend ringfence.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

die() {
    printf 'run-guest: ERROR: %s\n' "$*" >&2
    exit 2
}
usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
    exit 2
}

socket="" backend="" image="" scenario=identity nq=1 ro=0 size="" serial="" lbs=512
timeout_s=300 logfile="" params=() reconnect="" pidfile=""
while [ $# -gt 0 ]; do
    case "$1" in
    --socket) socket=$2; shift 2 ;;
    --backend) backend=$2; shift 2 ;;
    --image) image=$2; shift 2 ;;
    --scenario) scenario=$2; shift 2 ;;
    --num-queues) nq=$2; shift 2 ;;
    --read-only) ro=1; shift ;;
    --size) size=$2; shift 2 ;;
    --serial) serial=$2; shift 2 ;;
    --lbs) lbs=$2; shift 2 ;;
    --param) params+=("$2"); shift 2 ;;
    --timeout) timeout_s=$2; shift 2 ;;
    --log) logfile=$2; shift 2 ;;
    --reconnect) reconnect=$2; shift 2 ;;
    --pidfile) pidfile=$2; shift 2 ;;
    -h | --help) usage ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done

if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    die "qemu-system-x86_64 not found: install it with 'apt-get install qemu-system-x86'" \
        "(or run guest-tests/qemu/prepare-assets.sh, which installs everything the tests need)"
fi

# Guest assets.
if [ -z "${RINGFENCE_GUEST_KERNEL:-}" ] || [ -z "${RINGFENCE_GUEST_INITRD:-}" ]; then
    assets=$("$here/prepare-assets.sh") || die "prepare-assets.sh failed"
    eval "$assets"
fi
kernel=$RINGFENCE_GUEST_KERNEL
initrd=$RINGFENCE_GUEST_INITRD
accel=${RINGFENCE_GUEST_ACCEL:-tcg}
if [ ! -r "$kernel" ] || [ ! -r "$initrd" ]; then
    die "missing guest kernel/initramfs: run prepare-assets.sh"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/ringfence-guest.XXXXXX")
backend_pid=""
# shellcheck disable=SC2317 # called through the trap
cleanup() {
    if [ -n "$backend_pid" ]; then
        kill "$backend_pid" 2>/dev/null || true
        wait "$backend_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

# Optionally start a backend for this boot.
if [ -n "$backend" ]; then
    [ -z "$socket" ] || die "give --socket or --backend, not both"
    [ -n "$image" ] || die "--backend needs --image"
    if [ ! -e "$image" ]; then
        truncate -s "${size:-128M}" "$image"
        size=""
    fi
    image=$(readlink -f "$image")
    socket=$work/vhost.sock
    case "$backend" in
    ringfence)
        bin=${RINGFENCE_BIN:-$repo/target/release/ringfence}
        if [ ! -x "$bin" ]; then
            (cd "$repo" && cargo build --release --bin ringfence >&2) || die "cargo build failed"
        fi
        [ -n "$serial" ] || serial=rf-guest
        args=(--socket-path "$socket" --blk-file "$image" --num-queues "$nq" --serial "$serial")
        if [ "$ro" = 1 ]; then args+=(--read-only); fi
        mkfifo "$work/backend.err"
        "$bin" "${args[@]}" 2>"$work/backend.err" &
        backend_pid=$!
        # Readiness is the daemon's own ready line; keep copying its stderr afterwards.
        exec 3<"$work/backend.err"
        ready=0
        while IFS= read -r -t 60 line <&3; do
            printf '[ringfence] %s\n' "$line" >&2
            case "$line" in *"ringfence: ready, listening on"*) ready=1 && break ;; esac
        done
        [ "$ready" = 1 ] || die "ringfence did not become ready: $bin ${args[*]}"
        sed -u 's/^/[ringfence] /' <&3 >&2 &
        ;;
    qsd)
        [ -n "$serial" ] || serial=vhost_user_blk
        rdonly=off writable=on
        if [ "$ro" = 1 ]; then rdonly=on writable=off; fi
        qemu-storage-daemon \
            --blockdev "driver=file,node-name=file0,filename=$image,cache.direct=on,aio=io_uring,read-only=$rdonly" \
            --export "type=vhost-user-blk,id=exp0,node-name=file0,addr.type=unix,addr.path=$socket,writable=$writable,num-queues=$nq" \
            --daemonize --pidfile "$work/qsd.pid" || die "qemu-storage-daemon failed to start"
        backend_pid=$(cat "$work/qsd.pid")
        ;;
    *) die "--backend must be ringfence or qsd" ;;
    esac
fi
[ -n "$socket" ] || die "give --socket PATH or --backend ringfence|qsd --image IMG"
[ -S "$socket" ] || die "$socket is not a unix socket"
if [ -z "$size" ]; then
    [ -n "$image" ] || die "give --size (or --image)"
    size=$(stat -L -c %s "$image")
fi
size=$(numfmt --from=iec "$size") || die "--size: '$size' is not a size"


case "$accel" in
# The nested (paravirtual) KVM of the machines this project runs on hangs early in the boot of
# stock kernels, so TCG is the default there; prepare-assets.sh probes once whether KVM boots
# the guest and says kvm where it does.
kvm) accel_args=(-accel kvm -cpu host) ;;
tcg) accel_args=(-accel tcg -cpu max) ;;
*) die "RINGFENCE_GUEST_ACCEL must be kvm or tcg, not '$accel'" ;;
esac

mem=512M
append="console=ttyS0 panic=-1 loglevel=4 mitigations=off rf_scenario=$scenario rf_size=$size"
append+=" rf_lbs=$lbs rf_nq=$nq rf_ro=$ro rf_serial=$serial"
for p in "${params[@]}"; do
    append+=" $p"
done

chardev="socket,id=vub0,path=$socket"
if [ -n "$reconnect" ]; then
    case "$reconnect" in
    *[!0-9]* | "") die "--reconnect takes whole seconds, not '$reconnect'" ;;
    esac
    chardev+=",reconnect=$reconnect"
fi
extra=()
if [ -n "$pidfile" ]; then extra+=(-pidfile "$pidfile"); fi

qemu=(qemu-system-x86_64 "${accel_args[@]}"
    -machine "q35,memory-backend=mem" -m "$mem" -smp "$nq"
    # vhost-user: the backend maps guest memory, so it must be a shareable memfd.
    -object "memory-backend-memfd,id=mem,size=$mem,share=on"
    -nodefaults -display none -no-reboot -serial stdio
    -chardev "$chardev"
    -device "vhost-user-blk-pci,chardev=vub0,num-queues=$nq"
    "${extra[@]}"
    -kernel "$kernel" -initrd "$initrd" -append "$append")

console=$work/console.log
printf 'run-guest: %s\n' "${qemu[*]}" >&2
status=0
timeout -k 10 "$timeout_s" "${qemu[@]}" </dev/null 2>&1 | tee "$console" || status=$?
[ -z "$logfile" ] || cp "$console" "$logfile"

if [ "$status" = 124 ] || [ "$status" = 137 ]; then
    printf 'run-guest: TIMEOUT: QEMU ran for more than %s s\n' "$timeout_s" >&2
    exit 124
fi
if [ "$status" != 0 ]; then
    printf 'run-guest: QEMU exited with status %s\n' "$status" >&2
fi
if grep -q 'RINGFENCE-CHECK [^ ]* FAIL' "$console"; then
    printf 'run-guest: FAILED checks:\n' >&2
    grep -o 'RINGFENCE-CHECK [^ ]* FAIL.*' "$console" >&2
    exit 1
fi
if ! grep -q 'RINGFENCE-DONE failed=0' "$console"; then
    printf 'run-guest: the guest did not finish (no RINGFENCE-DONE)\n' >&2
    exit 1
fi
printf 'run-guest: %s checks passed\n' "$(grep -c 'RINGFENCE-CHECK [^ ]* PASS' "$console")" >&2
exit "$status"
