#!/usr/bin/env bash
# Drift check (not part of CI): what would the newest releases of the direct
# dependencies move, and would the fast tier still pass on them?
#
#   bash scripts/check_latest.sh        # PYTHON=python3.11 by default
#
# It installs requirements.in, upgraded to the newest releases it allows, into a fresh
# venv, prints every package whose version differs from the lock, runs the fast tier
# (-m "not slow") there and prints what broke.  Exit 0: nothing broke; 1: a test failed.
# To take the new versions: bash scripts/lock.sh, run the tests, commit the lock.
. "$(dirname "$0")/common.sh"
"$venv/bin/python" -m pip install -q --disable-pip-version-check --upgrade -r requirements.in
frozen "$venv" > "$tmp/latest"
grep '==' requirements.txt | LC_ALL=C sort -f > "$tmp/locked"
echo "== what moved (lock -> newest)"
"$venv/bin/python" - "$tmp/locked" "$tmp/latest" <<'PY'
import sys
def pins(path):
    out = {}
    for line in open(path):
        name, _, version = line.strip().partition("==")
        out[name.lower().replace("_", "-")] = (name, version)
    return out
old, new = pins(sys.argv[1]), pins(sys.argv[2])
moved = 0
for key in sorted(old.keys() | new.keys()):
    a, b = old.get(key), new.get(key)
    if a and b and a[1] != b[1]:
        print(f"  {b[0]}: {a[1]} -> {b[1]}")
    elif a and not b:
        print(f"  {a[0]}: {a[1]} -> (no longer installed)")
    elif b and not a:
        print(f"  {b[0]}: (new) {b[1]}")
    else:
        continue
    moved += 1
print(f"  {moved} package(s) moved" if moved else "  nothing moved: the lock is the newest")
PY
echo "== fast tier on the newest releases"
set +e
"$venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider tests > "$tmp/pytest.log" 2>&1
rc=$?
set -e
grep -E '^(FAILED|ERROR) ' "$tmp/pytest.log" | sed 's/^/  /' || true
tail -n 1 "$tmp/pytest.log" | sed 's/^/  /'
if [ $rc -eq 0 ]; then echo "nothing broke"; else echo "broke: the tests above fail on the newest releases"; fi
exit $(( rc == 0 ? 0 : 1 ))
