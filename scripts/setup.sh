#!/usr/bin/env bash
# Create .venv and install the engine into it; safe to rerun. `--test` adds the test dependencies.
#
# torch/torchvision go in first, then everything else without build isolation: sam2 ships only as a source
# distribution whose build imports torch, and an isolated build would fetch a second torch of its own.
# SAM2_BUILD_CUDA=0 skips sam2's optional CUDA extension (post-processing only; not needed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"

[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip "setuptools>=77" wheel
.venv/bin/python -m pip install -q "torch==2.14.0" "torchvision==0.29.0"
SAM2_BUILD_CUDA=0 .venv/bin/python -m pip install -q --no-build-isolation -e ".${extras}"
# The same check a test makes: torchvision's compiled ops must load (sam2 needs them).
.venv/bin/python -c "import torch, torchvision; torchvision.ops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)"
if [[ -n "$extras" ]] && ! command -v chromium >/dev/null && [[ ! -x /usr/bin/chromium ]]; then
  # The `engine view` tests drive Debian's chromium with Playwright (`playwright install` downloads browsers).
  apt=(env DEBIAN_FRONTEND=noninteractive apt-get -q)
  [[ $(id -u) -ne 0 ]] && apt=(sudo "${apt[@]}")
  if ! command -v apt-get >/dev/null; then
    echo "warning: no apt-get to install chromium; the engine view tests will skip" >&2
  elif ! "${apt[@]}" install -y chromium && ! { "${apt[@]}" update && "${apt[@]}" install -y chromium; }; then
    echo "warning: apt-get could not install chromium; the engine view tests will skip" >&2
  fi
fi
echo "engine installed in .venv ($(.venv/bin/engine --help >/dev/null && echo 'engine command ok'))"
