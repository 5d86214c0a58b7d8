#!/usr/bin/env bash
# Build dist/routerd_VERSION_ARCH.deb from a staged install (install.sh --destdir), with dpkg-deb.
# The package holds /opt/routerd (a virtualenv for /usr/bin/python3, llama-server included), the
# unit in /usr/lib/systemd/system, sysusers.d/tmpfiles.d files, /etc/routerd/config.toml (a
# conffile: upgrades keep your edits) and /usr/bin/routerd, /usr/bin/routerctl.
#   packaging/build-deb.sh [--out DIR] [install.sh options, e.g. --no-llama-server]
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
OUT=$SRC/dist
if [ "${1:-}" = --out ]; then OUT=$(realpath -m "$2"); shift 2; fi
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$SRC/pyproject.toml")
ARCH=$(dpkg --print-architecture)
STAGE=$(mktemp -d)
chmod 0755 "$STAGE"
trap 'rm -rf "$STAGE"' EXIT

"$SRC/packaging/install.sh" --destdir "$STAGE" --unit-dir /usr/lib/systemd/system --bin-dir /usr/bin "$@"

install -d "$STAGE/DEBIAN"
PY_MINOR=$(/usr/bin/python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
cat > "$STAGE/DEBIAN/control" <<CONTROL
Package: routerd
Version: $VERSION
Architecture: $ARCH
Maintainer: routerd developers <routerd@localhost>
Depends: python3 (>= $PY_MINOR), python3 (<< ${PY_MINOR%.*}.$(( ${PY_MINOR#*.} + 1 ))), systemd, util-linux
Section: net
Priority: optional
Installed-Size: $(du -sk "$STAGE" | cut -f1)
Homepage: https://github.com/routerd/routerd
Description: local LLMs on demand behind one OpenAI-compatible port
 routerd supervises llama.cpp's llama-server: it starts the right model on demand, proxies
 requests (streaming included), keeps models warm within a memory budget and stops them when
 idle. routerctl manages it over a Unix socket.
CONTROL
echo /etc/routerd/config.toml > "$STAGE/DEBIAN/conffiles"
cat > "$STAGE/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    systemd-sysusers routerd.conf
    systemd-tmpfiles --create routerd.conf || true
    chgrp routerd /etc/routerd/config.toml
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        systemctl try-restart routerd.service || true
    fi
    echo "routerd: add models to /etc/routerd/config.toml, then: systemctl enable --now routerd"
fi
POSTINST
cat > "$STAGE/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
    systemctl disable --now routerd.service || true
fi
PRERM
cat > "$STAGE/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
POSTRM
chmod 0755 "$STAGE/DEBIAN/postinst" "$STAGE/DEBIAN/prerm" "$STAGE/DEBIAN/postrm"
mkdir -p "$OUT"
dpkg-deb --root-owner-group -Zxz -z1 --build "$STAGE" "$OUT/routerd_${VERSION}_${ARCH}.deb" >/dev/null
echo "$OUT/routerd_${VERSION}_${ARCH}.deb"
