#!/bin/bash -e
# pi-gen step: install the outpost package and the first-boot provisioning into the image.
# files/ is filled by packaging/rpi/prepare-stage.sh (the .deb of the image's architecture,
# the provisioning script and its unit).
install -m 644 files/outpost.deb "${ROOTFS_DIR}/tmp/outpost.deb"
install -m 755 files/outpost-provision "${ROOTFS_DIR}/usr/sbin/outpost-provision"
install -m 644 files/outpost-provision.service "${ROOTFS_DIR}/etc/systemd/system/outpost-provision.service"

on_chroot << EOF
apt-get install -y /tmp/outpost.deb
rm -f /tmp/outpost.deb
systemctl enable outpost-provision.service
EOF
