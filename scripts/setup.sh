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
.venv/bin/python -m pip install -q --disable-pip-version-check "${TORCH[@]}" 2>&1 | grep -v "is ignored" || true
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v "is ignored" || true
  bash .ci/browser-deps.sh || echo "setup: could not install chromium; browser tests will be skipped" >&2
else
  .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[eval]' 2>&1 | grep -v "is ignored" || true
fi
.venv/bin/python -c "import ckptflow, torch, prefect; print('ckptflow', ckptflow.__version__, '| torch', torch.__version__, '| prefect', prefect.__version__)"
.venv/bin/python -c "from importlib.metadata import version; print('lm_eval', version('lm_eval'))"
