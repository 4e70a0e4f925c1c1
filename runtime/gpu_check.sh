#!/usr/bin/env bash
# One command on a GPU machine: CUDA tests, microbenchmark, probe files, traced runs of the paper's
# policies, the accelerate reference, validation. Everything lands under $OUT (default ./gpu_check_out).
# Needs torch with CUDA and the project's dependencies already installed (the machine may be offline).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
mkdir -p "$OUT"
if ! python -c "import offloadlab.runtime" 2>/dev/null; then
    # offline: install without build isolation, else map the package folders by hand
    pip install --quiet --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || {
        shim=$(mktemp -d); cp -r offloadlab "$shim/"
        for d in sim runtime validation; do ln -s "$PWD/$d" "$shim/offloadlab/$d"; done
        export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
    }
fi
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')" || exit 2
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
python -m offloadlab.runtime.gpu_check --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
