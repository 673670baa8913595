#!/usr/bin/env bash
# The GPU checks of the DeepSpeed and diffusers CUDA paths, in one command that fits 9 minutes on an H100/H200.
#
# 1. Here (a machine with network), fetch the wheels the GPU image lacks into .whl/ (git-ignored locally):
#        benchmarks/gpu_check.sh fetch
# 2. On the GPU machine (the device tool's `run`, carrying .whl), from the repository root:
#        benchmarks/gpu_check.sh run
#    Steps, each with its own timeout, and none past the whole command's deadline (530 s):
#      1. install the wheels into /tmp/site (60 s);
#      2. build DeepSpeed's transformer_inference and spatial_inference ops for this GPU only (200 s): stale
#         build locks from an interrupted build are removed first (they make the next load wait forever),
#         DeepSpeed's environment report (ds_report) is logged before and after; a failed or timed-out build only means "auto" will not
#         consider DeepSpeed, and the deepspeed configuration reports why it could not start;
#      3. the full-size random SD 2.1 model (90 s);
#      4. the tests marked gpu (120 s);
#      5. benchmarks/gpu.py with what is left of 530 s (its own budget stops new cells in time), writing
#         gpu.json (raw) and gpu_bench.log (tables) under $OUT (or ./gpu-out).
#    GPU_CHECK_TESTS=0 skips the tests; GPU_BENCH_ARGS adds arguments to gpu.py (e.g. "--configs plain,default").
#
# The GPU image (see the device tool's KINDS.md) has Python 3.12, torch, triton, transformers 5, accelerate,
# safetensors, nvcc and ninja; it lacks diffusers, DeepSpeed and our pure-Python dependencies.
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"
pins() { grep -i -E "^$1==" constraints.txt | head -1; }

if [ "$mode" = fetch ]; then
    set -e
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    mkdir -p .whl
    platforms=()
    for n in 28 27 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
    platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
    wanted=()
    for name in diffusers importlib_metadata pydantic pydantic_core pydantic-settings annotated-types \
                typing-inspection typing_extensions python-dotenv open_clip_torch ftfy wcwidth torchao; do
        pin="$(pins "$name")"
        [ -n "$pin" ] || { echo "no pin for $name in constraints.txt" >&2; exit 1; }
        wanted+=("$pin")
    done
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d .whl "${wanted[@]}" hjson==3.1.0
    # DeepSpeed publishes only an sdist; its wheel is pure Python (the CUDA ops are built on first use).
    python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8
    ls -la .whl
    du -sh .whl
    exit 0
fi

[ "$mode" = run ] || { echo "usage: $0 fetch|run" >&2; exit 2; }
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/gpu_check.log"; }
started=$(date +%s)
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-530}  # the whole command; the device tool allows one 9-minute command
# A step's timeout: its own limit, or what is left before the deadline (at least 5 s), whichever is less.
cap() { local left=$(( DEADLINE_S - ($(date +%s) - started) )); [ "$left" -lt 5 ] && left=5; echo $(( $1 < left ? $1 : left )); }

log "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
timeout "$(cap 60)" python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { log "wheel install failed"; exit 1; }
export PYTHONPATH="/tmp/site:$PWD/src:$PWD" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
cap="$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)"
export TORCH_CUDA_ARCH_LIST="${cap:-9.0}" MAX_JOBS=16
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}"
python3 -c 'import torch, triton, diffusers, transformers, deepspeed; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__, "deepspeed", deepspeed.__version__)' 2>&1 | tail -1 | tee -a "$OUT/gpu_check.log"
which nvcc >/dev/null && log "nvcc: $(nvcc --version | tail -2 | head -1)" || log "nvcc: not found (DeepSpeed's ops cannot build)"

log "DeepSpeed ops: build for sm_${cap/./} in $TORCH_EXTENSIONS_DIR"
find "$TORCH_EXTENSIONS_DIR" -name lock -type f -print -delete 2>/dev/null | sed 's/^/removed stale lock /' | tee -a "$OUT/gpu_check.log"
timeout "$(cap 30)" python3 -m deepspeed.env_report > "$OUT/ds_report_before.log" 2>&1
timeout "$(cap 200)" python3 -c 'from deepspeed.ops.op_builder import InferenceBuilder, SpatialInferenceBuilder
InferenceBuilder().load(); SpatialInferenceBuilder().load(); print("DeepSpeed ops built")' > "$OUT/ds_build.log" 2>&1
log "DeepSpeed op build exit $? ($(tail -1 "$OUT/ds_build.log"))"
find "$TORCH_EXTENSIONS_DIR" -name lock -type f -delete 2>/dev/null  # a timed-out build must not block later loads
timeout "$(cap 30)" python3 -m deepspeed.env_report > "$OUT/ds_report_after.log" 2>&1 || true

log "building the full-size random model"
timeout "$(cap 90)" python3 -c 'from pathlib import Path; from sd_endpoint.model.demo import write_demo_model; write_demo_model(Path("/tmp/sd21-full"), full_size=True, cache_dir=Path("/tmp/sd-cache"))' \
    > "$OUT/build_model.log" 2>&1 || log "model build failed (see build_model.log)"

if [ "${GPU_CHECK_TESTS:-1}" = 1 ]; then
    log "tests marked gpu"
    # The compile test is left to gpu.py (full size), which has the time budget to skip it when short.
    timeout "$(cap 120)" python3 -m pytest -m gpu tests/backends -q -p no:cacheprovider -o addopts="-ra" -k "not compiled" \
        2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
    log "pytest exit ${PIPESTATUS[0]}"
fi

left=$(( DEADLINE_S - 20 - ($(date +%s) - started) ))
log "benchmarks/gpu.py with a ${left} s budget for new cells"
timeout "$(cap $(( left + 10 )))" python3 benchmarks/gpu.py --model /tmp/sd21-full --cache-dir /tmp/sd-cache \
    --budget-s "$(( left > 60 ? left - 45 : 15 ))" --json "$OUT/gpu.json" ${GPU_BENCH_ARGS:-} 2>&1 \
    | tee "$OUT/gpu_bench.log" | grep -v "^  "
log "gpu.py exit ${PIPESTATUS[0]}; total $(( $(date +%s) - started )) s"
