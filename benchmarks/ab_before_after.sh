#!/usr/bin/env bash
# Before/after timing in one run on one GPU: an older commit's engine against this tree.
#
#   git archive <old-commit> raas_flex benchmarks | tar -x -C .before     # the old tree, once
#   bash benchmarks/ab_before_after.sh step  OUT_DIR TAG SHAPES            # one-layer decode step
#   bash benchmarks/ab_before_after.sh e2e   OUT_DIR TAG                   # Llama-3.1-8B, B=8, L=2048
#
#   bash benchmarks/ab_before_after.sh configs OUT_DIR TAG SHAPES CONTEXTS BUDGETS CONFIGS   # any configurations
#   bash benchmarks/ab_before_after.sh generate OUT_DIR TAG ORDER RAAS_CONFIGS              # long_context.py rows
#
# configs / generate need an old tree whose scripts take --configs / --raas-configs (b3bd354 and later):
# the same decode_step.py grid, or the same long_context.py rows (Llama-3.1-8B, B=8, 32k, L=2048; ORDER
# as --order, e.g. raas,dense_flash,quest; each side stops starting rows after DEADLINE_S seconds,
# default 280, so that both fit a 10-minute call), old tree first, tagged TAG_before and TAG_after.
# step: benchmarks/decode_step.py at N=8192, L in {1k, 2k, 4k} for SHAPES (B/Hq/Hkv,...), the old
# tree's shipped default ("raas") and its one-kernel step ("raas_triton"), then this tree's shipped
# default ("raas") and its flex backend ("raas:backend=flex"). e2e: benchmarks/long_context.py's raas
# rows (generate, random weights) of the old tree (flex and triton attention) and of this tree.
set -euo pipefail
mode=$1 out=$(realpath -m "$2") tag=$3
old=${OLD:-.before}
mkdir -p "$out"
if [[ $mode == step ]]; then
  shapes=$4
  common=(--shapes "$shapes" --contexts 8192 --budgets 1024,2048,4096 --out "$out")
  (cd "$old" && python benchmarks/decode_step.py "${common[@]}" --policies raas,raas_triton \
      --tag "${tag}_before") 2>&1 | grep -v Warning
  python benchmarks/decode_step.py "${common[@]}" --configs "raas;raas:backend=flex" --tag "${tag}_after" 2>&1 \
      | grep -v Warning
elif [[ $mode == e2e ]]; then
  common=(--arch llama-3.1-8b --batch 8 --contexts 32768 --budget 2048 --order raas --out "$out")
  (cd "$old" && python benchmarks/long_context.py "${common[@]}" --raas-attention flex,triton) 2>&1 | grep -v Warning
  for f in "$out"/long_context_llama-3.1-8b_B8*; do mv "$f" "${f/long_context_/long_context_${tag}_before_}"; done
  python benchmarks/long_context.py "${common[@]}" --raas-configs "raas;raas:backend=flex" 2>&1 | grep -v Warning
  for f in "$out"/long_context_llama-3.1-8b_B8*; do
    [[ $f == *_before_* ]] || mv "$f" "${f/long_context_/long_context_${tag}_after_}"
  done
elif [[ $mode == configs ]]; then
  grid=(--shapes "$4" --contexts "$5" --budgets "$6" --configs "$7" --baseline-budgets all --out "$out")
  (cd "$old" && python benchmarks/decode_step.py "${grid[@]}" --tag "${tag}_before") 2>&1 | grep -v Warning
  python benchmarks/decode_step.py "${grid[@]}" --tag "${tag}_after" 2>&1 | grep -v Warning
elif [[ $mode == generate ]]; then
  rows=(--arch llama-3.1-8b --batch 8 --contexts 32768 --budget 2048 --quest-contexts 32768 --order "$4"
        --raas-configs "$5" --deadline-s "${DEADLINE_S:-280}")
  for side in before after; do
    dir="$out/${tag}_$side"
    if [[ $side == before ]]; then
      (cd "$old" && python benchmarks/long_context.py "${rows[@]}" --out "$dir") 2>&1 | grep -v Warning
    else
      python benchmarks/long_context.py "${rows[@]}" --out "$dir" 2>&1 | grep -v Warning
    fi
  done
else
  echo "mode must be step, e2e, configs or generate, got $mode" >&2; exit 2
fi
