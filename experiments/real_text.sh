#!/usr/bin/env bash
# The real-text study of experiments/real_text.md: one pipeline per (cell, seed), all side by side on one GPU
# (eager, one CPU thread each), then the table and curves. Cells are MODEL:STEPS:K.
#   experiments/real_text.sh OUT_DIR llama_6m:600:120 llama_20m:600:120 [...]
# CORPUS (default experiments/data/manpages, from experiments/real_text_corpus.py), SEEDS (default "0 1 2"),
# LIMIT (seconds per job, default none), TRAINER (default "trainer=gpu") and EXTRA (more overrides for every job)
# are read from the environment.
# Each pipeline's two arms run their pretrain -> adapt -> instruct stages as two chains at once, into the
# pipeline's own stage folders; `stage=pipeline` then finds them finished, evaluates every model and writes the
# report. A job stopped by LIMIT resumes when the script runs again with the same OUT_DIR.
set -uo pipefail
out=$(realpath -m "$1"); shift
corpus=$(realpath "${CORPUS:-experiments/data/manpages}")
here=$(dirname "$(realpath "$0")")
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false RAYON_NUM_THREADS=2
mkdir -p "$out"
cd "$out" || exit 1

job() {  # job LOG OVERRIDES...: one afpt command of a pipeline, stopped after LIMIT seconds if set
  local log=$1; shift
  ${LIMIT:+timeout "$LIMIT"} afpt experiment=real_text "corpus_dir=$corpus" ${TRAINER:-trainer=gpu} "$@" \
    optim.compile=false data.num_workers=0 trainer.enable_progress_bar=false ${EXTRA:-} >> "$log" 2>&1
}

arm() {  # arm NAME ARM FORGETTING COMMON...: the arm's pretrain, adapt and instruct runs, as stage=pipeline runs them
  local name=$1 arm=$2 forgetting=$3; shift 3
  local dir="runs/$name"
  for stage in pretrain adapt instruct; do
    [ -f "$dir/${stage}_$arm/metrics.json" ] && continue
    [ "$stage" = instruct ] && [[ " ${EXTRA:-} " == *" pipeline.instruct=false "* ]] && continue
    local from=()
    [ "$stage" = adapt ] && from=("init_from=$dir/pretrain_$arm/model")
    [ "$stage" = instruct ] && from=("init_from=$dir/adapt_$arm/model")
    local resume=()
    if [ -f "$dir/${stage}_$arm/checkpoints/last.ckpt" ] && [ "$stage" != instruct ]; then
      resume=(ckpt_path=last)
    else
      rm -rf "${dir:?}/${stage}_$arm"  # an interrupted run with nothing to resume from starts again
    fi
    job "$out/$name.$arm.log" "$@" "stage=$stage" "name=${name}_${stage}_$arm" \
      "hydra.run.dir=$dir/${stage}_$arm" "${from[@]}" "$forgetting" "${resume[@]}" || return 1
  done
}

for cell in "$@"; do
  IFS=: read -r model steps k <<< "$cell"
  for seed in ${SEEDS:-0 1 2}; do
    name="rt_${model}_s${steps}_k${k}_seed${seed}"
    common=("model=$model" "trainer.max_steps=$steps" "trainer.val_check_interval=$((steps / 4))" "seed=$seed")
    (arm "$name" af "forgetting.every_n_steps=$k" "${common[@]}" & arm "$name" baseline forgetting=none "${common[@]}" &
      wait
      job "$out/$name.log" "${common[@]}" "forgetting.every_n_steps=$k" "name=$name"
      echo "$cell seed $seed: exit $?") &
  done
done
wait
python3 "$here/real_text_report.py" "$out/runs" --out "$out/summary"
