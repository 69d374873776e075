#!/usr/bin/env bash
# Issue #8's GPU checks as one prepared command for a lent GPU machine (docs/performance.md, "GPU").
#
#   bash scripts/gpu_check.sh fetch        # here, once: the wheels the GPU image lacks -> .whl/,
#                                          # SmolLM2's tokenizer files -> .gpu/tokenizer (both git-ignored)
#   bash scripts/gpu_check.sh run [ARGS]   # there, through the device tool with carry [".whl", ".gpu"]:
#                                          # `pytest -m gpu`, then bench/vs_trl.py --device cuda ARGS
#
# The GPU image has torch, transformers, peft, accelerate, typer, rich and pyyaml, but no pydantic or datasets
# (/work/.library/device/KINDS.md): `fetch` downloads those at the versions installed here, built for its
# Python (3.12), with no dependencies pulled in. Its own transformers and peft stay: this venv's transformers
# needs a newer huggingface_hub (and that new packages) than the image has. Logs go to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

# What tunewise imports that the image lacks, pinned to this venv's versions (typing_extensions: pydantic
# needs a recent one).
PACKAGES=(pydantic pydantic_core annotated-types typing-inspection typing_extensions datasets dill multiprocess)
DEVICE_PYTHON=${DEVICE_PYTHON:-3.12}  # the GPU image's Python

fetch() {
    local py=.venv/bin/python
    for ignored in /.whl/ /.gpu/; do
        grep -qxF "$ignored" .git/info/exclude 2>/dev/null || echo "$ignored" >>.git/info/exclude
    done
    rm -rf .whl && mkdir -p .whl .gpu
    local pins=()
    for name in "${PACKAGES[@]}"; do
        pins+=("$name==$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
    done
    "$py" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
    "$py" - <<'EOF'
import shutil
from pathlib import Path

from tunewise.models.load import materialize, resolve_source

source, target = materialize(resolve_source("smollm2-135m-instruct")), Path(".gpu/tokenizer")
target.mkdir(parents=True, exist_ok=True)
for path in source.iterdir():
    if path.suffix != ".safetensors":  # the tokenizer, its template and config.json; not the weights
        shutil.copy(path, target / path.name)
EOF
    du -sh .whl .gpu
    ls .whl
}

run() {
    : "${OUT:=/tmp/gpu_check}"
    mkdir -p "$OUT"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    python3 -c "import torch, transformers, peft, tunewise.run; print(torch.__version__, transformers.__version__, peft.__version__)" \
        2>&1 | tee -a "$OUT/gpu.txt"
    # Not set -e's business: the benchmark runs even when a test fails, and both logs come back.
    python3 -m pytest -q -m gpu -p no:cacheprovider --continue-on-collection-errors tests/unit tests/integration/test_cuda_run.py \
        2>&1 | tee "$OUT/pytest_gpu.log" || true
    python3 bench/vs_trl.py --device cuda --tokenizer .gpu/tokenizer "$@" 2>&1 | tee "$OUT/vs_trl_cuda.log"
}

case "${1:-}" in
    fetch) fetch ;;
    run) shift; run "$@" ;;
    *) echo "usage: bash scripts/gpu_check.sh fetch | run [vs_trl.py arguments]" >&2; exit 2 ;;
esac
