#!/usr/bin/env bash
# The GPU check on a bare machine (issue 19; BENCHMARKS.md "GPU check").
#
#   bash bench/gpu_check.sh --prepare          # HERE, before the device call: wheels -> .gpu-wheels/ (~9 MB)
#   bash bench/gpu_check.sh --out $OUT ...     # THERE: install what the image lacks, run bench/gpu_check.py
#
# The environment: the GPU machine reaches no package registry and a call carries at most 64 MiB, so
# the locked .venv (torch + CUDA wheels, GBs) cannot travel or be rebuilt there. The image's python3
# brings torch, torchvision, lightning, transformers, numpy, scipy, safetensors, timm, huggingface-hub
# (see /work/.library/device/KINDS.md); the project's other dependencies are pure-Python wheels, pinned
# here to uv.lock's versions (Python >= 3.12 markers), downloaded by --prepare and carried
# (`carry: [".gpu-wheels"]`). Only the ones the image cannot import are installed, into /tmp/gpu-check-site.
# gpu_check.json records every package's version and location as imported.
# Elsewhere (CPU, CI) the project's .venv is used when there is one: GPU_CHECK_PYTHON overrides.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WHEELS="$ROOT/.gpu-wheels"
# module to import : wheel requirement (uv.lock versions)
PINS=(
  "omegaconf:omegaconf==2.3.1" "antlr4:antlr4-python3-runtime==4.9.3" "hydra:hydra-core==1.3.8"
  "wcwidth:wcwidth==0.9.4" "ftfy:ftfy==6.3.1" "open_clip:open-clip-torch==3.3.0" "torch_fidelity:torch-fidelity==0.4.0"
  "braceexpand:braceexpand==0.1.7" "webdataset:webdataset==1.0.2" "torchdata:torchdata==0.11.0" "diffusers:diffusers==0.42.1"
)

if [[ "${1:-}" == "--prepare" ]]; then
  mkdir -p "$WHEELS"
  platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  for pin in "${PINS[@]}"; do
    req="${pin#*:}"
    if [[ "$req" == antlr4-* ]]; then  # sdist only on PyPI: build its (pure-Python) wheel here
      python3 -m pip wheel -q --no-deps -w "$WHEELS" "$req" || exit 1
    else
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$WHEELS" "$req" || exit 1
    fi
  done
  du -sh "$WHEELS"; ls "$WHEELS"
  exit 0
fi

PY="${GPU_CHECK_PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
SITE=/tmp/gpu-check-site
missing=()
for pin in "${PINS[@]}"; do
  module="${pin%%:*}"; req="${pin#*:}"
  "$PY" -c "import $module" 2>/dev/null || missing+=("$req")
done
if (( ${#missing[@]} )); then
  echo "[gpu_check.sh] $PY lacks: ${missing[*]}; installing from $WHEELS into $SITE"
  files=()
  for req in "${missing[@]}"; do
    name="${req%%==*}"; version="${req#*==}"; stem="${name//-/_}"
    found=("$WHEELS"/"$stem"-"$version"-*.whl)
    [[ -f "${found[0]}" ]] && files+=("${found[0]}") || echo "[gpu_check.sh] no wheel for $req in $WHEELS (run --prepare here first)"
  done
  if (( ${#files[@]} )); then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${files[@]}" \
      || echo "[gpu_check.sh] pip install failed: the parts that need these packages will fail"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
export PYTHONPATH="$ROOT/src:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT" && exec "$PY" bench/gpu_check.py "$@"
