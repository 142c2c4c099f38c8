#!/usr/bin/env bash
# Rewrite requirements/constraints.txt from the active virtual environment (run after the suite passed in it).
#
#   . .venv/bin/activate && python -m pytest tests -q -p no:cacheprovider && bash tools/dev/update_constraints.sh
#
# The file pins every installed distribution (the whole dependency closure), so the README set-up and .ci/run install
# exactly what the suite last passed with. torch is written without its local build tag (+cpu / +cu128) so that the
# same file serves CPU and CUDA wheels; the project itself (editable install) is left out.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=requirements/constraints.txt
{
  echo "# Exact versions the test suite last passed with (python $(python -c 'import sys; print(".".join(map(str, sys.version_info[:2])))'), $(date -u +%Y-%m-%d))."
  echo "# Used by the README set-up command and .ci/run: pip install ... -c requirements/constraints.txt"
  echo "# Regenerate with tools/dev/update_constraints.sh after a green run on newer releases."
  python -m pip freeze --exclude-editable --all | grep -v -i -E '^(sepllm-neox|pip|setuptools|wheel)[=@ ]' \
    | sed -E 's/^(torch==[0-9.]+)\+[A-Za-z0-9.]+$/\1/' | LC_ALL=C sort -f
} > "$out.tmp"
mv "$out.tmp" "$out"
echo "wrote $out ($(grep -vc '^#' "$out") pins)"
