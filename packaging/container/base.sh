#!/usr/bin/env bash
# Make localhost/debian:bookworm, the image's base, from Debian's own packages when no registry
# is reachable: debootstrap a minimal bookworm (python3, libgomp1; util-linux, whose setpriv starts
# the backends, is Essential and named too) and import it. Once per machine.
#   packaging/container/base.sh [podman|docker]
set -euo pipefail
RUNTIME=${1:-$(command -v podman || command -v docker)}
BASE=localhost/debian:bookworm
if "$RUNTIME" image inspect "$BASE" >/dev/null 2>&1; then
    exit 0
fi
command -v debootstrap >/dev/null || { echo "base.sh: no $BASE image and no debootstrap to make one (Debian: apt install debootstrap), or pull debian:bookworm-slim and tag it $BASE" >&2; exit 69; }
# The mirror apt already uses here (snapshot and proxy setups included).
MIRROR=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
MIRROR=${MIRROR:-$(awk '$1 == "deb" {print $2; exit}' /etc/apt/sources.list 2>/dev/null)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ROOTFS=$(mktemp -d)
trap 'rm -rf "$ROOTFS"' EXIT
echo "base.sh: debootstrap bookworm from $MIRROR (about 30 s)"
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libgomp1,util-linux bookworm "$ROOTFS" "$MIRROR" >/dev/null
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/archives/*.deb
tar -C "$ROOTFS" -c . | "$RUNTIME" import - "$BASE" >/dev/null
echo "base.sh: made $BASE"
