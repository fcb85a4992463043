#!/usr/bin/env bash
# Run every ringfence test, installing what the tests need first (Debian/Ubuntu; as root, or
# with sudo). `.ci/run` runs exactly this on a clean checkout.
#
#   scripts/test.sh            everything: lints, unit + kernel + blkio + hostile-driver tests,
#                              real QEMU guests, a short run of every fuzz target
#   RINGFENCE_SKIP_FUZZ=1      leave out the fuzz run
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=
[[ $(id -u) -ne 0 ]] && sudo=sudo

step() { printf '\n== %s\n' "$*"; }

step "system packages"
pkgs=(qemu-system-x86 qemu-system-common fio busybox-static cpio kmod util-linux)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
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
trap 'rm -f "$log"' EXIT
set +e
RINGFENCE_BIN="$PWD/target/release/ringfence" cargo test --workspace --locked -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
count() { awk -v k="$1" '/^test result:/ { for (i = 2; i <= NF; i++) if ($i ~ "^" k) s += $(i-1) } END { print s + 0 }' "$log"; }
passed=$(count passed)
failed=$(count failed)
if [[ $status -ne 0 ]]; then
    echo "tests: ${passed:-0} passed, ${failed:-0} failed"
    exit "$status"
fi

if [[ -z ${RINGFENCE_SKIP_FUZZ:-} ]]; then
    step "fuzz targets (brief)"
    fuzz/run.sh 15
fi

step "summary"
echo "tests: ${passed:-0} passed, ${failed:-0} failed"
