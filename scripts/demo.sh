#!/usr/bin/env bash
# The README's demo: OpenVLA on the embedded tiny RANDOM checkpoint (its actions are
# meaningless), CPU, on a synthetic camera frame.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WEIGHTS=${1:-$ROOT/build/tiny_openvla}
VENV=${OPENVLA_VENV:-$ROOT/.venv}
IMG=$ROOT/build/demo_frame.png
"$VENV/bin/python" - "$IMG" <<'PY'
import sys, cv2
from openvla_model.synthetic import synthetic_rgb
cv2.imwrite(sys.argv[1], synthetic_rgb(seed=7)[..., ::-1])
PY
echo "== openvla-predict on the tiny random checkpoint ($WEIGHTS): actions are MEANINGLESS =="
"$VENV/bin/openvla-predict" --weights "$WEIGHTS" --image "$IMG" \
  --instruction "pick up the red cup" --unnorm-key bridge_orig --device cpu
