#!/usr/bin/env bash
# One-command GPU check: on a fresh GPU machine with this repository, install what is missing, build the fused
# kernels, run every gpu-marked test, the fused-kernel benchmark and the GPU rows of benchmarks/sep_attention.py and
# benchmarks/train_step.py and benchmarks/long_context.py, and write everything into one folder:
#   pytest_gpu.xml (JUnit), kernel_status.txt, fused_kernels.json/.txt, sep_attention_gpu.json/.txt,
#   auto_table.json (the shipped auto table with measured cuda entries: copy it over megatron/sepllm/attention/auto_table.json),
#   train_step_gpu.json/.txt, long_context_gpu.json/.txt, steps.json (exit code and seconds of each step),
#   summary.txt (short text summary).
# Budget: the whole run stops within --budget seconds (default 460, under 8 minutes): each step has its own limit,
# cut to what is left; a step with under 20 s left is skipped (marked in steps.json). Steps run in order of need:
# tests, then the SepLLM attention and long-context rows, then the fused-kernel and train-step benchmarks.
#
# usage: tools/gpu_check.sh [--out DIR] [--budget SECONDS] [--skip-install] [--dry-run] [-h|--help]
#   --out DIR          result folder (default runs/gpu_check-<UTC time>)
#   --budget SECONDS   wall-clock budget of the whole run (default 460)
#   --skip-install     do not pip install (use the current environment as it is)
#   --dry-run          print the steps and their commands, run nothing, write nothing
# Environment: PYTHON (default python3), GPU_CHECK_ARCH (TORCH_CUDA_ARCH_LIST for the build; default: this GPU only).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT=""
DRY=0
INSTALL=1
BUDGET=460
while [ $# -gt 0 ]; do
  case "$1" in
    --out) [ $# -ge 2 ] || { echo "error: --out needs a folder" >&2; exit 2; }; OUT="$2"; shift 2 ;;
    --out=*) OUT="${1#--out=}"; shift ;;
    --budget) [ $# -ge 2 ] && [[ "$2" =~ ^[0-9]+$ ]] || { echo "error: --budget needs a number of seconds" >&2; exit 2; }
              BUDGET="$2"; shift 2 ;;
    --skip-install) INSTALL=0; shift ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ -n "$OUT" ] || OUT="$ROOT/runs/gpu_check-$(date -u +%Y%m%dT%H%M%SZ)"
case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac
TOK="$ROOT/megatron/tokenizer/assets/20B_tokenizer.json"
BOOKS="$ROOT/megatron/data/corpora/pg19_sample"

# sep_attention times compact, dense, flex, flex_compact and triton; each FlexAttention path compiles forward and
# backward once per length, so two lengths (4096, 16384) keep the step inside its limit (rows are written after each
# length). The auto table it writes may pick triton; long_context trains with the shipped rule (flex_compact).
# train_step: HF GPTNeoXForCausalLM eager / compiled loops against ours eager / compiled / compiled + fused loss.
# name | time limit (s) | command (run from the repository root; $OUT, $PY expanded at run time)
STEPS=(
  "install|300|if [ $INSTALL = 1 ]; then \$PY -c 'import torch' 2>/dev/null || \$PY -m pip install torch && \$PY -m pip install --no-build-isolation -e '.[dev]' -c requirements/constraints.txt; else echo 'install skipped'; fi"
  "kernels|300|\$PY -c 'from megatron.kernels import kernel_status as k; s = k(); print(s.available, s.reason); raise SystemExit(0 if s.available else 1)' > \"\$OUT/kernel_status.txt\" 2>&1; rc=\$?; cat \"\$OUT/kernel_status.txt\"; exit \$rc"
  "gpu_tests|300|\$PY -m pytest tests -m gpu -q -p no:cacheprovider --junitxml \"\$OUT/pytest_gpu.xml\""
  "sep_attention|240|cp megatron/sepllm/attention/auto_table.json \"\$OUT/auto_table.json\" && \$PY benchmarks/sep_attention.py --device cuda --dtype bfloat16 --seq-lens 4096 16384 --windows 256 --repeats 3 --pg19-dir \"$BOOKS\" --json \"\$OUT/sep_attention_gpu.json\" --write-auto-table \"\$OUT/auto_table.json\" | tee \"\$OUT/sep_attention_gpu.txt\""
  "long_context|240|\$PY benchmarks/long_context.py --device cuda --precision bf16 --seq-lens 4096 8192 16384 --steps 3 --rounds 3 --tokenizer \"$TOK\" --json \"\$OUT/long_context_gpu.json\" | tee \"\$OUT/long_context_gpu.txt\""
  "fused_kernels|200|\$PY benchmarks/fused_kernels.py --device cuda --dtype bfloat16 --seq-lens 2048 8192 --repeats 10 --warmup 3 --json \"\$OUT/fused_kernels.json\" | tee \"\$OUT/fused_kernels.txt\""
  "train_step|150|\$PY benchmarks/train_step.py --device cuda --tokenizer \"$TOK\" --layers 4 --hidden 256 --heads 4 --seq 1024 --micro 4 --warmup 2 --steps 5 --rounds 3 --json \"\$OUT/train_step_gpu.json\" | tee \"\$OUT/train_step_gpu.txt\""
)

if [ "$DRY" = 1 ]; then
  echo "gpu_check dry run: results would go to $OUT (budget ${BUDGET}s)"
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name limit cmd <<< "$step"
    echo "[$name] (limit ${limit}s) $cmd"
  done
  exit 0
fi

mkdir -p "$OUT" || { echo "error: cannot create result folder $OUT" >&2; exit 1; }
cd "$ROOT" || exit 1
if [ -z "${GPU_CHECK_ARCH:-}" ]; then
  GPU_CHECK_ARCH="$($PY -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || true)"
fi
[ -n "$GPU_CHECK_ARCH" ] && export TORCH_CUDA_ARCH_LIST="$GPU_CHECK_ARCH"
export PY OUT
echo "[" > "$OUT/steps.json"
{
  echo "gpu_check $(date -u +%FT%TZ) in $ROOT (commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown))"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
} > "$OUT/summary.txt"
failed=0
first=1
t0=$(date +%s)
for step in "${STEPS[@]}"; do
  IFS='|' read -r name limit cmd <<< "$step"
  left=$(( BUDGET - ($(date +%s) - t0) ))
  [ "$first" = 1 ] || echo "," >> "$OUT/steps.json"
  first=0
  if [ "$left" -lt 20 ]; then                      # out of budget: record the step as skipped
    failed=1
    echo "== $name skipped (${left}s of the ${BUDGET}s budget left)"
    printf '{"step": "%s", "exit_code": null, "seconds": 0, "timed_out": false, "skipped": true}' "$name" \
      >> "$OUT/steps.json"
    echo "$name: skipped (budget)" >> "$OUT/summary.txt"
    continue
  fi
  [ "$limit" -le "$left" ] || limit="$left"
  echo "== $name (limit ${limit}s)"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" bash -o pipefail -c "$cmd" > >(tee "$OUT/$name.log") 2>&1
  rc=$?
  secs=$(( $(date +%s) - start ))
  [ "$rc" = 0 ] || failed=1
  printf '{"step": "%s", "exit_code": %d, "seconds": %d, "timed_out": %s, "skipped": false}' "$name" "$rc" "$secs" \
    "$([ "$rc" = 124 ] || [ "$rc" = 137 ] && echo true || echo false)" >> "$OUT/steps.json"
  echo "$name: exit $rc in ${secs}s" >> "$OUT/summary.txt"
done
echo "]" >> "$OUT/steps.json"
{
  echo "--- kernels: $(cat "$OUT/kernel_status.txt" 2>/dev/null | tail -1)"
  "$PY" - "$OUT/pytest_gpu.xml" <<'PYEOF' 2>/dev/null || echo "--- gpu tests: no JUnit file"
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
print("--- gpu tests: " + ", ".join(f"{k} {suite.get(k)}" for k in ("tests", "failures", "errors", "skipped")))
PYEOF
  echo "--- fused kernels (speedup vs eager, fraction of peak):"
  grep -E '^(rope|add_layernorm|add_rmsnorm|layernorm|rmsnorm) +(fused|compile)' "$OUT/fused_kernels.txt" 2>/dev/null
} >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
exit "$failed"
