#!/usr/bin/env bash
# Run the QEMU guest tests (guest-tests/tests/qemu_guest.rs) against one backend.
#
#   guest-tests/qemu/run-tests.sh                    against ringfence (built in release mode)
#   guest-tests/qemu/run-tests.sh --backend qsd      against qemu-storage-daemon's export, to
#                                                    tell a ringfence bug from a harness fault
#   guest-tests/qemu/run-tests.sh -- multiqueue      extra arguments go to the test binary
#                                                    (a name filter, --nocapture, ...)
#
# Set RINGFENCE_TEST_LOG=1 to see every guest console and check as it happens.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

backend=ringfence
while [ $# -gt 0 ]; do
    case "$1" in
    --backend) backend=$2; shift 2 ;;
    --) shift; break ;;
    -h | --help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) break ;;
    esac
done
case "$backend" in
ringfence | qsd) ;;
*) echo "run-tests: --backend must be ringfence or qsd" >&2; exit 2 ;;
esac

cd "$repo"
"$here/prepare-assets.sh" >/dev/null
if [ "$backend" = ringfence ] && [ -z "${RINGFENCE_BIN:-}" ]; then
    cargo build --release --bin ringfence
    export RINGFENCE_BIN=$repo/target/release/ringfence
fi
RINGFENCE_GUEST_BACKEND=$backend exec cargo test -p ringfence-guest-tests --test qemu_guest -- "$@"
