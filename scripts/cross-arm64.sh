#!/usr/bin/env bash
# Cross-compiles the release binaries (mailroute-relay, mailroute-operator) for linux/arm64
# (aarch64-unknown-linux-gnu) on an x86_64 Debian/Ubuntu machine, the way the Dockerfile's build
# stage does for `docker buildx build --platform linux/arm64`, so that a dependency that does not
# build or link for arm64 (C code in aws-lc-sys and ring among them) shows up here first.
# Then checks what came out: an aarch64 ELF executable for GNU/Linux, dynamically linked only
# against glibc (plus libgcc_s), needing no glibc newer than Debian 12's 2.36 (the distroless
# cc-debian12 base image); with qemu-aarch64 installed (Debian's qemu-user), runs `--version` of
# each.
#
# Measured on the shared 2-core machine (load average ~17, under nice -n 10): a cold release build
# took 2871 s (48 min; 12.5 min of CPU); both binaries came out aarch64, needing only libc, libm
# and libgcc_s with GLIBC_2.34 at most, and ran under qemu-aarch64.
#
# Needs: rustup (adds the target's std once: `rustup target add aarch64-unknown-linux-gnu`) and
# Debian's gcc-aarch64-linux-gnu + libc6-dev-arm64-cross (installed with apt-get when missing and
# running as root). Not part of the CI test command: a cold release build takes long on 2 cores.
# Usage: scripts/cross-arm64.sh   (output in target/aarch64-unknown-linux-gnu/release/)
set -euo pipefail
cd "$(dirname "$0")/.."

target=aarch64-unknown-linux-gnu
if ! rustup target list --installed | grep -qx "$target"; then
  rustup target add "$target"
fi
if ! command -v aarch64-linux-gnu-gcc >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "install the cross compiler first: apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross" >&2
    exit 1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gcc-aarch64-linux-gnu libc6-dev-arm64-cross >/dev/null
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar

start=$(date +%s)
cargo build --release --locked --target "$target" -p mailroute-relay -p mailroute-operator
echo "cross build: $(( $(date +%s) - start )) s"

status=0
for bin in mailroute-relay mailroute-operator; do
  path="target/$target/release/$bin"
  header="$(aarch64-linux-gnu-readelf -h "$path")"
  if ! grep -q 'Machine:.*AArch64' <<<"$header" || ! grep -q 'Type:.*\(EXEC\|DYN\)' <<<"$header"; then
    echo "FAIL $path is not an aarch64 executable" >&2
    status=1
    continue
  fi
  needed="$(aarch64-linux-gnu-readelf -d "$path" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' | sort | tr '\n' ' ')"
  for lib in $needed; do
    case "$lib" in
      libc.so.6 | libm.so.6 | libgcc_s.so.1 | ld-linux-aarch64.so.1 | libpthread.so.0 | libdl.so.2 | librt.so.1) ;;
      *) echo "FAIL $path needs $lib, which distroless cc-debian12 lacks" >&2; status=1 ;;
    esac
  done
  newest="$(aarch64-linux-gnu-readelf -V "$path" | grep -o 'GLIBC_[0-9.]*' | sort -t. -k1,1 -k2,2n -V | tail -n1)"
  if [ "$(printf '%s\nGLIBC_2.36\n' "$newest" | sort -V | tail -n1)" != "GLIBC_2.36" ]; then
    echo "FAIL $path needs $newest, newer than Debian 12's glibc 2.36" >&2
    status=1
  fi
  echo "ok   $path: aarch64, needs $needed(newest symbol version $newest), $(du -h "$path" | cut -f1)"
  if command -v qemu-aarch64 >/dev/null 2>&1; then
    qemu-aarch64 -L /usr/aarch64-linux-gnu "$path" --version
  fi
done
exit "$status"
