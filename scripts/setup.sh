#!/usr/bin/env bash
# Set up ckptflow on a fresh machine: a virtualenv in .venv with everything the project needs.
#   bash scripts/setup.sh          # the library, the CLI, the Prefect layer and lm-eval (the `eval` extra)
#   bash scripts/setup.sh --test   # plus the test dependencies and the headless browser
# The `eval` extra (lm-evaluation-harness with transformers) is in both: the demo shows benchmark
# scores. It adds about 0.75 GB and a few minutes to a plain install; `pip install -e .` alone
# skips it (then run the demo with eval.tasks=[]).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first, pinned to the CPU wheel on local disk: a bare or open range makes pip pull a
# multi-GB CUDA build. The package's own range (>=2.4,<2.15) is satisfied by it.
# Name the local wheel folder ourselves: without PIP_FIND_LINKS in the environment pip would take
# the CUDA build from the index (2.13.0+cu130 sorts above 2.13.0+cpu).
if ls /opt/wheels/torch-2.13.0+cpu-*.whl >/dev/null 2>&1; then
  TORCH=("torch==2.13.0+cpu" --find-links /opt/wheels)
else
  TORCH=("torch==2.13.0")
fi
# pip's output without its noisy "... is ignored" lines; pip's exit status is the pipeline's
# (pipefail), and grep finding nothing to print (a quiet, successful pip) is not a failure.
pip_install() {
  { .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2>&1; } | { grep -v "is ignored" || true; }
}
pip_install "${TORCH[@]}"
if [ "${1:-}" = "--test" ]; then
  pip_install -e '.[test]'
  # llama.cpp's own Python binding proves the GGUF export (tests/test_gguf.py). It is an sdist only:
  # built once (5-10 min on 2 cores) into a wheel cache that later setups install from in seconds.
  # A failed build fails the setup: CI must not run without the proof.
  LLAMA_WHEELS=${CKPTFLOW_WHEEL_CACHE:-$HOME/.cache/ckptflow-wheels}
  if ! ls "$LLAMA_WHEELS"/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1; then
    echo "setup: building llama-cpp-python 0.3.36 into $LLAMA_WHEELS (takes minutes)" >&2
    mkdir -p "$LLAMA_WHEELS"
    { CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF" \
      .venv/bin/python -m pip wheel -q --disable-pip-version-check --no-deps llama-cpp-python==0.3.36 \
      -w "$LLAMA_WHEELS" 2>&1; } | { grep -v "is ignored" || true; }
  fi
  pip_install --find-links "$LLAMA_WHEELS" --only-binary llama-cpp-python llama-cpp-python==0.3.36
  .venv/bin/python -c "import llama_cpp" || { echo "setup: llama_cpp does not import" >&2; exit 1; }
  # Chromium is a system package (apt, as root), the one test dependency pip cannot install. Without
  # it setup goes on and only the tests marked `browser` skip, saying why (pytest -rs lists them);
  # every Python test dependency above is required: a failed install stops here.
  bash .ci/browser-deps.sh || echo "setup: could not install chromium (needs root and apt); the tests marked browser will skip" >&2
else
  pip_install -e '.[eval]'
fi
.venv/bin/python -c "import ckptflow, torch, prefect; print('ckptflow', ckptflow.__version__, '| torch', torch.__version__, '| prefect', prefect.__version__)"
.venv/bin/python -c "from importlib.metadata import version; print('lm_eval', version('lm_eval'))"
