#!/usr/bin/env bash
# The GPU checks of the DeepSpeed and diffusers CUDA paths, in one command that fits 9 minutes on an H100/H200.
#
# 0. Once, here: a CPU twin of the GPU image in .gpu-twin/ (git-ignored; ~5 GB, ~3 min): its Python and the
#    versions of torch (CUDA build), Triton, transformers and the rest that the device tool's KINDS.md lists:
#        benchmarks/gpu_check.sh twin
# 1. Here (a machine with network), fetch the wheels the GPU image lacks into .whl/ (git-ignored locally):
#        benchmarks/gpu_check.sh fetch
#    With the twin and nvcc here, it also builds DeepSpeed's inference ops for sm_90 against the image's torch
#    into .whl/ops/ (~5 min on 2 cores): the GPU machine then loads them instead of compiling for ~2 min.
#    Rehearse the run on the CPU in the twin (what it can check there: wheels, imports, the carried ops
#    loading, the model, gpu.py's dry run):
#        PATH=$PWD/.gpu-twin/bin:$PATH OUT=/tmp/twin-out GPU_CHECK_CAPABILITY=9.0 DS_ACCELERATOR=cuda \
#            GPU_CHECK_TESTS=0 GPU_BENCH_ARGS=--dry-run benchmarks/gpu_check.sh run
# 2. On the GPU machine (the device tool's `run`, carrying .whl), from the repository root:
#        benchmarks/gpu_check.sh run
#    Steps, each with its own timeout, and none past the whole command's deadline (530 s):
#      1. install the wheels into /tmp/site (60 s);
#      2. DeepSpeed's transformer_inference and spatial_inference ops (200 s): the carried pre-built ones if
#         they load, else built for this GPU only, with stale build locks from an interrupted build removed
#         first (they make the next load wait forever) and DeepSpeed's environment report (ds_report) logged
#         before and after; a failed or timed-out build only means "auto" will not consider DeepSpeed, and
#         the deepspeed configuration reports why it could not start;
#      3. the full-size random SD 2.1 model, built on the CPU beside step 2 (90 s);
#      4. the tests marked gpu (120 s);
#      5. benchmarks/gpu.py with what is left of 530 s (its own budget stops new cells in time; the issue's
#         targets come first), writing gpu.json (raw) and gpu_bench.log (tables) under $OUT (or ./gpu-out).
#    GPU_CHECK_TESTS=0 skips the tests; GPU_BENCH_ARGS adds arguments to gpu.py (e.g. "--configs plain,default").
#
# The GPU image (see the device tool's KINDS.md) has Python 3.12, torch, triton, transformers 5, accelerate,
# safetensors, nvcc and ninja; it lacks diffusers, DeepSpeed and our pure-Python dependencies.
set -uo pipefail
cd "$(dirname "$0")/.."
mode="${1:-run}"
pins() { grep -i -E "^$1==" constraints.txt | head -1; }
# The twin's CUDA libraries and headers (from torch's CUDA wheels).
twin_cuda() { .gpu-twin/bin/python -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))'; }

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
    rm -rf .whl/ops
    if [ -x .gpu-twin/bin/python ] && command -v nvcc >/dev/null; then
        # The same switches as environment/build-deepspeed-ops.sh (no GPU here either), for Hopper only.
        nv="$(twin_cuda)"
        CPATH="$nv/include" LIBRARY_PATH="$PWD/.gpu-twin/cuda-link:$nv/lib" CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" \
        DS_ACCELERATOR=cuda TORCH_CUDA_ARCH_LIST=9.0 DS_BUILD_TRANSFORMER_INFERENCE=1 DS_BUILD_SPATIAL_INFERENCE=1 \
        DS_BUILD_OPS=0 .gpu-twin/bin/python -m pip wheel -q --no-deps --no-build-isolation --no-cache-dir \
            -w .whl/ops "$(pins deepspeed)"
    else
        echo "no .gpu-twin or no nvcc: DeepSpeed's ops will be built on the GPU machine (~2 min of its time)"
    fi
    ls -laR .whl
    du -sh .whl
    exit 0
fi

if [ "$mode" = twin ]; then
    set -e
    # The GPU image's versions (device tool KINDS.md, "pip list" row, 2026-11); torch from PyPI is the
    # cu130 build the image has, with its CUDA libraries and headers (the ops build links them).
    "${GPU_TWIN_PYTHON:-python3.12}" -m venv .gpu-twin
    .gpu-twin/bin/python -m pip install -q torch==2.11.0 triton==3.6.0 transformers==5.17.0 accelerate==1.15.0 \
        huggingface_hub==1.33.0 safetensors==0.8.0 tokenizers==0.23.2 numpy==2.5.2 pillow prometheus-client \
        pytest pytest-timeout hypothesis psutil py-cpuinfo einops msgpack ninja tqdm pyyaml regex requests
    # The ops link -lcurand, which the CUDA wheels ship only under its versioned name.
    nv="$(twin_cuda)"
    mkdir -p .gpu-twin/cuda-link
    for lib in curand cublas cublasLt; do
        ln -sf "$(ls "$nv"/lib/lib$lib.so.* | head -1)" ".gpu-twin/cuda-link/lib$lib.so"
    done
    .gpu-twin/bin/python -c 'import torch, triton; print("twin: torch", torch.__version__, "triton", triton.__version__)'
    exit 0
fi

[ "$mode" = run ] || { echo "usage: $0 twin|fetch|run" >&2; exit 2; }
OUT="${OUT:-$PWD/gpu-out}"
SITE="${GPU_CHECK_SITE:-/tmp/site}"  # the carried wheels, installed (the image's site-packages are read-only)
mkdir -p "$OUT"
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/gpu_check.log"; }
started=$(date +%s)
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-530}  # the whole command; the device tool allows one 9-minute command
# A step's timeout: its own limit, or what is left before the deadline (at least 5 s), whichever is less.
cap() { local left=$(( DEADLINE_S - ($(date +%s) - started) )); [ "$left" -lt 5 ] && left=5; echo $(( $1 < left ? $1 : left )); }
# Carried wheels into $SITE, replacing what is there, within a step's timeout: site_install SECONDS WHEEL...
site_install() {
    local limit=$1; shift
    timeout "$(cap "$limit")" python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --force-reinstall --target "$SITE" "$@"
}

log "machine: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"
site_install 60 .whl/*.whl || { log "wheel install failed"; exit 1; }
export PYTHONPATH="$SITE:$PWD/src:$PWD" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# GPU_CHECK_CAPABILITY stands in for the GPU's in a rehearsal on the CPU twin.
cap="${GPU_CHECK_CAPABILITY:-$(python3 -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null)}"
export TORCH_CUDA_ARCH_LIST="${cap:-9.0}" MAX_JOBS=16
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}"
python3 -c 'import torch, triton, diffusers, transformers, deepspeed; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__, "deepspeed", deepspeed.__version__)' 2>&1 | tail -1 | tee -a "$OUT/gpu_check.log"
which nvcc >/dev/null && log "nvcc: $(nvcc --version | tail -2 | head -1)" || log "nvcc: not found (DeepSpeed's ops cannot build)"

log "building the full-size random model (on the CPU, beside the DeepSpeed ops)"
timeout "$(cap 90)" python3 -c 'from pathlib import Path; from sd_endpoint.model.demo import write_demo_model; write_demo_model(Path("/tmp/sd21-full"), full_size=True, cache_dir=Path("/tmp/sd-cache"))' \
    > "$OUT/build_model.log" 2>&1 &
model_pid=$!

ops_load='from deepspeed.ops.op_builder import InferenceBuilder, SpatialInferenceBuilder
InferenceBuilder().load(); SpatialInferenceBuilder().load(); print("DeepSpeed ops loaded")'
timeout "$(cap 30)" python3 -m deepspeed.env_report > "$OUT/ds_report_before.log" 2>&1
# The carried ops must be in the package: without them DeepSpeed's load() quietly compiles instead.
prebuilt_load="from deepspeed.git_version_info import installed_ops as i
assert i['transformer_inference'] and i['spatial_inference'], 'the carried DeepSpeed has no pre-built ops'
$ops_load"
prebuilt=no
if [ "$cap" = 9.0 ] && ls .whl/ops/deepspeed-*.whl >/dev/null 2>&1; then  # fetch builds them for sm_90 only
    site_install 30 .whl/ops/deepspeed-*.whl > "$OUT/ds_prebuilt.log" 2>&1 \
        && timeout "$(cap 60)" python3 -c "$prebuilt_load" >> "$OUT/ds_prebuilt.log" 2>&1 && prebuilt=yes
    log "DeepSpeed ops pre-built (carried): $prebuilt ($(tail -1 "$OUT/ds_prebuilt.log"))"
    if [ "$prebuilt" = no ]; then  # back to the pure-Python DeepSpeed, whose ops build here
        site_install 30 .whl/deepspeed-*.whl >> "$OUT/ds_prebuilt.log" 2>&1 \
            || log "reinstalling the pure-Python DeepSpeed failed (see ds_prebuilt.log)"
    fi
fi
if [ "$prebuilt" = no ]; then
    log "DeepSpeed ops: build for sm_${cap/./} in $TORCH_EXTENSIONS_DIR"
    find "$TORCH_EXTENSIONS_DIR" -name lock -type f -print -delete 2>/dev/null | sed 's/^/removed stale lock /' | tee -a "$OUT/gpu_check.log"
    timeout "$(cap 200)" python3 -c "$ops_load" > "$OUT/ds_build.log" 2>&1
    log "DeepSpeed op build exit $? ($(tail -1 "$OUT/ds_build.log"))"
    find "$TORCH_EXTENSIONS_DIR" -name lock -type f -delete 2>/dev/null  # a timed-out build must not block later loads
fi
timeout "$(cap 30)" python3 -m deepspeed.env_report > "$OUT/ds_report_after.log" 2>&1 || true
if wait "$model_pid"; then log "model built"; else log "model build failed (see build_model.log)"; fi

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
