#!/usr/bin/env bash
# Run ringfence's own test binaries inside several Debian cloud kernels under QEMU (TCG), one
# guest per kernel, and report one line per kernel:
#
#   kernel-matrix: 6.12.118+deb13-cloud-amd64: 74 passed, 0 failed (lib 47, ...) in 43 s
#   ...
#   kernel-matrix: 222 passed, 0 failed
#
# Usage:
#   guest-tests/qemu/kernel-matrix.sh                  every kernel of RINGFENCE_MATRIX_KERNELS
#   guest-tests/qemu/kernel-matrix.sh 7                just the newest 7.x kernel
#   guest-tests/qemu/kernel-matrix.sh linux-image-6.1.0-40-cloud-amd64
#                                                      that exact kernel package
#
# A kernel is a series (6.1, 6.12, 7, ...: the newest linux-image-<series>[.-]*-cloud-amd64
# package of bookworm(-security), trixie(-security) and sid) or a linux-image-* package name.
# The test binaries are built on the host (`cargo test --workspace --no-run`) and put into the
# guest's initramfs at their own absolute paths, with the daemon binaries they start
# (target/debug/ringfence, ...) and every shared library; the guest runs them (matrix-init.sh is
# its /init) on an ext4 scratch disk mounted on /scratch (their TMPDIR) and prints their output on its serial
# console. Exit status: 0 if every kernel booted and every test passed, 1 otherwise, 2 for a
# usage or setup error.
#
# Environment:
#   RINGFENCE_MATRIX_KERNELS   kernels to run, separated by spaces (default "6.1 6.12 7")
#   RINGFENCE_MATRIX_TESTS     what to run instead of the list below: entries separated by ';',
#                              each "<target> [libtest args...]", e.g. "lib ring::;sandbox"
#   RINGFENCE_MATRIX_TIMEOUT   seconds one guest may run before it counts as hung (default 900)
#   RINGFENCE_MATRIX_THREADS   libtest --test-threads in the guest (default 2)
#   RINGFENCE_MATRIX_VERBOSE=1 copy each guest's console to stderr as it runs
#   RINGFENCE_MATRIX_REFRESH=1 refresh the kernel package lists now (otherwise at most daily)
#   RINGFENCE_MATRIX_MIRROR, RINGFENCE_MATRIX_SECURITY_MIRROR
#                              Debian mirrors (default http://deb.debian.org/debian and
#                              http://deb.debian.org/debian-security)
#   RINGFENCE_GUEST_CACHE      cache root (default $HOME/.cache/ringfence-guest); this script
#                              keeps its private apt state, the extracted kernels and the
#                              console logs of the last runs in its matrix/ directory
set -Eeuo pipefail
trap 'printf "kernel-matrix: ERROR: unexpected failure (status %s) at line %s: %s\n" \
    "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR

# ---------------------------------------------------------------------------------------------
# What runs in every guest, in this order: "<target> [libtest args...]". <target> is `lib` (the
# ringfence library's unit tests) or an integration test target (tests/<target>.rs); a trailing
# `?` marks a target that may not exist yet (skipped then, with a note). The arguments go to the
# test binary after --test-threads: name filters (any of them matches; add --exact for whole
# names), --skip NAME, ...
# All of blkio_io takes about 30 s per kernel under TCG here; to run a subset, list names after
# it, e.g. "blkio_io --exact config_shows_capacity_block_size_and_queues flush_and_fua_writes".
matrix_tests=(
    "lib"
    "seccomp_gap"
    "sandbox"
    "fence_threads"
    "rearm"
    "blkio_io"
    "kernel_fence"
    "durability"
)
# ---------------------------------------------------------------------------------------------

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

log() { printf 'kernel-matrix: %s\n' "$*" >&2; }
die() { printf 'kernel-matrix: ERROR: %s\n' "$*" >&2; exit 2; }
usage() {
    sed -n '2,/^set -/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
    exit 2
}

kernels=()
while [ $# -gt 0 ]; do
    case "$1" in
    -h | --help) usage ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) kernels+=("$1"); shift ;;
    esac
done
if [ "${#kernels[@]}" = 0 ]; then
    read -r -a kernels <<<"${RINGFENCE_MATRIX_KERNELS:-6.1 6.12 7}"
fi
[ "${#kernels[@]}" -gt 0 ] || die "no kernels to run (RINGFENCE_MATRIX_KERNELS is empty)"
for k in "${kernels[@]}"; do
    case "$k" in
    [0-9]* | linux-image-*) ;;
    *) die "'$k' is neither a kernel series (6.1, 6.12, 7...) nor a linux-image-* package" ;;
    esac
    case "$k" in
    *[!A-Za-z0-9.+-]*) die "odd kernel '$k'" ;;
    esac
done
if [ -n "${RINGFENCE_MATRIX_TESTS:-}" ]; then
    IFS=';' read -r -a matrix_tests <<<"$RINGFENCE_MATRIX_TESTS"
fi
timeout_s=${RINGFENCE_MATRIX_TIMEOUT:-900}
threads=${RINGFENCE_MATRIX_THREADS:-2}
case "$timeout_s$threads" in
'' | *[!0-9]*) die "RINGFENCE_MATRIX_TIMEOUT and RINGFENCE_MATRIX_THREADS must be numbers" ;;
esac
mirror=${RINGFENCE_MATRIX_MIRROR:-http://deb.debian.org/debian}
security_mirror=${RINGFENCE_MATRIX_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

# ---------------------------------------------------------------------------------------------
# Host tools.
# ---------------------------------------------------------------------------------------------
host_pkgs=(qemu-system-x86 qemu-utils busybox-static cpio kmod xz-utils zstd e2fsprogs python3
    debian-archive-keyring)
"$here/install-host-packages.sh" "${host_pkgs[@]}" ||
    die "missing host packages (see above)"
for c in qemu-system-x86_64 cpio modinfo dpkg-deb apt-get apt-cache mkfs.ext4 python3 ldd xz \
    zstd timeout flock cargo; do
    command -v "$c" >/dev/null 2>&1 || die "$c not found; install it (${host_pkgs[*]}, cargo)"
done
busybox_bin=/bin/busybox
if [ ! -x "$busybox_bin" ] || ldd "$busybox_bin" >/dev/null 2>&1; then
    die "$busybox_bin is missing or dynamically linked: apt-get install busybox-static"
fi
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -r "$keyring" ] || die "no $keyring: apt-get install debian-archive-keyring"

cache_root=${RINGFENCE_GUEST_CACHE:-${HOME:-/root}/.cache/ringfence-guest}
cache=$cache_root/matrix
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
# One matrix at a time per cache (the apt state and the kernel directories are shared).
exec 9>"$cache/.lock"
if ! flock -n 9; then
    log "another kernel-matrix run holds $cache/.lock; waiting for it"
    flock 9
fi
find "$cache" -maxdepth 2 -name '.tmp.*' -exec rm -rf {} +

work=$(mktemp -d "${TMPDIR:-/tmp}/ringfence-matrix.XXXXXX")
qemu_pid=""
# shellcheck disable=SC2317 # called through the trap
cleanup() {
    if [ -n "$qemu_pid" ]; then
        kill "$qemu_pid" 2>/dev/null || true
        wait "$qemu_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# Kernels: a private apt state (the host's /etc/apt is left alone) with bookworm, trixie and
# sid, refreshed at most once a day.
# ---------------------------------------------------------------------------------------------
apt_dir=$cache/apt
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
apt_opts=(-o "Dir::State=$apt_dir" -o "Dir::State::Lists=$apt_dir/lists"
    -o "Dir::Cache=$apt_dir/cache" -o "Dir::Etc::SourceList=$apt_dir/sources.list"
    -o "Dir::Etc::SourceParts=/nonexistent" -o "Dir::State::status=/var/lib/dpkg/status"
    -o "APT::Sandbox::User=root" -o "Acquire::Languages=none")
sources=$(
    o="[signed-by=$keyring target=Packages]"
    printf 'deb %s %s %s main\n' \
        "$o" "$mirror" bookworm "$o" "$security_mirror" bookworm-security \
        "$o" "$mirror" trixie "$o" "$security_mirror" trixie-security \
        "$o" "$mirror" sid
)
if [ ! -s "$apt_dir/sources.list" ] || [ "$(cat "$apt_dir/sources.list")" != "$sources" ]; then
    printf '%s\n' "$sources" >"$apt_dir/sources.list"
    rm -f "$apt_dir/updated"
fi

refreshed=0
refresh_lists() {
    log "refreshing the kernel package lists (bookworm, trixie, sid)"
    if apt-get "${apt_opts[@]}" -q update >"$work/apt-update.log" 2>&1; then
        touch "$apt_dir/updated"
        grep -h '^Fetched' "$work/apt-update.log" | sed 's/^/kernel-matrix: /' >&2 || true
    elif [ -e "$apt_dir/updated" ]; then
        log "apt-get update failed; using the lists of $(date -r "$apt_dir/updated" '+%F %R'):"
        tail -n 5 "$work/apt-update.log" >&2
    else
        tail -n 20 "$work/apt-update.log" >&2
        die "apt-get update of the kernel package lists failed (see above; a mirror can be set" \
            "with RINGFENCE_MATRIX_MIRROR)"
    fi
    refreshed=1
}
if [ -n "${RINGFENCE_MATRIX_REFRESH:-}" ] || [ ! -e "$apt_dir/updated" ] ||
    [ -n "$(find "$apt_dir/updated" -mmin +1380)" ]; then
    refresh_lists
fi

# The package of a kernel entry: a linux-image-* name as given, or the newest of a series.
resolve() {
    local k=$1 re
    case "$k" in
    linux-image-*) printf '%s\n' "$k" ;;
    *)
        re=${k//./\\.}
        apt-cache "${apt_opts[@]}" pkgnames linux-image- 2>/dev/null |
            { grep -E "^linux-image-${re}[.-][^ ]*-cloud-amd64\$" || true; } | sort -V | tail -n 1
        ;;
    esac
}

# Download a kernel package and what holds its files (from Debian 14 on, linux-image-* is a
# small meta package: the kernel is in linux-binary-*, the modules in linux-modules-*, config and
# modules.builtin in linux-base-*) and extract them into $cache/kernels/<package>.
fetch_kernel() {
    local pkg=$1 kver=${1#linux-image-} dir=$cache/kernels/$1 tmp deps
    [ -e "$dir/.complete" ] && return 0
    log "downloading $pkg"
    tmp=$(mktemp -d "$cache/.tmp.XXXXXX")
    (cd "$tmp" && apt-get "${apt_opts[@]}" -q download "$pkg" >&2) || { rm -rf "$tmp"; return 1; }
    deps=$(dpkg-deb -f "$tmp"/*.deb Depends | tr '|,' '\n' | sed -e 's/^ *//' -e 's/[ (].*//' |
        grep -Fx -e "linux-binary-$kver" -e "linux-modules-$kver" -e "linux-base-$kver" || true)
    if [ -n "$deps" ]; then
        log "downloading ${deps//$'\n'/ }"
        # shellcheck disable=SC2086 # package names
        (cd "$tmp" && apt-get "${apt_opts[@]}" -q download $deps >&2) ||
            { rm -rf "$tmp"; return 1; }
    fi
    du -cb "$tmp"/*.deb | tail -n 1 | cut -f1 >"$tmp/download-bytes"
    mkdir "$tmp/x"
    for deb in "$tmp"/*.deb; do
        dpkg-deb -x "$deb" "$tmp/x"
    done
    mv "$tmp/download-bytes" "$tmp/x/.download-bytes"
    touch "$tmp/x/.complete"
    mkdir -p "$cache/kernels"
    rm -rf "$dir"
    mv "$tmp/x" "$dir"
    rm -rf "$tmp"
}

pkgs=()
for k in "${kernels[@]}"; do
    pkg=$(resolve "$k")
    if [ -z "$pkg" ] && [ "$refreshed" = 0 ]; then
        refresh_lists
        pkg=$(resolve "$k")
    fi
    [ -n "$pkg" ] || die "no linux-image-$k*-cloud-amd64 package in bookworm, trixie or sid" \
        "(RINGFENCE_MATRIX_KERNELS='${kernels[*]}')"
    if ! fetch_kernel "$pkg"; then
        # Stale lists name files the mirror no longer has: refresh once, pick again.
        [ "$refreshed" = 0 ] || die "downloading $pkg failed"
        refresh_lists
        pkg=$(resolve "$k")
        if [ -z "$pkg" ] || ! fetch_kernel "$pkg"; then
            die "downloading the kernel for '$k' failed"
        fi
    fi
    touch "$cache/kernels/$pkg"
    pkgs+=("$pkg")
done
# Kernels nobody asked for in two weeks go.
find "$cache/kernels" -mindepth 1 -maxdepth 1 -type d -mtime +14 -exec rm -rf {} +

# ---------------------------------------------------------------------------------------------
# Test binaries, built on the host.
# ---------------------------------------------------------------------------------------------
log "building the test binaries (cargo test --workspace --locked --no-run)"
(cd "$repo" && cargo test --workspace --locked --no-run --message-format=json-render-diagnostics) \
    >"$work/cargo.json" || die "building the tests failed: run 'cargo test --workspace --no-run'"

# Lines "<kind> <name> <path>": test binaries of the ringfence package (kind lib or test) and
# its binaries (kind bin, the CARGO_BIN_EXE_* paths the tests were compiled with).
python3 - "$repo/Cargo.toml" "$work/cargo.json" >"$work/artifacts" <<'EOF'
import json, os, sys
manifest, path = sys.argv[1], sys.argv[2]
for line in open(path):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") != "compiler-artifact" or not m.get("executable"):
        continue
    if os.path.realpath(m.get("manifest_path", "")) != os.path.realpath(manifest):
        continue
    kinds, test = m["target"]["kind"], m["profile"]["test"]
    if test and "lib" in kinds:
        kind = "lib"
    elif test and "test" in kinds:
        kind = "test"
    elif not test and "bin" in kinds:
        kind = "bin"
    else:
        continue
    print(kind, m["target"]["name"], m["executable"])
EOF

artifact() { # kind name
    awk -v k="$1" -v n="$2" '$1 == k && $2 == n { print $3; exit }' "$work/artifacts"
}
: >"$work/matrix-tests"
names=()
for entry in "${matrix_tests[@]}"; do
    read -r target args <<<"$entry"
    [ -n "$target" ] || continue
    optional=0
    case "$target" in *\?) optional=1 target=${target%\?} ;; esac
    if [ "$target" = lib ]; then
        bin=$(artifact lib ringfence)
    else
        bin=$(artifact test "$target")
    fi
    if [ -z "$bin" ]; then
        [ "$optional" = 1 ] || die "no test target '$target' in the build (edit matrix_tests in $0)"
        log "no test target '$target' (yet): skipped"
        continue
    fi
    printf '%s %s %s\n' "$target" "$bin" "$args" >>"$work/matrix-tests"
    names+=("$target")
done
[ "${#names[@]}" -gt 0 ] || die "nothing to run"
ringfence_bin=$(artifact bin ringfence)
[ -n "$ringfence_bin" ] || die "cargo built no ringfence binary"

# ---------------------------------------------------------------------------------------------
# The initramfs, in two parts: what every guest shares (busybox, the binaries at their absolute
# paths and their libraries, the init) and, per kernel, its modules. The kernel unpacks
# concatenated cpio archives one after the other.
# ---------------------------------------------------------------------------------------------
root=$work/root
mkdir -p "$root"/{usr/bin,usr/sbin,usr/lib,usr/lib64,proc,sys,dev,tmp,etc,root}
ln -s usr/bin "$root/bin"
ln -s usr/sbin "$root/sbin"
ln -s usr/lib "$root/lib"
ln -s usr/lib64 "$root/lib64"
cp "$busybox_bin" "$root/usr/bin/busybox"
"$busybox_bin" --list-full | while read -r applet; do
    [ -e "$root/$applet" ] || [ -L "$root/$applet" ] || ln -s /usr/bin/busybox "$root/$applet"
done
copy_with_libs() { # program: copied to the same path, with every library ldd names
    local prog=$1 lib
    mkdir -p "$root$(dirname "$prog")"
    cp -L "$prog" "$root$prog"
    ldd "$prog" | awk '/=> \// { print $3 } /^[[:space:]]*\// { print $1 }' |
        while read -r lib; do
            [ -e "$root$lib" ] && continue
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        done
}
while read -r _ _ path; do
    copy_with_libs "$path"
done < <(awk '$1 == "bin"' "$work/artifacts")
while read -r _ path _; do
    copy_with_libs "$path"
done <"$work/matrix-tests"
cp "$here/matrix-init.sh" "$root/init"
chmod 0755 "$root/init"
cp "$work/matrix-tests" "$root/etc/matrix-tests"
printf 'MATRIX_REPO=%s\nMATRIX_BIN=%s\nMATRIX_THREADS=%s\n' "$repo" "$ringfence_bin" "$threads" \
    >"$root/etc/matrix.conf"
echo ringfence-matrix >"$root/etc/hostname"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
mkcpio() { # dir: a newc archive of dir on stdout
    (cd "$1" && find . -print0 | LC_ALL=C sort -z |
        cpio --null --create --format=newc --owner=0:0 --quiet)
}
# Uncompressed: under TCG the kernel copies an archive faster than it inflates one.
mkcpio "$root" >"$work/common.cpio"
rm -rf "$root"

# The modules a kernel needs for the scratch disk, dependencies first, in $2/usr/lib/modules/
# ringfence, and their load order in $2/etc/ringfence-modules.
kernel_modules() { # moddir destdir
    local moddir=$1 dest=$2 order=() f
    local -A seen=()
    mkdir -p "$dest/usr/lib/modules/ringfence" "$dest/etc"
    add_module() {
        local n=$1 alt=${1//_/-} f ko dep
        [ -n "${seen[$n]:-}" ] && return 0
        seen[$n]=1
        if [ -e "$moddir/modules.builtin" ] &&
            grep -qE "/(${n}|${alt})\.ko\$" "$moddir/modules.builtin"; then
            return 0
        fi
        f=$(find "$moddir/kernel" \( -name "$n.ko*" -o -name "$alt.ko*" \) -print -quit)
        [ -n "$f" ] || die "module $n is neither built into $moddir nor shipped as a file"
        ko=$dest/usr/lib/modules/ringfence/$n.ko
        case "$f" in
        *.ko) cp "$f" "$ko" ;;
        *.ko.xz) xz -dc "$f" >"$ko" ;;
        *.ko.zst) zstd -qdc "$f" >"$ko" ;;
        *.ko.gz) gzip -dc "$f" >"$ko" ;;
        *) die "unknown module file $f" ;;
        esac
        for dep in $(modinfo -F depends "$ko" | tr ',' ' '); do
            add_module "$dep"
        done
        order+=("$n")
    }
    for f in virtio_pci virtio_blk ext4; do
        add_module "$f"
    done
    printf '%s\n' "${order[@]}" >"$dest/etc/ringfence-modules"
}

# ---------------------------------------------------------------------------------------------
# One guest per kernel.
# ---------------------------------------------------------------------------------------------
logdir=$cache/logs/$(date +%Y%m%d-%H%M%S)
mkdir -p "$logdir"
# Keep the logs of the last ten runs.
find "$cache/logs" -mindepth 1 -maxdepth 1 -type d | sort | head -n -10 |
    while read -r d; do rm -rf "$d"; done

total_passed=0
total_failed=0
any_failed=0
for pkg in "${pkgs[@]}"; do
    kdir=$cache/kernels/$pkg
    kver=${pkg#linux-image-}
    vmlinuz=""
    for f in "$kdir/boot/vmlinuz-$kver" "$kdir/usr/lib/modules/$kver/vmlinuz"; do
        [ -f "$f" ] && vmlinuz=$f
    done
    moddir=""
    for d in "$kdir/lib/modules/$kver" "$kdir/usr/lib/modules/$kver"; do
        [ -d "$d/kernel" ] && moddir=$d
    done
    if [ -z "$vmlinuz" ] || [ -z "$moddir" ]; then
        die "$kdir has no vmlinuz or no modules for $kver (remove the directory to fetch it again)"
    fi
    # modules.builtin may be in a package of its own next to the modules (linux-base-*).
    for d in "$kdir/lib/modules/$kver" "$kdir/usr/lib/modules/$kver"; do
        if [ -e "$d/modules.builtin" ] && [ ! -e "$moddir/modules.builtin" ]; then
            ln -s "$d/modules.builtin" "$moddir/modules.builtin"
        fi
    done

    rm -rf "$work/mods"
    kernel_modules "$moddir" "$work/mods"
    { cat "$work/common.cpio"; mkcpio "$work/mods"; } >"$work/initrd.cpio"

    # A fresh ext4 scratch disk, /scratch (TMPDIR) in the guest (O_DIRECT on every kernel, unlike tmpfs).
    rm -f "$work/scratch.img"
    truncate -s 8G "$work/scratch.img"
    mkfs.ext4 -q -F -L rf-scratch -O ^has_journal -E lazy_itable_init=0,lazy_journal_init=0 \
        "$work/scratch.img" || die "mkfs.ext4 failed"

    console=$logdir/$kver.log
    log "$kver: booting, running ${names[*]} (at most $timeout_s s)"
    # shellcheck disable=SC2054 # commas inside QEMU's arguments
    qemu=(qemu-system-x86_64 -accel tcg -cpu max -machine q35 -smp 2 -m 2G
        -nodefaults -display none -no-reboot -serial stdio
        -drive "file=$work/scratch.img,format=raw,if=none,id=scratch,cache=unsafe"
        -device virtio-blk-pci,drive=scratch
        -kernel "$vmlinuz" -initrd "$work/initrd.cpio"
        -append "console=ttyS0 panic=-1 loglevel=4 mitigations=off")
    printf '%s\n' "${qemu[*]}" >"$console"
    start=$SECONDS
    timeout -k 10 "$timeout_s" "${qemu[@]}" </dev/null >>"$console" 2>&1 &
    qemu_pid=$!
    if [ -n "${RINGFENCE_MATRIX_VERBOSE:-}" ]; then
        tail -n +2 -f --pid="$qemu_pid" "$console" >&2 &
    fi
    status=0
    wait "$qemu_pid" || status=$?
    qemu_pid=""
    wait # for tail
    secs=$((SECONDS - start))
    rm -f "$work/scratch.img"

    # Read the console: counts on the first line, then what to print.
    python3 - "$console" "$kver" "$secs" "$status" "$timeout_s" "${names[@]}" \
        >"$work/report" <<'EOF'
import re, sys
console, kver, secs, status, limit = sys.argv[1:6]
names = sys.argv[6:]
lines = open(console, errors="replace").read().replace("\r", "").split("\n")
booted = done = False
setup = None
section = {}
cur = None
for line in lines:
    if "RINGFENCE-MATRIX-BOOTED" in line:
        booted = True
    m = re.search(r"RINGFENCE-MATRIX-SETUP-FAILED (.*)", line)
    if m:
        setup = m.group(1)
    m = re.search(r"RINGFENCE-MATRIX-BEGIN (\S+)", line)
    if m:
        cur = m.group(1)
        section[cur] = {"lines": [], "rc": None, "secs": None}
        continue
    m = re.search(r"RINGFENCE-MATRIX-END (\S+) rc=(\d+) secs=(\d+)", line)
    if m and m.group(1) in section:
        section[m.group(1)]["rc"] = int(m.group(2))
        section[m.group(1)]["secs"] = int(m.group(3))
        cur = None
        continue
    if "RINGFENCE-MATRIX-DONE" in line:
        done = True
    if cur:
        section[cur]["lines"].append(line)

passed = failed = 0
parts, problems = [], []
unfinished = False
for n in names:
    s = section.get(n)
    if s is None:
        parts.append(f"{n} not run")
        continue
    p = f = 0
    summary = False
    failures = []
    for l in s["lines"]:
        m = re.search(r"test result: \S+ (\d+) passed; (\d+) failed", l)
        if m:
            summary = True
            p += int(m.group(1))
            f += int(m.group(2))
        m = re.match(r"test (\S+) \.\.\. FAILED", l)
        if m and m.group(1) not in failures:
            failures.append(m.group(1))
    for i, t in enumerate(failures):
        if i >= 3:
            problems.append((f"{n} {t}", []))
            continue
        # The test's captured output, "---- NAME stdout ----" up to the next section, for the
        # first three failures of a binary; the log has all of them.
        detail, grab = [], False
        for l in s["lines"]:
            if l == f"---- {t} stdout ----":
                grab = True
                continue
            if grab:
                if l.startswith("---- ") or l in ("failures:", "successes:"):
                    break
                detail.append(l)
        while detail and not detail[0].strip():
            detail.pop(0)
        while detail and not detail[-1].strip():
            detail.pop()
        if len(detail) > 15:
            detail = detail[:15] + [f"... ({len(detail) - 15} more lines in the log)"]
        problems.append((f"{n} {t}", detail))
    f = max(f, len(failures))
    if not summary:
        p = sum(1 for l in s["lines"] if re.match(r"test \S+ \.\.\. ok$", l))
    if s["rc"] is None:
        unfinished = True
        last = [l for l in s["lines"] if l.strip()][-3:]
        problems.append((f"{n}: did not finish", last))
        f += 1
    elif not summary:
        problems.append((f"{n}: exited with status {s['rc']} and no libtest summary",
                         [l for l in s["lines"] if l.strip()][-5:]))
        f += 1
    elif s["rc"] != 0 and f == 0:
        problems.append((f"{n}: exited with status {s['rc']} although no test failed", []))
        f += 1
    passed += p
    failed += f
    parts.append(f"{n} {p}" + (f" + {f} failed" if f else ""))

why = None
if status in ("124", "137"):
    why = f"the guest ran past the {limit} s timeout (killed)"
elif not booted:
    why = f"the guest did not boot (no RINGFENCE-MATRIX-BOOTED on its console; QEMU exit status {status})"
elif setup:
    why = f"the guest could not be set up: {setup}"
elif not done:
    why = f"the guest stopped before the end (QEMU exit status {status})"
if why:
    if not unfinished:
        failed += 1
    problems.insert(0, (why, []))

print(passed, failed)
print(f"kernel-matrix: {kver}: {passed} passed, {failed} failed ({', '.join(parts)}) in {secs} s")
for what, detail in problems:
    print(f"kernel-matrix: FAILED on {kver}: {what}")
    for l in detail:
        print(f"    {l}")
EOF
    read -r p f <"$work/report"
    total_passed=$((total_passed + p))
    total_failed=$((total_failed + f))
    sed 1d "$work/report"
    if [ "$f" != 0 ]; then
        any_failed=1
        echo "kernel-matrix: console of $kver (last 40 lines; all of it in $console):"
        tail -n 40 "$console" | tr -d '\r' | sed 's/^/    | /'
    else
        echo "kernel-matrix: console of $kver: $console"
    fi
done

echo "kernel-matrix: $total_passed passed, $total_failed failed"
[ "$any_failed" = 0 ] || exit 1
