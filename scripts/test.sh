#!/usr/bin/env bash
# Install everything the tests need, then run them. Used by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q -r requirements-dev.txt
# the browser test drives Debian chromium (playwright's own browser download does not work offline)
if [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
  else
    echo "note: /usr/bin/chromium missing and cannot be installed: browser tests will be skipped" >&2
  fi
fi
export CLIPFORGET_SCREENSHOTS="${CLIPFORGET_SCREENSHOTS:-bench/out/screenshots}"
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRANSFORMERS_OFFLINE=1
export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736
python -m pytest -q "$@"
