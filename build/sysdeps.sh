#!/bin/sh
# Installs the system packages `make test`, `make demo` and `make bench` need, when missing.
# Debian/Ubuntu only; as root it runs apt-get, otherwise it prints the exact command and fails.
set -eu
PYTHON=${PYTHON:-python3}
need=""
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_pkg() { dpkg -s "$1" >/dev/null 2>&1; }

have_pkg libacl1-dev || need="$need libacl1-dev"      # pylibacl builds against it
have_cmd setfacl || need="$need acl"                    # getfacl/setfacl for tests and the fallback
have_cmd openssl || need="$need openssl"
have_cmd gcc || need="$need gcc"
[ -x /usr/sbin/nginx ] || have_cmd nginx || need="$need nginx"   # TLS handshake test
have_cmd npm || need="$need nodejs npm"                      # independent fluentd implementation
have_cmd dpkg-deb || need="$need dpkg"
"$PYTHON" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || need="$need python3-dev"
"$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 || need="$need python3-venv"

[ -z "$need" ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "missing system packages; run: sudo apt-get update && sudo apt-get install -y$need" >&2
  exit 1
fi
echo "installing system packages:$need"
export DEBIAN_FRONTEND=noninteractive
# policy-rc.d keeps a freshly installed nginx from starting a system-wide server on port 80
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi
apt-get install -y -qq $need >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq $need; }
