#!/usr/bin/env bash
# Install everything the tests need and run them. This is the README's test command and what
# .ci/run executes from a clean clone. Safe to re-run: an existing .venv is reused.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"

# The browser end-to-end tests drive Debian's Chromium through Playwright (never `playwright
# install`, which downloads a browser). Install it when we can; without it those tests fail in CI
# and are skipped (with the reason) elsewhere.
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "== installing Debian chromium for the browser tests"
  apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
echo "== installing requirements-dev.txt"
"$VENV/bin/pip" install -q -r requirements-dev.txt

echo "== ruff check (pyproject.toml [tool.ruff])"
"$VENV/bin/ruff" check .

export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1
echo "== running tests"
set +e
"$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$rc"
