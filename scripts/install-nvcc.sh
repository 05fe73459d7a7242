#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler from PyPI wheels into a virtual environment (no GPU, no
# system CUDA needed) and prints the path of its nvcc. Every piece stays at 13.0.x: a newer nvcc
# emits PTX that the lent machines' driver (580) rejects, and nvidia-nvvm is pinned by hand because
# the nvcc wheel does not pin it.
set -euo pipefail
venv="${MOE_EP_NVCC_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/moe-ep/nvcc-13.0.88}"
nvcc_path() { find "$venv" -path '*nvidia/cu13/bin/nvcc' -type f 2>/dev/null | head -n 1; }
if [ -z "$(nvcc_path)" ]; then
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 >&2
fi
nvcc="$(nvcc_path)"
[ -x "$nvcc" ] || { echo "install-nvcc: no nvcc under $venv" >&2; exit 1; }
echo "$nvcc"
