#!/usr/bin/env bash
# Recreate the reference venv for the parity harness from scratch.
#   usage: tools/parity/setup_reference_env.sh [VENV_DIR]      (default /work/parity_env; it is DELETED first)
# Needs PyPI access (~3 GB of wheels: torch 2.15 from PyPI comes with its CUDA runtime wheels; it runs fine on CPU).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${1:-/work/parity_env}"
PY="${PYTHON:-python3}"

rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install --upgrade pip
# exact versions, no resolution (mmdet's optional mmcv requirement is deliberately not installed: mmcv-lite is)
"$VENV/bin/pip" install --no-deps -r "$HERE/requirements-reference.txt"
"$VENV/bin/pip" check
# smoke test: the stand-in makes mmcv.ops importable and mmdet imports
"$VENV/bin/python" - <<PYEOF
import sys
sys.path.insert(0, "$HERE")
import mmcv_ops_standin  # noqa: F401
import torch, torchvision, mmcv, mmengine, mmdet
import mmdet.apis  # noqa: F401
from mmcv.ops import RoIAlign, batched_nms, nms  # noqa: F401
print('reference env OK: mmdet', mmdet.__version__, 'mmcv-lite', mmcv.__version__, 'mmengine', mmengine.__version__,
      'torch', torch.__version__, 'torchvision', torchvision.__version__)
PYEOF
