#!/usr/bin/env bash
# NVIDIA's perf_analyzer without Docker, for measuring the gateway's /v2 and gRPC doors like a Triton
# (docs/performance.md). Opt-in: a ~35 MB download, never part of `make install` or `make test`.
#   scripts/install_perf_analyzer.sh [DIR]     (default .tgw/perf_analyzer)
# The binary ships in the tritonclient 2.51 wheel's data folder (later wheels leave it out); it needs
# libcudart.so.12 (nvidia-cuda-runtime-cu12 wheel, also on a CPU-only machine) and libb64.so.0d
# (Debian/Ubuntu: apt-get install libb64-0d). DIR/perf_analyzer is a wrapper that finds the library;
# tests/integration/test_perf_analyzer.py runs it (or the one TGW_PERF_ANALYZER names).
set -euo pipefail
dest=$(realpath -m "${1:-.tgw/perf_analyzer}")
pip=${PIP:-.venv/bin/pip}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
root=$(cd "$(dirname "$0")/.." && pwd)
"$pip" download -q --no-deps --require-hashes -r "$root/requirements/perf-analyzer.txt" -d "$tmp"
mkdir -p "$dest/bin" "$dest/lib"
python3 -m zipfile -e "$tmp"/tritonclient-2.51.0-*.whl "$tmp/tc"
python3 -m zipfile -e "$tmp"/nvidia_cuda_runtime_cu12-*.whl "$tmp/cuda"
install -m 755 "$tmp/tc/tritonclient-2.51.0.data/data/bin/perf_analyzer" "$dest/bin/perf_analyzer"
install -m 644 "$tmp/cuda/nvidia/cuda_runtime/lib/libcudart.so.12" "$dest/lib/libcudart.so.12"
cat > "$dest/perf_analyzer" <<'WRAP'
#!/bin/sh
here=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/bin/perf_analyzer" "$@"
WRAP
chmod 755 "$dest/perf_analyzer"
if ! LD_LIBRARY_PATH="$dest/lib" ldd "$dest/bin/perf_analyzer" | grep "libb64.so.0d => /" >/dev/null; then
  echo "perf_analyzer needs libb64.so.0d: apt-get install libb64-0d (Debian/Ubuntu)" >&2
fi
echo "$dest/perf_analyzer"
