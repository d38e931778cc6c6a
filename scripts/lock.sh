#!/usr/bin/env bash
# Regenerates the lock: requirements.txt (exact versions of every package, direct and
# transitive) and environment.yml (the same pins for conda), from requirements.in.
#
#   bash scripts/lock.sh            # PYTHON=python3.11 by default
#
# It installs requirements.in into a fresh venv (the newest releases it allows) and
# writes what pip installed.  When nothing was released since the last lock, the two
# files come out byte-identical.  Then run the tests and commit both files.
. "$(dirname "$0")/common.sh"
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r requirements.in
frozen "$venv" > "$tmp/pins"
if grep -v '==' "$tmp/pins"; then
  echo "error: the packages above are not installed from a registry release; no lock written" >&2; exit 1
fi
{
  echo "# The lock: exact versions of every package the project installs (Python 3.11, Linux x86_64)."
  echo "# Made by 'bash scripts/lock.sh' from requirements.in (the direct dependencies); do not edit by hand."
  cat "$tmp/pins"
} > "$tmp/requirements.txt"
{
  echo "# conda env create -f environment.yml && conda activate hvs"
  echo "# Made by 'bash scripts/lock.sh': the pins of requirements.txt; do not edit by hand."
  echo "name: hvs"
  echo "channels:"
  echo "  - conda-forge"
  echo "dependencies:"
  echo "  - python=3.11"
  echo "  - pip"
  echo "  - pip:"
  sed 's/^/      - /' "$tmp/pins"
} > "$tmp/environment.yml"
for f in requirements.txt environment.yml; do
  if cmp -s "$tmp/$f" "$f"; then echo "$f: unchanged"; else cp "$tmp/$f" "$f"; echo "$f: written"; fi
done
# Detectron2's own pins (an optional install) must fit the lock: resolve them against it.
d2=${DETECTRON2_WHEELS:-../shared/wheels}
if [ -f "$d2/requirements-detectron2.txt" ]; then
  if "$venv/bin/python" -m pip install -q --disable-pip-version-check --dry-run --only-binary :all: \
       --find-links "$d2/deps" -c requirements.txt -r "$d2/requirements-detectron2.txt" > "$tmp/d2.log" 2>&1; then
    echo "Detectron2 pins ($d2/requirements-detectron2.txt): consistent with the lock"
  else
    cat "$tmp/d2.log" >&2
    echo "error: Detectron2's pins conflict with the lock (above)" >&2; exit 1
  fi
fi
