#!/usr/bin/env bash
# Run every cargo-fuzz target of ringfence briefly, starting from the seed corpora.
# Fails if a target does not build or if any target finds a crash (the input is left in
# fuzz/artifacts/<target>/).
#
# Usage: fuzz/run.sh [SECONDS_PER_TARGET (default 20)] [TARGET...]
#
# Works on a stable toolchain: cargo-fuzz passes nightly-only flags (-Zsanitizer=address and
# friends), which stable rustc accepts with RUSTC_BOOTSTRAP=1. Installs cargo-fuzz if missing.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cd "$here"

secs=${1:-20}
if [ $# -gt 0 ]; then shift; fi
case $secs in
'' | *[!0-9]*)
	echo "run.sh: SECONDS must be a whole number, got '$secs'" >&2
	exit 2
	;;
esac

export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
	echo "run.sh: installing cargo-fuzz" >&2
	cargo install cargo-fuzz --locked
fi

if [ $# -gt 0 ]; then
	targets=("$@")
else
	mapfile -t targets < <(cargo fuzz list)
fi
if [ ${#targets[@]} -eq 0 ]; then
	echo "run.sh: no fuzz targets found" >&2
	exit 1
fi

# New inputs the fuzzer finds go to a scratch directory, never into the committed seeds.
work=$(mktemp -d "${TMPDIR:-/tmp}/ringfence-fuzz.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Build everything first, so a build failure is reported as such.
for t in "${targets[@]}"; do
	cargo fuzz build "$t"
done

failed=()
for t in "${targets[@]}"; do
	mkdir -p "$work/$t" "artifacts/$t"
	echo "=== $t: ${secs}s from corpus/$t" >&2
	# -timeout: an input taking longer than 10 s is reported as a hang (a failure).
	if ! cargo fuzz run "$t" "$work/$t" "corpus/$t" -- \
		-max_total_time="$secs" -timeout=10 -rss_limit_mb=4096 -print_final_stats=1; then
		failed+=("$t")
	fi
done

if [ ${#failed[@]} -gt 0 ]; then
	echo "run.sh: FAILED: ${failed[*]} (crashing inputs in fuzz/artifacts/)" >&2
	exit 1
fi
echo "run.sh: all targets ran ${secs}s without a crash: ${targets[*]}" >&2
