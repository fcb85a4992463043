#!/usr/bin/env bash
# Prepare everything the QEMU guest tests need, idempotently:
#   - host tools: qemu-system-x86_64, qemu-storage-daemon, fio, busybox-static, cpio, kmod, ...
#     (installed with apt-get when missing; CI starts from a clean machine);
#   - a Debian cloud kernel (apt-get download + dpkg-deb -x, nothing installed on the host);
#   - an initramfs: busybox-static, the virtio modules in dependency order, fio and
#     util-linux's blkdiscard with their shared libraries, holdbuf (holdbuf.c, built here
#     statically with the host's cc; the migration test's guest helper) and guest-init.sh as
#     /init;
#   - which accelerator boots that kernel here (KVM where it works, TCG otherwise).
#
# Everything lands in a cache directory outside the repository:
#   ${RINGFENCE_GUEST_CACHE:-$HOME/.cache/ringfence-guest}
# A second run with nothing changed does nothing but print the result. The result is printed on
# stdout (and kept in $cache/assets.env) as shell assignments:
#   RINGFENCE_GUEST_KERNEL=...  RINGFENCE_GUEST_INITRD=...  RINGFENCE_GUEST_ACCEL=...
# Progress goes to stderr.
#
# Environment:
#   RINGFENCE_GUEST_CACHE        cache directory (see above)
#   RINGFENCE_GUEST_KERNEL_PKG   kernel package to use (default: the newest
#                                linux-image-6.1.0-N-cloud-amd64 apt knows, kept once chosen)
#   RINGFENCE_GUEST_ACCEL        tcg | kvm | auto (default auto: probe KVM once, cache the answer)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${RINGFENCE_GUEST_CACHE:-${HOME:-/root}/.cache/ringfence-guest}
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)

log() { printf 'prepare-assets: %s\n' "$*" >&2; }
die() { printf 'prepare-assets: ERROR: %s\n' "$*" >&2; exit 1; }

# One preparer at a time (parallel test binaries, several developers' shells).
exec 9>"$cache/.lock"
flock 9
# Leftovers of an interrupted earlier run (nobody else works here while we hold the lock).
find "$cache" -maxdepth 1 \( -name '.kernel.*' -o -name '.initramfs.*' -o -name '*.cpio.tmp' \) \
    -exec rm -rf {} +

# ---------------------------------------------------------------------------------------------
# Host packages.
# ---------------------------------------------------------------------------------------------
as_root() {
    if [ "$(id -u)" = 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo -n "$@"
    else
        return 1
    fi
}

# install-host-packages.sh installs what is missing and keeps QEMU's packages at one version: on
# machines that carry a backported qemu-utils, installing bookworm's qemu-system-x86 either
# fails ("held broken packages") or removes qemu-utils (and with it qemu-img and
# qemu-storage-daemon); it installs bookworm's qemu-utils with it, downgrading only then.
wanted_pkgs=(qemu-system-x86 qemu-system-common qemu-utils fio busybox-static util-linux cpio kmod
    xz-utils zstd gcc libc6-dev)
"$here/install-host-packages.sh" "${wanted_pkgs[@]}" ||
    die "could not install the host packages the guest tests need (see above)"
for c in qemu-system-x86_64 qemu-storage-daemon fio busybox cpio modinfo blkdiscard dpkg-deb \
    ldd ldconfig cc; do
    command -v "$c" >/dev/null 2>&1 || die "$c not found after installing packages"
done
qemu-system-x86_64 --version >/dev/null ||
    die "qemu-system-x86_64 does not run: apt-get install --reinstall qemu-system-x86"
# busybox-static's binary (it conflicts with the dynamic busybox package, so this is the static one).
busybox_bin=/bin/busybox
if ldd "$busybox_bin" >/dev/null 2>&1; then
    die "$busybox_bin is dynamically linked: apt-get install busybox-static"
fi

# ---------------------------------------------------------------------------------------------
# Kernel.
# ---------------------------------------------------------------------------------------------
newest_cloud_kernel() {
    apt-cache pkgnames linux-image-6.1.0- 2>/dev/null |
        grep -E '^linux-image-6\.1\.0-[0-9]+-cloud-amd64$' | sort -V | tail -n 1
}

kpkg=${RINGFENCE_GUEST_KERNEL_PKG:-}
if [ -z "$kpkg" ] && [ -s "$cache/kernel-pkg" ] && [ -d "$cache/kernel/$(cat "$cache/kernel-pkg")" ]; then
    kpkg=$(cat "$cache/kernel-pkg")
fi
if [ -z "$kpkg" ]; then
    kpkg=$(newest_cloud_kernel)
    if [ -z "$kpkg" ]; then
        as_root apt-get update >&2 || true
        kpkg=$(newest_cloud_kernel)
    fi
    [ -n "$kpkg" ] || die "apt knows no linux-image-6.1.0-*-cloud-amd64 package"
fi
case "$kpkg" in
*[!A-Za-z0-9.+_-]*) die "odd kernel package name '$kpkg'" ;;
esac

kdir=$cache/kernel/$kpkg
if [ ! -d "$kdir" ]; then
    log "downloading $kpkg"
    tmp=$(mktemp -d "$cache/.kernel.XXXXXX")
    (cd "$tmp" && apt-get download -o APT::Sandbox::User=root "$kpkg" >&2) ||
        die "apt-get download $kpkg failed"
    mkdir "$tmp/x"
    dpkg-deb -x "$tmp"/*.deb "$tmp/x"
    mkdir -p "$cache/kernel"
    rm -f "$tmp"/*.deb
    mv "$tmp/x" "$kdir"
    rmdir "$tmp"
fi
printf '%s\n' "$kpkg" >"$cache/kernel-pkg"

vmlinuz=$(find "$kdir/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n 1)
kconfig=$(find "$kdir/boot" -maxdepth 1 -name 'config-*' | head -n 1)
if [ -z "$vmlinuz" ] || [ -z "$kconfig" ]; then
    die "$kdir has no boot/vmlinuz-* and boot/config-*"
fi
kver=${vmlinuz##*/vmlinuz-}
moddir=$kdir/lib/modules/$kver
[ -d "$moddir" ] || die "no modules for $kver in $kdir"

# ---------------------------------------------------------------------------------------------
# Is the initramfs up to date? It depends on this script, the guest's init, the kernel and the
# versions of the packages copied into it.
# ---------------------------------------------------------------------------------------------
stamp=$({
    sha256sum "$here/prepare-assets.sh" "$here/guest-init.sh" "$here/holdbuf.c" | cut -d' ' -f1
    printf '%s\n' "$kpkg"
    dpkg-query -W -f='${Package} ${Version}\n' fio busybox-static util-linux libc6 libc6-dev
} | sha256sum | cut -d' ' -f1)
initrd=$cache/initramfs-$stamp.cpio

if [ ! -s "$initrd" ]; then
    log "building the initramfs for $kver"
    root=$(mktemp -d "$cache/.initramfs.XXXXXX")
    trap 'rm -rf "$root"' EXIT
    # Merged-/usr layout, like the host, so that library paths from ldd work unchanged.
    mkdir -p "$root"/{usr/bin,usr/sbin,usr/lib,usr/lib64,proc,sys,dev,tmp,etc,mnt}
    ln -s usr/bin "$root/bin"
    ln -s usr/sbin "$root/sbin"
    ln -s usr/lib "$root/lib"
    ln -s usr/lib64 "$root/lib64"

    cp "$busybox_bin" "$root/usr/bin/busybox"
    "$busybox_bin" --list-full | while read -r applet; do
        dest=$root/${applet}
        [ -e "$dest" ] || [ -L "$dest" ] || ln -s /usr/bin/busybox "$dest"
    done

    # Dynamic programs and every library they load (and the loader itself).
    copy_with_libs() {
        local prog=$1 dest=$2 lib
        rm -f "$root$dest"
        cp -L "$prog" "$root$dest"
        ldd "$prog" | awk '/=> \// { print $3 } /^[[:space:]]*\// { print $1 }' |
            while read -r lib; do
                [ -e "$root$lib" ] && continue
                mkdir -p "$root$(dirname "$lib")"
                cp -L "$lib" "$root$lib"
            done
    }
    copy_with_libs "$(command -v fio)" /usr/bin/fio
    # busybox's blkdiscard has no -z (write zeroes): use util-linux's.
    copy_with_libs "$(command -v blkdiscard)" /usr/sbin/blkdiscard
    # The migration test's helper: static, so it needs nothing else in the guest.
    cc -O2 -Wall -Werror -static -pthread -o "$root/usr/bin/holdbuf" "$here/holdbuf.c" ||
        die "building holdbuf.c failed"
    printf '/usr/lib/x86_64-linux-gnu\n/usr/lib/x86_64-linux-gnu/ceph\n' >"$root/etc/ld.so.conf"
    ldconfig -r "$root" 2>/dev/null || true

    # Modules: virtio_pci and virtio_blk with everything they depend on, dependencies first.
    mkdir -p "$root/usr/lib/modules/ringfence"
    order=()
    declare -A seen=()
    module_file() {
        local n=$1 alt
        alt=${n//_/-}
        find "$moddir/kernel" \( -name "$n.ko*" -o -name "$alt.ko*" \) -print -quit
    }
    builtin() {
        local n=$1
        grep -qE "/(${n}|${n//_/-})\.ko$" "$moddir/modules.builtin"
    }
    add_module() {
        local n=$1 f dep
        [ -n "${seen[$n]:-}" ] && return 0
        seen[$n]=1
        builtin "$n" && return 0
        f=$(module_file "$n")
        [ -n "$f" ] || die "module $n is neither built into $kver nor shipped as a file"
        for dep in $(modinfo -F depends "$f" | tr ',' ' '); do
            add_module "$dep"
        done
        case "$f" in
        *.ko) cp "$f" "$root/usr/lib/modules/ringfence/$n.ko" ;;
        *.ko.xz) xz -dc "$f" >"$root/usr/lib/modules/ringfence/$n.ko" ;;
        *.ko.zst) zstd -qdc "$f" >"$root/usr/lib/modules/ringfence/$n.ko" ;;
        *.ko.gz) gzip -dc "$f" >"$root/usr/lib/modules/ringfence/$n.ko" ;;
        *) die "unknown module file $f" ;;
        esac
        order+=("$n")
    }
    add_module virtio_pci
    add_module virtio_blk
    printf '%s\n' "${order[@]}" >"$root/etc/ringfence-modules"
    log "modules, in load order: ${order[*]:-(all built in)}"

    cp "$here/guest-init.sh" "$root/init"
    chmod 0755 "$root/init"

    # Uncompressed: under TCG the kernel copies an uncompressed archive faster than it inflates a
    # compressed one.
    (cd "$root" && find . -print0 | LC_ALL=C sort -z |
        cpio --null --create --format=newc --owner=0:0 --quiet) >"$initrd.tmp"
    mv "$initrd.tmp" "$initrd"
    rm -rf "$root"
    trap - EXIT
    # Drop archives of earlier versions.
    find "$cache" -maxdepth 1 -name 'initramfs-*.cpio' ! -name "initramfs-$stamp.cpio" -delete
fi

# ---------------------------------------------------------------------------------------------
# Accelerator. The nested (paravirtual) KVM of the machines this project runs on accepts
# -accel kvm but hangs early in the boot of stock kernels, so the default is to probe once: boot
# the test guest under KVM with a short timeout; if it does not come up, use TCG (about 3 s to
# boot this guest). The answer is cached per host kernel, QEMU version and guest kernel.
# ---------------------------------------------------------------------------------------------
accel=${RINGFENCE_GUEST_ACCEL:-auto}
case "$accel" in
tcg | kvm) ;;
auto)
    qver=$(qemu-system-x86_64 --version | head -n 1)
    key=$(printf '%s\n' "$(uname -r)" "$qver" "$kpkg" | sha256sum | cut -c1-16)
    probe=$cache/accel-$key
    if [ ! -s "$probe" ]; then
        find "$cache" -maxdepth 1 -name 'accel-*' -delete
        accel=tcg
        if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
            log "probing whether KVM boots the guest (up to 30 s)"
            if timeout -s KILL 30 qemu-system-x86_64 -accel kvm -machine q35 -cpu host -m 256M \
                -nodefaults -display none -no-reboot -serial stdio \
                -kernel "$vmlinuz" -initrd "$initrd" \
                -append "console=ttyS0 panic=-1 loglevel=4 rf_scenario=probe" </dev/null 2>&1 |
                grep -q 'RINGFENCE-DONE'; then
                accel=kvm
            fi
        fi
        log "accelerator: $accel"
        printf '%s\n' "$accel" >"$probe"
    fi
    accel=$(cat "$probe")
    ;;
*) die "RINGFENCE_GUEST_ACCEL must be tcg, kvm or auto, not '$accel'" ;;
esac

{
    printf 'RINGFENCE_GUEST_KERNEL=%s\n' "$vmlinuz"
    printf 'RINGFENCE_GUEST_INITRD=%s\n' "$initrd"
    printf 'RINGFENCE_GUEST_ACCEL=%s\n' "$accel"
} >"$cache/assets.env.tmp"
mv "$cache/assets.env.tmp" "$cache/assets.env"
cat "$cache/assets.env"
