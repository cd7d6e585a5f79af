#!/usr/bin/env bash
# The Python packages bench/gpu_qlora.py needs on a GPU machine that has torch, transformers and
# peft but no network: tuneforge's engine imports pydantic-settings, and QLoRA needs bitsandbytes.
#
#   here (network):  bash bench/gpu_setup.sh prepare   # wheels into .cache/gpu-wheels (~8 MB)
#   there (offline): bash bench/gpu_setup.sh install   # into /tmp/tuneforge-site, checked
#
# .cache/ is git-ignored, so the wheels travel only where they are carried (the device tool's
# `carry: [".cache/gpu-wheels"]`). gpu_qlora.py puts /tmp/tuneforge-site (or $TUNEFORGE_GPU_SITE)
# first on its sys.path and its parts' PYTHONPATH. The bitsandbytes wheel is slimmed to the CPU
# and CUDA 13 libraries (the machine's torch is cu130; set BNB_KEEP to a regex to keep others,
# e.g. BNB_KEEP='cpu|cuda12[0-9]|cuda13[0-9]'): the whole wheel is 43 MB of the 64 MiB a call
# may carry. typing_extensions is installed there only if the machine's own is too old.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.cache/gpu-wheels
SITE=${TUNEFORGE_GPU_SITE:-/tmp/tuneforge-site}
BNB_WHEEL=${BNB_WHEEL:-/tmp/bnbwheel/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl}
BNB_KEEP=${BNB_KEEP:-cpu|cuda13[0-9]}
# The versions this repo's .venv runs (pydantic-core must be the one pydantic pins).
PINS="pydantic==2.14.3 pydantic-core==2.50.4 pydantic-settings==2.16.3 python-dotenv==1.2.4
annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0"

case "${1:-}" in
prepare)
  PIP=${PIP:-.venv/bin/python -m pip}
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  # shellcheck disable=SC2086
  $PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$WHEELS" $PINS
  [ -f "$BNB_WHEEL" ] || { echo "no bitsandbytes wheel at $BNB_WHEEL (set BNB_WHEEL)"; exit 1; }
  python3 - "$BNB_WHEEL" "$WHEELS/$(basename "$BNB_WHEEL")" "$BNB_KEEP" <<'EOF'
import re, sys, zipfile
src, dst, keep = sys.argv[1], sys.argv[2], re.compile(rf"libbitsandbytes_({sys.argv[3]})\.so$")
dropped = []
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    names = zin.namelist()
    for n in names:
        if re.search(r"libbitsandbytes_.*\.so$", n) and not keep.search(n):
            dropped.append(n)
    for n in names:
        if n in dropped:
            continue
        data = zin.read(n)
        if n.endswith(".dist-info/RECORD"):
            data = "".join(line for line in data.decode().splitlines(keepends=True)
                           if line.split(",")[0] not in dropped).encode()
        zout.writestr(zin.getinfo(n), data)
print(f"bitsandbytes wheel slimmed: kept {[n for n in names if 'libbitsandbytes_' in n and n not in dropped]}")
EOF
  ls -la "$WHEELS"
  du -sh "$WHEELS"
  ;;
install)
  PY=${PYTHON:-python3}
  ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEELS: carry .cache/gpu-wheels"; exit 1; }
  mkdir -p "$SITE"
  # shellcheck disable=SC2046
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" $(ls "$WHEELS"/*.whl | grep -v typing_extensions)
  if ! PYTHONPATH=$SITE $PY -c 'import pydantic, pydantic_settings' 2>/dev/null; then
    echo "the machine's typing_extensions is too old for pydantic: installing 4.16.0"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHEELS"/typing_extensions-*.whl
  fi
  PYTHONPATH=$SITE:. $PY - <<'EOF'
import bitsandbytes, pydantic, pydantic_settings, torch, transformers
import tuneforge.engine.engine  # everything the engine imports
print(f"gpu_setup: torch {torch.__version__} (CUDA {torch.version.cuda}, available "
      f"{torch.cuda.is_available()}), transformers {transformers.__version__}, "
      f"bitsandbytes {bitsandbytes.__version__}, pydantic {pydantic.__version__}, "
      f"pydantic-settings {pydantic_settings.__version__}: tuneforge.engine imports")
EOF
  ;;
*)
  echo "usage: bash bench/gpu_setup.sh prepare|install"; exit 2 ;;
esac
