#!/usr/bin/env bash
# Wheels a bare device machine lacks for `tests/device/gpu_check.py`, for CPython 3.12 on x86-64, into .whl/
# (git-ignored through .git/info/exclude). That machine's image has torch (CUDA 13), accelerate, numpy,
# grpcio, aiohttp, msgpack, psutil, requests, pytest and matplotlib but none of these, and no registry.
# The bitsandbytes wheel keeps only its CUDA 13 and CPU libraries (129 MB unpacked otherwise), so the
# whole set (41 MB) travels with the working tree under the device's 64 MiB limit.
# On the device:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PATH=/tmp/site/bin:$PATH PYTHONPATH=/tmp/site:$PWD/custom python3 tests/device/gpu_check.py
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP=${PIP:-.venv/bin/pip}
OUT=.whl
mkdir -p "$OUT" .git/info
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude

binary=(
  nvflare==2.9.0 tenseal==0.3.18 bitsandbytes==0.50.2 pydantic==2.14.3 pydantic_core==2.50.4
  annotated-types==0.8.0 typing-inspection==0.4.5 transformers==5.23.0 tokenizers==0.23.3 peft==0.21.2
  cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 docker==7.2.0 nltk==3.10.4 defusedxml==0.7.1
)
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for spec in "${binary[@]}"; do
  "$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" -d "$OUT" "$spec"
done
# Published as source only; both are pure Python, so a wheel built here installs there.
"$PIP" wheel -q --no-deps -w "$OUT" pyhocon==0.3.63 rouge_score==0.1.2

bnb=$(ls "$OUT"/bitsandbytes-*.whl)
tmp=$(mktemp -d)
(cd "$tmp" && unzip -q "$OLDPWD/$bnb" \
  && find bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*cuda13*' ! -name '*cpu*' -delete \
  && record=$(ls -d ./*.dist-info)/RECORD && grep -v -E 'libbitsandbytes_(cuda1[0-2]|rocm)' "$record" >"$record.new" \
  && mv "$record.new" "$record" && rm "$OLDPWD/$bnb" && zip -q -r "$OLDPWD/$bnb" .)
rm -rf "$tmp"
du -sh "$OUT"
