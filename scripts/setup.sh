#!/usr/bin/env bash
# Creates .venv and installs the project with the tested pins (constraints.txt). Idempotent and quick
# when nothing changed. torch goes in first: with no torch installed, any package that needs it would pull
# the multi-GB CUDA build where the CPU one is meant.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=${VENV:-.venv}
# A real headless browser for the playground test (tests/server/test_playground_browser.py): Debian's chromium
# and its matching driver, and curl (the test runs the command the page shows). Checked before the quick exit
# below, and skipped when all three are installed. Only the test setup asks for it (`make test` sets
# SD_ENDPOINT_SETUP_BROWSER=1): serving needs no browser.
if [ "${SD_ENDPOINT_SETUP_BROWSER:-0}" = 1 ] && { ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null || ! command -v curl >/dev/null; }; then
  if command -v apt-get >/dev/null; then
    echo "setup: installing chromium + chromium-driver + curl (apt) ..." >&2
    as_root=""
    [ "$(id -u)" = 0 ] || as_root="sudo"
    $as_root apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -q --no-install-recommends chromium chromium-driver curl >&2
  else
    # Without the browser the playground test fails.
    echo "setup: no apt-get here; install Chromium, chromedriver and curl for the playground test" >&2
  fi
fi
stamp="$VENV/.sd-endpoint-installed"
want=$(cat pyproject.toml src/aacs_emulator/pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
command -v "$PYTHON" >/dev/null || { echo "setup: $PYTHON not found (set PYTHON=...)" >&2; exit 1; }
# A first run downloads and installs about 1.5 GB (torch alone is ~190 MB to download, 750 MB installed); it
# took about 3 minutes on our test machine. pip's own lines (Collecting / Downloading with sizes / Installing)
# show the progress; each step says when it starts and how long it took.
started=$SECONDS
step() { echo "setup: [$1/5] $2 ($((SECONDS - started)) s so far)" >&2; }
step 1 "creating $VENV with $PYTHON"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip="$VENV/bin/python -m pip install --disable-pip-version-check --progress-bar on"
# This workplace's pip config names local indexes that may be absent; pip warns once per package.
quiet() { "$@" 2> >(grep -v "^WARNING: Location 'file://" >&2); }
step 2 "installing torch (CPU build)"
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu on machines whose pip has no local CPU wheel.
quiet $pip -c constraints.txt ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==$(grep -E '^torch==' constraints.txt | cut -d= -f3)"
step 3 "installing sd-endpoint and its dependencies (diffusers, transformers, fastapi, azure, dev tools)"
quiet $pip -c constraints.txt -e ".[azureml,dev]"
# The AACS emulator (tests, notebooks, local screening) is a dev tool with its own distribution and command.
quiet $pip -c constraints.txt -e src/aacs_emulator
# open-clip-torch only provides the CLIP BPE vocabulary file; its own deps (torchvision, timm) are not needed.
step 4 "installing open-clip-torch (its CLIP vocabulary only, no dependencies)"
quiet $pip -c constraints.txt --no-deps open-clip-torch
# DeepSpeed's Triton attention kernel uses tl.make_block_ptr, which Triton 3.9 removed; the CPU tests run it
# in Triton's interpreter. Not in constraints.txt: the GPU image takes the Triton its CUDA torch pins.
step 5 "installing triton 3.8.0"
quiet $pip "triton==3.8.0"
echo "$want" > "$stamp"
echo "setup: done in $((SECONDS - started)) s ($VENV)" >&2
