#!/bin/sh
# Fills packaging/rpi/stage-outpost/00-outpost/files for pi-gen (https://github.com/RPi-Distro/pi-gen,
# branch bookworm-arm64 or bookworm for 32-bit):
#
#   packaging/rpi/prepare-stage.sh target/aarch64-unknown-linux-gnu/debian/outpost_0.1.0-1_arm64.deb
#   cp -r packaging/rpi/stage-outpost /path/to/pi-gen/
#   echo 'STAGE_LIST="stage0 stage1 stage2 stage-outpost"' >> /path/to/pi-gen/config
#   (cd /path/to/pi-gen && ./build-docker.sh)
set -eu
deb="${1:?usage: prepare-stage.sh OUTPOST_DEB}"
here=$(cd "$(dirname "$0")" && pwd)
files="$here/stage-outpost/00-outpost/files"
mkdir -p "$files"
cp "$deb" "$files/outpost.deb"
cp "$here/outpost-provision" "$here/outpost-provision.service" "$files/"
echo "stage ready: $here/stage-outpost"
