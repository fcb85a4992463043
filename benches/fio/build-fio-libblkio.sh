#!/usr/bin/env bash
# Build a fio with the libblkio engine (fio >= 3.34, libblkio 1.x) into a cache shared by all
# worktrees, and print the path of the binary on stdout:
#
#   $ benches/fio/build-fio-libblkio.sh
#   /root/.cache/ringfence-bench/fio-libblkio/bin/fio
#
# Debian bookworm's fio 3.33 has no libblkio engine, and bookworm has no libblkio at all, so
# both come from newer Debian suites: the binary packages libblkio1 and libblkio-dev of trixie
# (libblkio1 needs only libc6 >= 2.34) are downloaded and extracted into the cache, not
# installed, and fio is built from the upstream tarball of a Debian source package `fio` (the
# newest of trixie's and sid's that the mirror serves, checked against the SHA-256 of the signed
# source index) against them, with an rpath to the extracted library (no LD_LIBRARY_PATH
# needed). The host's /etc/apt and dpkg database are left alone: the package lists live in a
# private apt state in the cache. Build tools that are missing
# (gcc, make, pkg-config) are installed with the host's apt-get.
#
# Nothing is done when the binary is already there and answers `--enghelp=libblkio`; remove
# the cache directory (or set RINGFENCE_FIO_REBUILD=1) to build again. blkbench
# (`--fio-libblkio auto`, the default) runs this script when it finds no binary.
#
# Environment:
#   RINGFENCE_BENCH_CACHE   cache root (default $HOME/.cache/ringfence-bench); the build lands
#                           in its fio-libblkio/ directory: bin/fio, libblkio/ (extracted
#                           packages), apt/ (private apt state), src/ (fio's sources, removed
#                           after the build)
#   RINGFENCE_FIO_MIRROR    Debian mirror (default http://deb.debian.org/debian)
#   RINGFENCE_FIO_SUITE     suite to take libblkio from (default trixie)
#   RINGFENCE_FIO_SRC_SUITES suites whose fio sources may be used, separated by spaces
#                           (default "trixie sid"; the newest version the mirror serves wins)
#   RINGFENCE_FIO_REBUILD=1 build again even if the binary is there
#
# Progress goes to stderr; stdout carries only the binary's path. Exit status 0 on success,
# 1 on failure.
set -Eeuo pipefail
trap 'printf "build-fio-libblkio: ERROR: unexpected failure (status %s) at line %s: %s\n" \
    "$?" "$LINENO" "$BASH_COMMAND" >&2' ERR

log() { printf 'build-fio-libblkio: %s\n' "$*" >&2; }
die() {
    printf 'build-fio-libblkio: ERROR: %s\n' "$*" >&2
    exit 1
}

cache_root=${RINGFENCE_BENCH_CACHE:-${HOME:-/root}/.cache/ringfence-bench}
mirror=${RINGFENCE_FIO_MIRROR:-http://deb.debian.org/debian}
suite=${RINGFENCE_FIO_SUITE:-trixie}
src_suites=${RINGFENCE_FIO_SRC_SUITES:-trixie sid}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg

mkdir -p "$cache_root/fio-libblkio"
dir=$(cd "$cache_root/fio-libblkio" && pwd)
fio_bin=$dir/bin/fio

built() {
    [ -x "$fio_bin" ] && "$fio_bin" --enghelp=libblkio >/dev/null 2>&1
}

if [ -z "${RINGFENCE_FIO_REBUILD:-}" ] && built; then
    printf '%s\n' "$fio_bin"
    exit 0
fi

# One build at a time per cache (several worktrees may run blkbench at once).
exec 9>"$dir/.lock"
if ! flock -n 9; then
    log "another build holds $dir/.lock; waiting for it"
    flock 9
fi
if [ -z "${RINGFENCE_FIO_REBUILD:-}" ] && built; then
    printf '%s\n' "$fio_bin"
    exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/ringfence-fio-build.XXXXXX")
# shellcheck disable=SC2317 # called through the trap
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
# Build tools, from the host's own apt sources.
# ---------------------------------------------------------------------------------------------
missing=()
for t in gcc:gcc make:make pkg-config:pkg-config curl:curl dpkg-deb:dpkg; do
    command -v "${t%%:*}" >/dev/null 2>&1 || missing+=("${t#*:}")
done
[ -r "$keyring" ] || missing+=(debian-archive-keyring)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing build tools: ${missing[*]}"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >"$work/apt-install.log" 2>&1; then
        log "apt-get install failed; running apt-get update first"
        apt-get update -q >"$work/apt-install.log" 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >>"$work/apt-install.log" 2>&1 || {
            tail -n 20 "$work/apt-install.log" >&2
            die "could not install ${missing[*]} (see above)"
        }
    fi
fi

# ---------------------------------------------------------------------------------------------
# A private apt state with the suite's binary and source indexes.
# ---------------------------------------------------------------------------------------------
apt_dir=$dir/apt
mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
apt_opts=(-o "Dir::State=$apt_dir" -o "Dir::State::Lists=$apt_dir/lists"
    -o "Dir::Cache=$apt_dir/cache" -o "Dir::Etc::SourceList=$apt_dir/sources.list"
    -o "Dir::Etc::SourceParts=/nonexistent" -o "Dir::State::status=/var/lib/dpkg/status"
    -o "APT::Sandbox::User=root" -o "Acquire::Languages=none")
sources=$(
    printf 'deb [signed-by=%s] %s %s main\n' "$keyring" "$mirror" "$suite"
    for s in $src_suites; do
        printf 'deb-src [signed-by=%s] %s %s main\n' "$keyring" "$mirror" "$s"
    done
)
if [ ! -s "$apt_dir/sources.list" ] || [ "$(cat "$apt_dir/sources.list")" != "$sources" ]; then
    printf '%s\n' "$sources" >"$apt_dir/sources.list"
fi
log "refreshing the $suite/$src_suites package lists (private apt state in $apt_dir)"
if ! apt-get "${apt_opts[@]}" -q update --error-on=any >"$work/apt-update.log" 2>&1; then
    tail -n 20 "$work/apt-update.log" >&2
    die "apt-get update of the $suite lists failed (see above; set RINGFENCE_FIO_MIRROR for" \
        "another mirror)"
fi

# ---------------------------------------------------------------------------------------------
# libblkio: the binary packages, extracted (not installed).
# ---------------------------------------------------------------------------------------------
mkdir -p "$work/debs"
log "downloading libblkio1 and libblkio-dev from $suite"
if ! (cd "$work/debs" && apt-get "${apt_opts[@]}" -q download libblkio1 libblkio-dev) \
    >"$work/apt-download.log" 2>&1; then
    tail -n 20 "$work/apt-download.log" >&2
    die "could not download libblkio1/libblkio-dev from $suite"
fi
rm -rf "$dir/libblkio"
mkdir -p "$dir/libblkio"
for deb in "$work"/debs/*.deb; do
    log "extracting $(basename "$deb")"
    dpkg-deb -x "$deb" "$dir/libblkio"
done
prefix=$dir/libblkio/usr
pc=$(find "$prefix" -name blkio.pc -print -quit)
[ -n "$pc" ] || die "no blkio.pc in the extracted libblkio-dev"
pc_dir=$(dirname "$pc")
lib_dir=$(dirname "$pc_dir")
[ -e "$lib_dir/libblkio.so" ] || die "no libblkio.so in $lib_dir"
# The .pc file names prefix=/usr: point it at the extracted tree (pkg-config's own
# --define-prefix would do too, but this works with every pkg-config).
sed -i "s|^prefix=.*|prefix=$prefix|" "$pc"
log "libblkio $(PKG_CONFIG_PATH=$pc_dir pkg-config --modversion blkio) in $lib_dir"

# ---------------------------------------------------------------------------------------------
# fio: the upstream tarball of a Debian source package (the newest one among the suites' source
# indexes that the mirror serves; Debian's patches, packaging only, are not needed), checked
# against the SHA-256 of the signed index.
# ---------------------------------------------------------------------------------------------
apt-cache "${apt_opts[@]}" showsrc fio >"$work/showsrc" 2>/dev/null ||
    die "no source package fio in the $src_suites source indexes"
# One line per source record: "<version> <directory> <sha256> <file>" for its orig tarball.
awk '
    /^Package: /          { ver = ""; dir = ""; sha = ""; file = ""; in_sha = 0 }
    /^Version: /          { ver = $2 }
    /^Directory: /        { dir = $2 }
    /^Checksums-Sha256:/  { in_sha = 1; next }
    /^[^ ]/               { in_sha = 0 }
    in_sha && $3 ~ /^fio_.*\.orig\.tar\.[a-z0-9]+$/ { sha = $1; file = $3 }
    /^$/ { if (ver != "" && sha != "") print ver, dir, sha, file; ver = "" }
    END  { if (ver != "" && sha != "") print ver, dir, sha, file }
' "$work/showsrc" | sort -u -V -r -k1,1 >"$work/candidates"
[ -s "$work/candidates" ] || die "no fio upstream tarball in the $src_suites source indexes"
orig="" version=""
while read -r ver pool_dir sha file; do
    log "downloading $file (fio $ver)"
    if curl -fsS --retry 2 -m 300 -o "$work/$file" "$mirror/$pool_dir/$file" 2>"$work/curl.log"; then
        if [ "$(sha256sum "$work/$file" | cut -d' ' -f1)" = "$sha" ]; then
            orig=$work/$file
            version=${ver%-*}
            break
        fi
        log "$file does not match the SHA-256 of the index; trying another version"
    else
        log "$file: $(tail -n 1 "$work/curl.log"); trying another version"
    fi
done <"$work/candidates"
[ -n "$orig" ] || die "the mirror serves none of the fio source tarballs of the $src_suites" \
    "indexes ($(cut -d' ' -f1 "$work/candidates" | tr '\n' ' '))"
rm -rf "$dir/src"
mkdir -p "$dir/src"
tar -xf "$orig" -C "$dir/src" --strip-components=1

log "building fio $version with libblkio (a minute or so)"
cd "$dir/src"
if ! PKG_CONFIG_PATH=$pc_dir \
    CFLAGS="-I$prefix/include" \
    LDFLAGS="-L$lib_dir -Wl,-rpath,$lib_dir" \
    ./configure --prefix="$dir" --disable-native >"$work/configure.log" 2>&1; then
    tail -n 30 "$work/configure.log" >&2
    die "fio's configure failed (see above)"
fi
if ! grep -Eq "^libblkio engine +yes" "$work/configure.log"; then
    grep -Ei 'blkio' "$work/configure.log" >&2 || true
    die "fio's configure did not enable libblkio"
fi
if ! make -j"$(nproc)" >"$work/make.log" 2>&1; then
    tail -n 30 "$work/make.log" >&2
    die "building fio failed (see above)"
fi
mkdir -p "$dir/bin"
install -m 0755 fio "$fio_bin.tmp"
mv -f "$fio_bin.tmp" "$fio_bin"
# The sources are not needed any more; keep the cache small.
cd "$dir"
rm -rf "$dir/src"

if ! "$fio_bin" --enghelp=libblkio >"$work/enghelp.log" 2>&1; then
    cat "$work/enghelp.log" >&2
    die "the built fio does not know the libblkio engine"
fi
log "built $("$fio_bin" --version) with libblkio $(PKG_CONFIG_PATH=$pc_dir pkg-config --modversion blkio)"
printf '%s\n' "$fio_bin"
