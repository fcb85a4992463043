#!/usr/bin/env bash
# The QEMU of the live-migration tests (tests/migration.rs), idempotently.
#
# Bookworm's QEMU 7.2, which every other guest test uses, corrupts TCG guests across a live
# migration on this project's machines (even with QEMU's own virtio-blk: 7 of 10 runs passed,
# the others crashed, stalled or segfaulted in the guest after the switchover; see
# guest-tests/qemu/README.md, "Live migration"). QEMU 10.0 from bookworm-backports passed every
# run. Installing it would replace the machine's QEMU 7.2 (its qemu-system-common and
# qemu-utils with it), so it is not installed: its packages (qemu-system-x86, qemu-system-data
# and seabios of bookworm-backports) are downloaded with a private apt state (its own
# sources.list and lists; the host's /etc/apt is not touched) and extracted under
#   ${RINGFENCE_GUEST_CACHE:-$HOME/.cache/ringfence-guest}/migration-qemu/<version>/
# next to a wrapper, `qemu-system-x86_64`, that runs it with its own firmware and modules. Its
# shared libraries are bookworm's (those QEMU 7.2 uses, almost all); missing ones are installed
# with install-host-packages.sh. The package lists are refreshed when older than 23 hours.
#
# Prints `RINGFENCE_MIGRATION_QEMU=<wrapper>` on stdout; progress on stderr.
# Environment:
#   RINGFENCE_MIGRATION_QEMU     a QEMU to use instead (printed back as is; nothing is fetched)
#   RINGFENCE_MIGRATION_MIRROR   Debian mirror (default http://deb.debian.org/debian)
#   RINGFENCE_GUEST_CACHE        cache directory (see above)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { printf 'migration-qemu: %s\n' "$*" >&2; }
die() { printf 'migration-qemu: ERROR: %s\n' "$*" >&2; exit 1; }

if [ -n "${RINGFENCE_MIGRATION_QEMU:-}" ]; then
    printf 'RINGFENCE_MIGRATION_QEMU=%s\n' "$RINGFENCE_MIGRATION_QEMU"
    exit 0
fi

cache=${RINGFENCE_GUEST_CACHE:-${HOME:-/root}/.cache/ringfence-guest}
mkdir -p "$cache/migration-qemu"
base=$(cd "$cache/migration-qemu" && pwd)
exec 9>"$base/.lock"
flock 9

for c in apt-get dpkg-deb ldd; do
    command -v "$c" >/dev/null 2>&1 || die "$c not found"
done
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -r "$keyring" ] || "$here/install-host-packages.sh" debian-archive-keyring ||
    die "no $keyring: apt-get install debian-archive-keyring"

mirror=${RINGFENCE_MIGRATION_MIRROR:-http://deb.debian.org/debian}
apt_dir=$base/apt
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
sources="deb [signed-by=$keyring] $mirror bookworm-backports main"
apt_opts=(-o "Dir::State=$apt_dir" -o "Dir::State::Lists=$apt_dir/lists"
    -o "Dir::State::status=/var/lib/dpkg/status" -o "Dir::Cache=$apt_dir/cache"
    -o "Dir::Etc::SourceList=$apt_dir/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
    -o "APT::Sandbox::User=root")
if [ ! -s "$apt_dir/sources.list" ] || [ "$(cat "$apt_dir/sources.list")" != "$sources" ]; then
    printf '%s\n' "$sources" >"$apt_dir/sources.list"
    rm -f "$apt_dir/updated"
fi
if [ ! -e "$apt_dir/updated" ] || [ -n "$(find "$apt_dir/updated" -mmin +1380)" ]; then
    log "refreshing the bookworm-backports package list"
    if apt-get "${apt_opts[@]}" -q update >"$base/apt-update.log" 2>&1; then
        touch "$apt_dir/updated"
    elif [ -e "$apt_dir/updated" ]; then
        log "apt-get update failed; using the list of $(date -r "$apt_dir/updated" '+%F %R')"
    else
        cat "$base/apt-update.log" >&2
        die "apt-get update of bookworm-backports failed"
    fi
fi

version=$(apt-cache "${apt_opts[@]}" show qemu-system-x86 2>/dev/null |
    awk '$1 == "Version:" && $2 ~ /bpo12/ { print $2 }' | sort -V | tail -n 1)
[ -n "$version" ] || die "bookworm-backports has no qemu-system-x86"
case "$version" in
*[!A-Za-z0-9.+:~_-]*) die "odd version '$version'" ;;
esac
dir=$base/${version//:/_}
wrapper=$dir/qemu-system-x86_64

if [ ! -x "$wrapper" ]; then
    log "fetching QEMU $version from bookworm-backports"
    tmp=$(mktemp -d "$base/.fetch.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    seabios=$(apt-cache "${apt_opts[@]}" show seabios 2>/dev/null |
        awk '$1 == "Version:" && $2 ~ /bpo12/ { print $2 }' | sort -V | tail -n 1)
    pkgs=("qemu-system-x86=$version" "qemu-system-data=$version")
    # QEMU 10 wants a newer SeaBIOS than bookworm's (its Depends says so).
    if [ -n "$seabios" ]; then pkgs+=("seabios=$seabios"); fi
    (cd "$tmp" && apt-get "${apt_opts[@]}" -q download "${pkgs[@]}" >&2) ||
        die "apt-get download ${pkgs[*]} failed"
    mkdir "$tmp/root"
    for deb in "$tmp"/*.deb; do
        dpkg-deb -x "$deb" "$tmp/root"
    done
    bin=$tmp/root/usr/bin/qemu-system-x86_64
    [ -x "$bin" ] || die "no usr/bin/qemu-system-x86_64 in qemu-system-x86 $version"
    # Libraries: bookworm's. Install the ones the host lacks (named in the package's Depends).
    if ldd "$bin" | grep -q 'not found'; then
        mapfile -t libs < <(dpkg-deb -f "$tmp"/qemu-system-x86_*.deb Depends | tr ',' '\n' |
            sed -e 's/(.*)//' -e 's/|.*//' -e 's/ //g' | grep -E '^lib')
        log "installing the libraries QEMU $version needs: ${libs[*]}"
        "$here/install-host-packages.sh" "${libs[@]}" || die "installing ${libs[*]} failed"
        if ldd "$bin" | grep 'not found' >&2; then
            die "QEMU $version still misses libraries (above)"
        fi
    fi
    mkdir -p "$dir"
    rm -rf "$dir/root"
    mv "$tmp/root" "$dir/root"
    cat >"$wrapper.tmp" <<EOF
#!/bin/sh
# QEMU $version from bookworm-backports, extracted by migration-qemu.sh (not installed).
QEMU_MODULE_DIR='$dir/root/usr/lib/x86_64-linux-gnu/qemu'
export QEMU_MODULE_DIR
exec '$dir/root/usr/bin/qemu-system-x86_64' -L '$dir/root/usr/share/qemu' \\
    -L '$dir/root/usr/share/seabios' "\$@"
EOF
    chmod 0755 "$wrapper.tmp"
    "$wrapper.tmp" --version >/dev/null || die "QEMU $version does not run"
    mv "$wrapper.tmp" "$wrapper"
    # Drop other versions.
    find "$base" -mindepth 1 -maxdepth 1 -type d ! -name apt ! -name "$(basename "$dir")" \
        -exec rm -rf {} +
fi
printf 'RINGFENCE_MIGRATION_QEMU=%s\n' "$wrapper"
