#!/bin/sh
# Unpacks the real WALinuxAgent code (Debian `waagent`, Ubuntu `walinuxagent`) into $1 for the tests.
set -eu
dest=$1
mkdir -p "$dest"
cd "$dest"
deb=$(ls ./*.deb 2>/dev/null | head -1 || true)
if [ -z "$deb" ]; then
  for name in waagent walinuxagent; do
    apt-get download "$name" >/dev/null 2>&1 && break
  done
  deb=$(ls ./*.deb 2>/dev/null | head -1 || true)
fi
if [ -z "$deb" ]; then
  apt-get update -qq
  apt-get download waagent >/dev/null 2>&1 || apt-get download walinuxagent
  deb=$(ls ./*.deb | head -1)
fi
rm -rf root
dpkg-deb -x "$deb" root
echo "unpacked $(basename "$deb")"
