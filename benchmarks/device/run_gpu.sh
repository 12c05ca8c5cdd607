#!/usr/bin/env bash
# Runs ON the lent GPU machine (see prepare.sh): `python -m benchmarks gpu`, results in $OUT/gpu.
# Extra arguments go to the command (e.g. --methods graff,wsd, or --tiny to try this on a CPU).
set -euo pipefail
py="$(command -v python3 || command -v python)"
out="${OUT:-/tmp/graff_gpu_out}/gpu"
site=.device/site
if ! "$py" -c "import schedulefree" 2>/dev/null; then  # a private target: the image stays as it is
  "$py" -m pip install -q --no-index --no-deps --target "$site" .device/wheels/*.whl
fi
set -a
# shellcheck disable=SC1091
. .device/env
set +a
export PYTHONPATH="$PWD:$PWD/$site${PYTHONPATH:+:$PYTHONPATH}"
"$py" - <<'PY'
import torch, transformers
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, {gpu}", flush=True)
PY
"$py" -m benchmarks gpu --data-dir .device/gsm8k --out "$out" "$@"
