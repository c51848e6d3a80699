#!/usr/bin/env bash
# Builds dist/pim-job-queue_<version>_<arch>.deb in one command on Debian 12 (installing the
# packaging tools it needs; the Rust toolchain comes from rustup), then checks it with lintian:
# any error fails the build. Prints the path of the .deb on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/services.sh

# Everything but the final path goes to stderr, so `deb=$(scripts/build-deb.sh)` works.
{
  apt_install debhelper dpkg-dev lintian sudo
  rm -rf dist
  dpkg-checkbuilddeps
  debian/rules clean
  debian/rules build
  debian/rules binary
} >&2
deb=$(ls dist/pim-job-queue_*.deb)
say "lintian $deb"
# Errors fail the build; warnings and infos are shown (each override carries its reason).
lintian --fail-on error "$deb" >&2
echo "$deb"
