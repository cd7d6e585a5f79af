#!/usr/bin/env bash
# The Python packages bench/gpu_qlora.py needs on a GPU machine that has torch, transformers and
# peft but no network: tuneforge's engine imports pydantic-settings, and QLoRA needs bitsandbytes.
#
#   here (network):  bash bench/gpu_setup.sh prepare   # wheels into .cache/gpu-wheels (~8 MB)
#   there (offline): bash bench/gpu_setup.sh install   # into /tmp/tuneforge-site, checked
#
# .cache/ is git-ignored, so the wheels reach the GPU machine only where .cache/gpu-wheels is
# copied to (the same path in a checkout there). gpu_qlora.py puts /tmp/tuneforge-site (or $TUNEFORGE_GPU_SITE)
# first on its sys.path and its parts' PYTHONPATH. The bitsandbytes wheel is slimmed to the CPU
# and CUDA 13 libraries (the machine's torch is cu130; set BNB_KEEP to a regex to keep others,
# e.g. BNB_KEEP='cpu|cuda12[0-9]|cuda13[0-9]'): the whole wheel is 43 MB of the 64 MiB a call
# may take along. typing_extensions is installed there only if the machine's own is too old.
#
# bench/gpu_ray.py (a tuneforge server with its engine in a Ray actor, driven by the tinker SDK)
# needs the server's packages as well:
#
#   here (network):  bash bench/gpu_setup.sh prepare-ray   # .cache/gpu-wheels-ray
#   there (offline): bash bench/gpu_setup.sh install-ray   # into /tmp/tuneforge-site, checked
#
# with .cache/gpu-wheels-ray copied along: the pydantic pins above plus fastapi, starlette,
# uvicorn, SQLAlchemy, the tinker SDK (and its httpx[http2], rich, orjson, zstandard, protobuf,
# ...), tinker-cookbook, nvidia-ml-py and ray with its core dependencies (RAY_PINS), all
# --no-deps at the versions this repo's .venv runs. The machine's torch, transformers and peft
# bring numpy, safetensors, tokenizers, jinja2, pyyaml, psutil, huggingface_hub and with it
# httpx, anyio, h11, httpcore, idna and certifi (huggingface_hub 1.x needs httpx), so those are
# not carried. The ray wheel (79 MB) is slimmed to what a core-only cluster on one machine runs:
# RAY_DROP (a regex of paths) drops the Java jar (32 MB), the dashboard's web client, serve,
# tune, train, rllib, data, air, llm and tests, which leaves the GCS server, the raylet,
# _raylet.so, the dashboard and runtime-env agents the raylet starts, and the Python core.
# PY_VERSION=3.11 RAY_WHEELS=DIR prepares the same set for this repo's Python, to check the
# slimmed wheel here.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.cache/gpu-wheels
SITE=${TUNEFORGE_GPU_SITE:-/tmp/tuneforge-site}
BNB_WHEEL=${BNB_WHEEL:-/tmp/bnbwheel/bitsandbytes-0.50.2-py3-none-manylinux_2_24_x86_64.whl}
BNB_KEEP=${BNB_KEEP:-cpu|cuda13[0-9]}
# The versions this repo's .venv runs (pydantic-core must be the one pydantic pins).
PINS="pydantic==2.14.3 pydantic-core==2.50.4 pydantic-settings==2.16.3 python-dotenv==1.2.4
annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0"
RAY_WHEELS=${RAY_WHEELS:-.cache/gpu-wheels-ray}
PY_VERSION=${PY_VERSION:-3.12}
# The server, the SDK and a core-only Ray, at the versions this repo's .venv runs.
RAY_PINS="fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 uvicorn==0.54.0 click==8.5.1
sqlalchemy==2.1.9 tinker==0.38.0 tinker-cookbook==0.5.8 distro==1.9.0 sniffio==1.3.1
orjson==3.13.0 protobuf==7.36.2 zstandard==0.25.0 rich==15.0.0 pygments==2.21.0
markdown-it-py==4.3.0 mdurl==0.1.2 h2==4.4.1 hpack==4.2.0 hyperframe==6.1.0
opentelemetry-api==1.45.2 nvidia-ml-py==13.615.71 ray==2.60.0 msgpack==1.2.4
jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
attrs==26.1.0 requests==2.34.2 urllib3==2.8.0 charset-normalizer==3.5.2"
RAY_DROP=${RAY_DROP:-'^ray/(jars|dashboard/client|serve|tune|train|rllib|data|air|llm|workflow)/|/tests/|\.pyi$'}

download() {  # download DIR PIN...: binary wheels for CPython $PY_VERSION, manylinux x86_64
  local dir=$1
  shift
  ${PIP:-.venv/bin/python -m pip} download -q --no-deps --only-binary=:all: \
    --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$dir" "$@"
}

case "${1:-}" in
prepare)
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  # shellcheck disable=SC2086
  download "$WHEELS" $PINS
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
prepare-ray)
  rm -rf "$RAY_WHEELS" && mkdir -p "$RAY_WHEELS/full"
  # shellcheck disable=SC2086
  download "$RAY_WHEELS" $PINS
  # shellcheck disable=SC2086
  download "$RAY_WHEELS/full" $RAY_PINS
  python3 - "$RAY_WHEELS" "$RAY_DROP" <<'EOF'
import re, shutil, sys, zipfile
from pathlib import Path
out, drop = Path(sys.argv[1]), re.compile(sys.argv[2])
for whl in sorted((out / "full").glob("*.whl")):
    if not whl.name.startswith("ray-"):
        shutil.move(str(whl), out / whl.name)
        continue
    dst, dropped, kept = out / whl.name, set(), 0
    with zipfile.ZipFile(whl) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if drop.search(info.filename):
                dropped.add(info.filename)
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(keepends=True)
                               if line.split(",")[0] not in dropped).encode()
            zout.writestr(info, data)  # the ZipInfo keeps each file's mode (executables)
            kept += 1
    print(f"ray wheel slimmed: {whl.stat().st_size / 1e6:.1f} MB -> "
          f"{dst.stat().st_size / 1e6:.1f} MB ({len(dropped)} files dropped, {kept} kept)")
shutil.rmtree(out / "full")
EOF
  ls -la "$RAY_WHEELS"
  du -sh "$RAY_WHEELS"
  total=$(du -sb "$RAY_WHEELS" | cut -f1)
  if [ "$total" -ge $((60 << 20)) ]; then
    echo "WARNING: $RAY_WHEELS is $((total >> 20)) MiB, over the 64 MiB budget for what travels with one run"
  fi
  ;;
install-ray)
  PY=${PYTHON:-python3}
  ls "$RAY_WHEELS"/ray-*.whl >/dev/null 2>&1 || {
    echo "no ray wheel in $RAY_WHEELS: carry .cache/gpu-wheels-ray"; exit 1; }
  mkdir -p "$SITE"
  # shellcheck disable=SC2046
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" $(ls "$RAY_WHEELS"/*.whl | grep -v typing_extensions)
  if ! PYTHONPATH=$SITE $PY -c 'import pydantic, pydantic_settings, fastapi' 2>/dev/null; then
    echo "the machine's typing_extensions is too old for pydantic: installing 4.16.0"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$RAY_WHEELS"/typing_extensions-*.whl
  fi
  RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 PYTHONPATH=$SITE:. $PY - <<'EOF'
import fastapi, ray, sqlalchemy, tinker, torch, transformers, uvicorn
import tuneforge.engine.ray_worker  # noqa: F401  (the engine in an actor)
import tuneforge.server.app  # noqa: F401  (the server, its routes and storage)
print(f"gpu_setup: torch {torch.__version__} (CUDA {torch.version.cuda}, available "
      f"{torch.cuda.is_available()}), transformers {transformers.__version__}, ray "
      f"{ray.__version__}, tinker {tinker.__version__}, fastapi {fastapi.__version__}, "
      f"sqlalchemy {sqlalchemy.__version__}: tuneforge.server.app and ray_worker import")
EOF
  ;;
*)
  echo "usage: bash bench/gpu_setup.sh prepare|install|prepare-ray|install-ray"; exit 2 ;;
esac
