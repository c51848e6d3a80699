#!/usr/bin/env bash
# Builds dist/pim-job-queue_<version>_<arch>.deb in one command on Debian 12 (installing the
# packaging tools it needs; the Rust toolchain comes from rustup), then checks it with lintian:
# any error fails the build. Prints the path of the .deb on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/services.sh

apt_install debhelper dpkg-dev lintian sudo
rm -rf dist
dpkg-checkbuilddeps
debian/rules clean >/dev/null
debian/rules build
debian/rules binary
deb=$(ls dist/pim-job-queue_*.deb)
say "lintian $deb"
lintian --fail-on error --info "$deb"
echo "$deb"
