#!/usr/bin/env bash
# The GPU check: the CUDA tests (pytest -m cuda) and the training timings, on a CUDA host without internet.
#
#   bash bench/gpu_check.sh --prepare      # once, here (with internet): into .gpu/, which git ignores, the
#                                          # wheels the host lacks (hydra-core, omegaconf, antlr4) and the data
#   bash bench/gpu_check.sh OUTDIR         # on the GPU host, from the checkout's root, with .gpu/ brought along:
#                                          # OUTDIR gets results.md (the tables), results.json, junit.xml, check.log
#   bash bench/gpu_check.sh --cpu OUTDIR   # the same, end to end, on a CPU with tiny data: a rehearsal
#
# The wheels go into a temporary folder for the run, named on PYTHONPATH with the checkout; nothing
# is installed into the host's Python. PYTHON names the Python (python3); GPU_CHECK_DIR the folder (.gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
prepared=${GPU_CHECK_DIR:-.gpu}
usage() { echo "usage: bash bench/gpu_check.sh --prepare | OUTDIR | --cpu OUTDIR" >&2; exit 2; }

case "${1:-}" in
  --prepare) [ $# -eq 1 ] || usage; exec "$python" bench/gpu_check.py prepare "$prepared" ;;
  --cpu) [ $# -eq 2 ] || usage; mode=cpu; out=$2 ;;
  "" | -*) usage ;;
  *) [ $# -eq 1 ] || usage; mode=cuda; out=$1 ;;
esac
if [ ! -f "$prepared/manifest.json" ]; then
  echo "error: $prepared/ is not prepared: run bash bench/gpu_check.sh --prepare, and bring $prepared/ along" >&2
  exit 1
fi
mkdir -p "$out"
out=$(cd "$out" && pwd)

site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
"$python" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check \
  --target "$site" "$prepared"/wheels/*.whl
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$python" bench/gpu_check.py "$mode" "$prepared" "$out" 2>&1 | tee "$out/check.log"
