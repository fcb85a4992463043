#!/usr/bin/env bash
# Run every ringfence test, installing what the tests need first (Debian/Ubuntu; as root, or
# with sudo). `.ci/run` runs exactly this on a clean checkout.
#
#   scripts/test.sh            everything: lints, unit + kernel + blkio + hostile-driver tests,
#                              real QEMU guests, the kernel matrix, a short run of every fuzz
#                              target
#   scripts/test.sh --no-fuzz    leave out the fuzz run
#   scripts/test.sh --no-matrix  leave out the kernel matrix (the unit, seccomp-gap, sandbox and
#                              blkio tests inside Debian's 6.1, 6.12 and 7.x cloud kernels under
#                              QEMU TCG: guest-tests/qemu/kernel-matrix.sh, which can also be
#                              run by itself, for one kernel: kernel-matrix.sh 7)
#
# The environment cannot weaken it: the variables that point suites at qemu-storage-daemon,
# shorten the hostile suites' waits, choose kernels or tests, or filter the log are unset here.
set -euo pipefail
cd "$(dirname "$0")/.."

fuzz=1 matrix_wanted=1
for arg in "$@"; do
    case "$arg" in
    --no-fuzz) fuzz= ;;
    --no-matrix) matrix_wanted= ;;
    *)
        echo "usage: scripts/test.sh [--no-fuzz] [--no-matrix]" >&2
        exit 2
        ;;
    esac
done
# Everything RINGFENCE_* but the location of the download cache, and the log filter.
while read -r var; do
    case "$var" in
    RINGFENCE_GUEST_CACHE) ;;
    RINGFENCE_*) unset "$var" ;;
    esac
done < <(compgen -e)
unset RUST_LOG

sudo=
[[ $(id -u) -ne 0 ]] && sudo=sudo

step() { printf '\n== %s\n' "$*"; }

step "system packages"
# qemu-utils goes with qemu-system-x86 on purpose: install-host-packages.sh installs QEMU's
# packages at one version, downgrading a backported qemu-utils when that is what blocks them.
# systemd: systemd-socket-activate and systemd-analyze (tests/systemd.rs, the units in
# contrib/systemd); libvirt-clients and libxml2-utils: virt-xml-validate and the xmllint it
# runs (tests/libvirt.rs).
pkgs=(qemu-system-x86 qemu-system-common qemu-utils fio busybox-static cpio kmod util-linux
    xz-utils zstd e2fsprogs python3 debian-archive-keyring systemd libvirt-clients libxml2-utils)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    $sudo guest-tests/qemu/install-host-packages.sh "${pkgs[@]}"
else
    echo "all present: ${pkgs[*]}"
fi
if [[ $(cat /proc/sys/kernel/io_uring_disabled 2>/dev/null || echo 0) != 0 ]]; then
    echo "io_uring is disabled (kernel.io_uring_disabled); run: sysctl -w kernel.io_uring_disabled=0" >&2
    exit 1
fi

step "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings

step "guest assets (kernel, initramfs) for the QEMU tests"
guest-tests/qemu/prepare-assets.sh

step "tests: unit, kernel enforcement, blkio, hostile driver, QEMU guests"
cargo build --release --locked --bin ringfence
log=$(mktemp)
mlog=$(mktemp)
trap 'rm -f "$log" "$mlog"' EXIT
set +e
RINGFENCE_BIN="$PWD/target/release/ringfence" cargo test --workspace --locked --no-fail-fast \
    -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
count() { awk -v k="$1" '/^test result:/ { for (i = 2; i <= NF; i++) if ($i ~ "^" k) s += $(i-1) } END { print s + 0 }' "$log"; }
passed=$(count passed)
failed=$(count failed)
ignored=$(count ignored)
summary() { # the breakdown, then the last line with the kernel matrix's counts added in
    echo "cargo test: $passed passed, $failed failed, $ignored ignored (libtest's #[ignore]:" \
        "helper processes, not tests); kernel matrix: ${matrix:-not run}"
    echo "tests: $((passed + matrix_passed)) passed, $((failed + matrix_failed)) failed, $ignored skipped"
}
matrix="" matrix_passed=0 matrix_failed=0
if [[ $status -ne 0 ]]; then
    summary
    exit "$status"
fi

if [[ -n $matrix_wanted ]]; then
    step "kernel matrix (6.1, 6.12, 7.x under QEMU TCG)"
    set +e
    guest-tests/qemu/kernel-matrix.sh 2>&1 | tee "$mlog"
    status=${PIPESTATUS[0]}
    set -e
    counts=$(sed -n 's/^kernel-matrix: \([0-9]*\) passed, \([0-9]*\) failed$/\1 \2/p' "$mlog" | tail -n 1)
    if [[ -n $counts ]]; then
        read -r matrix_passed matrix_failed <<<"$counts"
        matrix="$matrix_passed passed, $matrix_failed failed"
    else
        matrix_failed=1
        matrix="did not run to the end"
    fi
    if [[ $status -ne 0 ]]; then
        summary
        exit "$status"
    fi
else
    matrix="left out (--no-matrix)"
fi

if [[ -n $fuzz ]]; then
    step "fuzz targets (brief)"
    fuzz/run.sh 15
fi

step "summary"
summary
