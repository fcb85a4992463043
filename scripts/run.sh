#!/usr/bin/env bash
# Build ringfence and serve a disk on a vhost-user socket: the main job.
#
#   scripts/run.sh [IMAGE [SOCKET]] [-- extra ringfence options]
#
# IMAGE defaults to ./ringfence-disk.img, created as a sparse 1 GiB file when missing
# (RINGFENCE_IMAGE_SIZE to change); SOCKET defaults to /tmp/ringfence.sock.
# On a fresh Debian machine this installs nothing but what cargo fetches.
set -euo pipefail
cd "$(dirname "$0")/.."

image=./ringfence-disk.img
socket=/tmp/ringfence.sock
if [[ $# -gt 0 && $1 != -- ]]; then image=$1; shift; fi
if [[ $# -gt 0 && $1 != -- ]]; then socket=$1; shift; fi
[[ ${1:-} == -- ]] && shift

cargo build --release --locked --bin ringfence
echo "ringfence: serving $image on $socket (Ctrl-C to stop); attach QEMU with:" >&2
echo "  -chardev socket,id=rf0,path=$socket -device vhost-user-blk-pci,chardev=rf0" >&2
exec ./target/release/ringfence \
    --socket-path "$socket" \
    --blk-file "$image" \
    --create-size "${RINGFENCE_IMAGE_SIZE:-1G}" \
    "$@"
