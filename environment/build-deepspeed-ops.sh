#!/bin/sh
# Pre-builds DeepSpeed's inference ops for one GPU family at image build time (nvcc from the base image; no
# GPU needed), then checks they load. SD_ENDPOINT_BACKEND=auto considers DeepSpeed only when they are
# pre-built: it never compiles them at start-up (1-3 minutes per container start for five architectures).
# Used by both Dockerfiles:  environment/build-deepspeed-ops.sh PYTHON GPU_FAMILY
#   GPU_FAMILY: hopper (H100/H200) | ada (L4/L40S) | ampere (A100/A10) | turing (T4) | all
set -eu
python="$1"
family="$2"
case "$family" in
  hopper) arch="9.0" ;;
  ada) arch="8.9" ;;
  ampere) arch="8.0;8.6" ;;
  turing) arch="7.5" ;;
  all) arch="7.5;8.0;8.6;8.9;9.0" ;;
  *) echo "unknown GPU_FAMILY '$family': hopper, ada, ampere, turing or all" >&2; exit 1 ;;
esac
echo "Building DeepSpeed's inference ops for $family (TORCH_CUDA_ARCH_LIST=$arch)"
# DS_ACCELERATOR=cuda: an image builds on a machine without a GPU, where DeepSpeed would pick its CPU
# accelerator, silently build none of these ops and record "cpu" (seen: a 2 MB pure-Python wheel). No pip
# cache: a wheel cached by an earlier plain install of DeepSpeed has no ops and would be reused.
DS_ACCELERATOR=cuda TORCH_CUDA_ARCH_LIST="$arch" DS_BUILD_TRANSFORMER_INFERENCE=1 DS_BUILD_SPATIAL_INFERENCE=1 DS_BUILD_OPS=0 \
  "$python" -m pip install --no-deps --no-build-isolation --no-cache-dir --force-reinstall -c constraints.txt deepspeed
"$python" -c "from sd_endpoint.backends.selection import missing_deepspeed_ops as m; assert not m(), m()"
