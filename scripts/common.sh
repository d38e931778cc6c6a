# Sourced by lock.sh and check_latest.sh: strict mode, the repository root as the
# working folder, and a throw-away venv "$venv" of the lock's interpreter (removed on exit).
# PYTHON names the interpreter (default python3.11); the lock is for Python 3.11 on Linux x86_64.

lock_python() {
  local py=${PYTHON:-python3.11}
  if ! command -v "$py" > /dev/null; then
    echo "error: no interpreter '$py' (set PYTHON to a Python 3.11)" >&2; exit 2
  fi
  local tag
  tag=$("$py" -c 'import platform, sys; print(f"{sys.version_info[0]}.{sys.version_info[1]} {platform.system()} {platform.machine()}")')
  if [ "$tag" != "3.11 Linux x86_64" ]; then
    echo "error: the lock is for Python 3.11 on Linux x86_64; '$py' is $tag (set PYTHON)" >&2; exit 2
  fi
  echo "$py"
}

# fresh_venv DIR PYTHON: a new venv in DIR, quiet.
fresh_venv() {
  "$2" -m venv "$1"
  "$1/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip > /dev/null
}

# frozen VENV: every installed distribution as name==version, pip itself left out, sorted by name.
frozen() {
  "$1/bin/python" -m pip freeze --all --disable-pip-version-check --exclude pip | LC_ALL=C sort -f
}

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=$(lock_python)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
venv=$tmp/venv
fresh_venv "$venv" "$py"
