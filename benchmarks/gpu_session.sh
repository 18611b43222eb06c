#!/usr/bin/env bash
# The GPU checks in one short script, for a GPU machine that has PyTorch with CUDA but can reach no package index.
#
#   benchmarks/gpu_session.sh pack   # here, with the project's venvs built (make setup .venv-trl/.installed):
#                                    # fills .gpu/ (git-ignored, ~45 MB): Python 3.12 wheels of what the GPU image lacks,
#                                    # the prepared demo data at 2,048 and 4,096 tokens, SmolLM2's tokenizer files
#   benchmarks/gpu_session.sh run    # there, from the repository root with .gpu/ beside it: installs the wheels into
#                                    # /tmp/site, runs tests/test_gpu.py, then benchmarks/train_gpu.py (ours vs TRL) on
#                                    # Qwen2.5-0.5B's and Llama-3.2-1B's architectures with random weights.
#                                    # Results land in $OUT (default /tmp/gpu_out): session.log, *.json. SPECS picks the runs:
#                                    # SPECS="llama-3.2-1b 2048,llama-3.2-1b 2048 sdpa" (config, length, --attn);
#                                    # TRAIN_ARGS="--micro-batch 2 --grad-accum 4" goes to every train_gpu.py run;
#                                    # GPU_TESTS=0 skips tests/test_gpu.py.
#
# The GPU image checked here (2026-12): Python 3.12, torch 2.11.0+cu130, transformers 5.17; no deepspeed, trl,
# datasets, polars or pydantic, and no flash-attn (ours uses torch's own FlashAttention varlen kernel, TRL SDPA with its mask).
set -uo pipefail
cd "$(dirname "$0")/.."
PY312=(--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64
       --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# Versions as in the project's venvs (pyproject.toml, benchmarks/requirements.txt).
WHEELS=(pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0
        orjson polars==2.1.0 trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 transformers==5.23.0
        accelerate==1.16.0)

pack() {
    set -e
    local venv=${VENV:-.venv}
    mkdir -p .gpu/whl
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
    "$venv/bin/pip" download -q --no-deps "${PY312[@]}" -d .gpu/whl "${WHEELS[@]}"
    # DeepSpeed ships a source archive only: a pure-Python wheel, its CUDA ops left to build on first use (none are used).
    [ -n "$(ls .gpu/whl/deepspeed-*.whl 2>/dev/null)" ] ||
        DS_BUILD_OPS=0 "$venv/bin/pip" wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .gpu/whl
    # Polars' runtime wheel is 54 MB zipped and the call's tree may carry 64 MiB: recompressed with xz it is 31 MB.
    if [ ! -f .gpu/polars_runtime.tar.xz ]; then
        "$venv/bin/pip" download -q --no-deps "${PY312[@]}" -d /tmp/polars_rt polars-runtime-32==2.1.0
        rm -rf /tmp/polars_rt/x && mkdir /tmp/polars_rt/x && (cd /tmp/polars_rt/x && unzip -q ../polars_runtime_32-*.whl)
        tar -C /tmp/polars_rt/x -cf - . | xz -9 -T0 > .gpu/polars_runtime.tar.xz
    fi
    local model
    model=$("$venv/bin/python" -c "from sft_engine.model import resolve_model; print(resolve_model('smollm2-135m'))")
    mkdir -p .gpu/tokenizer
    cp "$model"/{tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpu/tokenizer/
    for seq in 2048 4096; do
        "$venv/bin/python" - "$seq" <<'EOF'
import shutil, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
import train_gpu
seq = int(sys.argv[1])
_, data, _ = train_gpu.build_data("smollm2-135m", seq, Path(f"/tmp/bench_gpu_{seq}"))
out = Path(f".gpu/data_{seq}")
out.mkdir(parents=True, exist_ok=True)
for name in ("train.arrow", "manifest.json"):
    shutil.copy2(data.parent / name, out / name)
EOF
    done
    du -sh .gpu
}

run() {
    OUT=${OUT:-/tmp/gpu_out}
    mkdir -p "$OUT"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
    tar -C /tmp/site -xJf .gpu/polars_runtime.tar.xz || exit 1
    export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    {
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
        python3 -c "import sys, torch, transformers, trl, deepspeed; print(sys.version.split()[0], 'torch', torch.__version__, \
'transformers', transformers.__version__, 'trl', trl.__version__, 'deepspeed', deepspeed.__version__)"
    } 2>&1 | tee "$OUT/session.log"
    # One log and a JSON file per run: the device tool brings back at most 8 files.
    [ "${GPU_TESTS:-1}" = 0 ] || timeout 150 python3 -m pytest -q -rA -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -25 | tee -a "$OUT/session.log"
    # "config sequence-length [attention]" (train_gpu.py's --attn, default auto); the most informative first, so a run
    # cut short still reports it.
    local specs=${SPECS:-"llama-3.2-1b 2048,qwen2.5-0.5b 2048,llama-3.2-1b 4096"}
    IFS=, read -ra specs <<< "$specs"
    for spec in "${specs[@]}"; do
        set -- $spec
        local attn=${3:-auto}
        timeout "${BENCH_TIMEOUT:-170}" python3 benchmarks/train_gpu.py --model .gpu/tokenizer --model-config "benchmarks/model_configs/$1.json" \
            --data ".gpu/data_$2/train.arrow" --seq-len "$2" --attn "$attn" ${TRAIN_ARGS:-} --json "$OUT/$1-$2-$attn${TAG:-}.json" 2>&1 \
            | grep -v "Writing model shards" | tail -12 | tee -a "$OUT/session.log"
    done
}

case "${1:-}" in
    pack) pack ;;
    run) run ;;
    *) echo "usage: $0 pack|run" >&2; exit 2 ;;
esac
