#!/usr/bin/env bash
# The real-text study of experiments/real_text.md: one pipeline per (cell, seed), all side by side on one GPU
# (eager, one CPU thread each), then the table and curves. Cells are MODEL:STEPS:K.
#   experiments/real_text.sh OUT_DIR llama_6m:600:120 llama_20m:600:120 [...]
# CORPUS (default experiments/data/manpages, from experiments/real_text_corpus.py), SEEDS (default "0 1 2"),
# LIMIT (seconds per pipeline, default none), TRAINER (default "trainer=gpu") and EXTRA (more overrides for
# every job) are read from the
# environment. A pipeline stopped by LIMIT resumes when the script runs again with the same OUT_DIR.
set -uo pipefail
out=$(realpath -m "$1"); shift
corpus=$(realpath "${CORPUS:-experiments/data/manpages}")
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false RAYON_NUM_THREADS=2
mkdir -p "$out"
for cell in "$@"; do
  IFS=: read -r model steps k <<< "$cell"
  for seed in ${SEEDS:-0 1 2}; do
    name="rt_${model}_s${steps}_k${k}_seed${seed}"
    (cd "$out" && ${LIMIT:+timeout "$LIMIT"} afpt experiment=real_text "corpus_dir=$corpus" ${TRAINER:-trainer=gpu} \
      "model=$model" "trainer.max_steps=$steps" "trainer.val_check_interval=$((steps / 4))" \
      "forgetting.every_n_steps=$k" "seed=$seed" optim.compile=false data.num_workers=0 \
      trainer.enable_progress_bar=false "name=$name" ${EXTRA:-} > "$out/$name.log" 2>&1
      echo "$cell seed $seed: exit $?") &
  done
done
wait
python3 "$(dirname "$0")/real_text_report.py" "$out/runs" --out "$out/summary"
