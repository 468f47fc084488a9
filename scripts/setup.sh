#!/usr/bin/env bash
# Create .venv and install the pinned stack. Idempotent: skipped when .venv matches the lock.
#   setup.sh cpu   CPU torch (default; torch==2.13.0+cpu from the pinned lock)
#   setup.sh gpu   CUDA torch 2.13.0 from PyPI and onnxruntime-gpu, everything else as pinned
#   setup.sh app   add the optional `app` extra (gradio) to an existing .venv of either variant
#   setup.sh lock  re-resolve the stack (with the dev and app extras) and rewrite constraints.txt
set -euo pipefail
cd "$(dirname "$0")/.."
variant="${1:-cpu}"
VENV=.venv
PY="${PYTHON:-python3}"
# Packages installed without their dependencies: insightface wants the non-headless
# opencv; mediapipe pulls jax and a second opencv; rtmlib's deps are already in the stack.
NODEPS="insightface==2.1 rtmlib==0.0.16 mediapipe==0.10.14"

stamp_of() { cat pyproject.toml setup.py constraints.txt scripts/setup.sh | sha256sum | cut -c1-16; }

if [ "$variant" = "lock" ]; then
  tmp=$(mktemp -d)
  "$PY" -m venv "$tmp/v"
  "$tmp/v/bin/pip" install -q torch==2.13.0 "protobuf==4.25.9" "onnx==1.17.0" "tensorboard==2.18.0" -e ".[dev,app]" rust-just
  { echo "# Lock for the CPU stack and the optional extras dev and app (pip -c). Regenerate with: just lock"
    echo "# mediapipe 0.10.14 needs protobuf 4; onnx 1.17 and tensorboard 2.18 are the releases that import under it."
    echo "# pillow 12: gradio 6.31 (the app extra) asks for pillow<13."
    "$tmp/v/bin/pip" freeze --exclude-editable | grep -v -E '^(insightface|rtmlib|mediapipe)=='; } > constraints.txt
  rm -rf "$tmp"; echo "constraints.txt rewritten"; exit 0
fi

if [ "$variant" = "app" ]; then
  # The extra on top of the core set-up (run first); torch and onnxruntime stay as installed,
  # so this works over the cpu and the gpu variant alike.
  stamp="$VENV/.dwm-app-$(stamp_of)"
  if [ -f "$stamp" ]; then exit 0; fi
  [ -x "$VENV/bin/python" ] || { echo "setup.sh app: no $VENV yet (run setup.sh cpu or gpu first)"; exit 1; }
  start=$(date +%s)
  grep -v -E '^(torch|onnxruntime)==' constraints.txt > "$VENV/constraints-app.txt"
  "$VENV/bin/pip" install -q -c "$VENV/constraints-app.txt" -e ".[app]"
  GRADIO_ANALYTICS_ENABLED=False "$VENV/bin/python" -c "import gradio, dwm.generate.app; print(f'dwm app set-up ok: gradio {gradio.__version__}')"
  rm -f "$VENV"/.dwm-app-*
  touch "$stamp"
  echo "app set-up took $(( $(date +%s) - start )) s; .venv is $(du -sh "$VENV" | cut -f1)"
  exit 0
fi

stamp="$VENV/.dwm-setup-$variant-$(stamp_of)"
if [ -f "$stamp" ]; then exit 0; fi

start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip >/dev/null 2>&1 || true
if [ "$variant" = "gpu" ]; then
  # CUDA torch: PyPI's Linux wheel of the same release; keep the rest of the lock.
  grep -v -E '^(torch|onnxruntime)==' constraints.txt > "$VENV/constraints-gpu.txt"
  PIP_FIND_LINKS= "$PIP" install -q "torch==2.13.0" onnxruntime-gpu -c "$VENV/constraints-gpu.txt"
  "$PIP" install -q -c "$VENV/constraints-gpu.txt" -e ".[dev]"
else
  "$PIP" install -q -c constraints.txt -e ".[dev]"
fi
"$PIP" install -q --no-deps $NODEPS
# Fail here, not in the middle of a run, if the stack does not import together.
"$VENV/bin/python" - <<'PY'
import cv2, decord, diffusers, insightface, librosa, mediapipe, onnx, onnxruntime, rtmlib, torch
import transformers, webdataset, zarr
from torch.utils.tensorboard import SummaryWriter  # noqa: F401
import dwm.shared.cli  # noqa: F401
print(f"dwm set-up ok: torch {torch.__version__}, cuda={torch.cuda.is_available()}")
PY
rm -f "$VENV"/.dwm-setup-* "$VENV"/.dwm-app-*  # a new core install: the extra is checked again
touch "$stamp"
echo "set-up took $(( $(date +%s) - start )) s; .venv is $(du -sh "$VENV" | cut -f1)"
