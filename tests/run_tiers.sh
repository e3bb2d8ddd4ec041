#!/usr/bin/env bash
# Run the test tiers one after another, print each one's time and its ten slowest tests, and close with one total line.
# A tier with no tests yet is not a failure (pytest exits 5 there).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
reports=$(mktemp -d)
status=0
tier() {
  local name=$1 expr=$2 start rc
  start=$(date +%s)
  echo "=== tier $name ($expr)"
  "$PY" -m pytest -q -m "$expr" --durations=10 --junitxml="$reports/$name.xml" tests
  rc=$?
  [ $rc -eq 5 ] && { echo "(no tests in tier $name yet)"; rc=0; }
  echo "=== tier $name: exit $rc in $(( $(date +%s) - start ))s"
  [ $rc -eq 0 ] || status=1
}
tier fast "not slow and not slurm and not browser and not readme"
tier slow "slow"
tier slurm "slurm"
tier browser "browser"
tier readme "readme"
"$PY" - "$reports" <<'PY'
import pathlib, sys, xml.etree.ElementTree as ET
passed = failed = skipped = 0
for report in pathlib.Path(sys.argv[1]).glob("*.xml"):
    for suite in ET.parse(report).getroot().iter("testsuite"):
        n, bad, skip = int(suite.get("tests")), int(suite.get("failures")) + int(suite.get("errors")), int(suite.get("skipped"))
        passed, failed, skipped = passed + n - bad - skip, failed + bad, skipped + skip
print(f"all tiers: {passed} passed, {failed} failed, {skipped} skipped")
PY
rm -rf "$reports"
exit $status
