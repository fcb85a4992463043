#!/usr/bin/env bash
# Install the Debian packages named on the command line that are not installed yet (as root, or
# through `sudo -n`), keeping QEMU's packages consistent. Idempotent: with everything present it
# only checks.
#
#   guest-tests/qemu/install-host-packages.sh qemu-system-x86 qemu-utils fio ...
#
# QEMU: qemu-system-x86, qemu-system-common and qemu-utils are built from one source package and
# must have one version. Machines of this project's kind come with a backported qemu-utils
# (e.g. 1:10.0.2+ds-2+deb13u1~bpo12+1) while their apt sources have only bookworm; that
# qemu-utils Breaks qemu-system-common (<< 1:8.0+dfsg-5~), so a plain
# `apt-get install qemu-system-x86 qemu-system-common` fails ("held broken packages") or, without
# qemu-utils on the command line, removes qemu-utils and with it qemu-img and
# qemu-storage-daemon. So whenever a QEMU package is missing, all three are installed together,
# and at the version apt offers for qemu-system-x86 (QEMU 7.2 on bookworm, which the project
# uses, qemu-storage-daemon included) with --allow-downgrades when the installed qemu-utils is
# another version or a plain install fails. Nothing is downgraded otherwise.
#
# Exit status 0 when every package is installed afterwards; 1 with the command to run otherwise.
set -euo pipefail

log() { printf 'install-host-packages: %s\n' "$*" >&2; }
die() { printf 'install-host-packages: ERROR: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        return 1
    fi
}

installed() {
    dpkg-query -W -f='${Status}\n' "$1" 2>/dev/null | grep -q '^install ok installed$'
}
installed_version() {
    dpkg-query -W -f='${Version}' "$1" 2>/dev/null
}
candidate() {
    apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" && $2 != "(none)" { print $2 }'
}

qemu_pkgs=(qemu-system-x86 qemu-system-common qemu-utils)
wanted=()
qemu_missing=0
for p in "$@"; do
    if ! installed "$p"; then
        wanted+=("$p")
        case "$p" in qemu-system-x86 | qemu-system-common | qemu-utils) qemu_missing=1 ;; esac
    fi
done
[ "${#wanted[@]}" -gt 0 ] || exit 0

# All three QEMU packages, plain (apt chooses the versions), when any of them is missing.
plain=()
for p in "${wanted[@]}"; do
    case "$p" in qemu-system-x86 | qemu-system-common | qemu-utils) ;; *) plain+=("$p") ;; esac
done
if [ "$qemu_missing" = 1 ]; then
    plain+=("${qemu_pkgs[@]}")
fi

# The same, with the QEMU packages at the version apt offers for qemu-system-x86. A package's
# binNMU suffix (+bN) may differ from qemu-system-x86's; take the version of the same upload.
pinned() {
    local v base p pv
    v=$(candidate qemu-system-x86)
    [ -n "$v" ] || return 1
    base=${v%+b[0-9]*}
    printf '%s\n' --allow-downgrades
    for p in "${plain[@]}"; do
        case "$p" in
        qemu-system-x86 | qemu-system-common | qemu-utils)
            pv=$(apt-cache madison "$p" 2>/dev/null | awk -F'|' -v v="$v" -v b="$base" '
                { gsub(/ /, "", $2) }
                $2 == v { exact = $2 }
                { s = $2; sub(/\+b[0-9]+$/, "", s); if (s == b && !near) near = $2 }
                END { print (exact != "" ? exact : near) }')
            [ -n "$pv" ] || return 1
            printf '%s\n' "$p=$pv"
            ;;
        *) printf '%s\n' "$p" ;;
        esac
    done
}

apt_install() {
    log "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "$@" >&2
}

updated=0
update() {
    [ "$updated" = 0 ] || return 0
    updated=1
    log "updating the package lists"
    as_root apt-get update -q >&2 || log "apt-get update failed; going on with the lists there are"
}

# A fresh machine may have no package lists at all.
for p in "${plain[@]}"; do
    if [ -z "$(candidate "$p")" ]; then
        update
        break
    fi
done

# Install; a QEMU install goes pinned right away when the installed qemu-utils is not the
# version that goes with qemu-system-x86 (a backport), and falls back to pinned when a plain
# install fails.
need_pin=0
if [ "$qemu_missing" = 1 ] && installed qemu-utils; then
    cur=$(installed_version qemu-utils)
    want=$(candidate qemu-system-x86)
    if [ -n "$want" ] && [ "${cur%+b[0-9]*}" != "${want%+b[0-9]*}" ]; then
        log "qemu-utils $cur is installed, qemu-system-x86 would be $want: installing QEMU's" \
            "packages at that version (downgrading qemu-utils)"
        need_pin=1
    fi
fi

try_install() {
    local args
    if [ "$need_pin" = 1 ]; then
        args=$(pinned) || return 1
        # shellcheck disable=SC2086 # one package (or option) a line, no spaces in any
        apt_install $args
    else
        apt_install "${plain[@]}"
    fi
}

if ! try_install; then
    update
    if ! try_install; then
        if [ "$qemu_missing" = 1 ] && [ "$need_pin" = 0 ]; then
            log "plain install failed; retrying with QEMU's packages at qemu-system-x86's version"
            need_pin=1
            try_install || true
        fi
    fi
fi

still=()
for p in "$@"; do
    installed "$p" || still+=("$p")
done
if [ "${#still[@]}" -gt 0 ]; then
    if [ "$qemu_missing" = 1 ]; then
        others=()
        for p in "${still[@]}"; do
            case "$p" in qemu-system-x86 | qemu-system-common | qemu-utils) ;; *) others+=("$p") ;; esac
        done
        die "could not install ${still[*]}; as root, run: apt-get install" \
            "--no-install-recommends --allow-downgrades qemu-system-x86 qemu-system-common" \
            "qemu-utils/bookworm ${others[*]} (qemu-utils/<your release> elsewhere)"
    fi
    die "could not install ${still[*]}; as root, run: apt-get install --no-install-recommends" \
        "${still[*]}"
fi
