#!/bin/sh
# Written by `tgw convert`: builds the TensorRT plan(s) of vae_timeseries on the GPU this runs on
# (plans are specific to the GPU and TensorRT version). Dockerfile.triton runs it; by hand:
#   TRTEXEC=/usr/src/tensorrt/bin/trtexec sh build_plan.sh
set -eu
cd "$(dirname "$0")"
TRTEXEC="${TRTEXEC:-trtexec}"
for onnx in */model.onnx; do
  v="${onnx%/model.onnx}"
  if [ -f "$v/model.plan" ] && [ "$v/model.plan" -nt "$onnx" ]; then continue; fi
  set --
  "$TRTEXEC" --onnx="$v"/model.onnx --saveEngine="$v"/model.plan --minShapes=series:1x1x20 --optShapes=series:32x1x20 --maxShapes=series:128x1x20 --memPoolSize=workspace:1024 --skipInference --fp16 "$@"
done
