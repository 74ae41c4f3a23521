#!/usr/bin/env bash
# The plasticity study of experiments/plasticity.md in one command: pretrain every (model, seed) without
# forgetting and with forgetting at every K, adapt every pretrained model under both protocols (chen, afa) at
# every corpus budget, JOBS runs at a time on one GPU (eager, one CPU thread each), then the report.
#   experiments/plasticity.sh OUT_DIR
# Read from the environment: MODELS (default "llama_6m llama_20m"), KS ("120 240"), SEEDS ("0 1 2"),
# BUDGETS (unique adaptation tokens, "500000 2000000"), JOBS (16), CORPUS (experiments/data/manpages),
# TRAINER ("trainer=gpu"), EXTRA (more overrides for every run), and BASE_EXTRA / AF_EXTRA (overrides for the
# baseline's / the forgetting arms' pretraining only, e.g. AF_EXTRA=optim.grad_clip=0.5).
# A finished run (metrics.json) is skipped.
set -uo pipefail
out=$(realpath -m "$1")
corpus=$(realpath "${CORPUS:-experiments/data/manpages}")
here=$(dirname "$(realpath "$0")")
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false RAYON_NUM_THREADS=1
mkdir -p "$out/runs"
cd "$out" || exit 1

run() {  # run DIR OVERRIDES...: one afpt run into runs/DIR, unless it finished before
  local dir=runs/$1; shift
  [ -f "$dir/metrics.json" ] && return 0
  rm -rf "$dir"
  afpt experiment=plasticity "corpus_dir=$corpus" ${TRAINER:-trainer=gpu} optim.compile=false data.num_workers=0 \
    trainer.enable_progress_bar=false "hydra.run.dir=$dir" "name=$(basename "$dir")" "$@" ${EXTRA:-} \
    > "$dir.log" 2>&1
  echo "$dir: exit $?"
}
export -f run
export corpus out

jobs=()
for model in ${MODELS:-llama_6m llama_20m}; do
  for seed in ${SEEDS:-0 1 2}; do
    jobs+=("pre_${model}_base_s$seed stage=pretrain model=$model seed=$seed forgetting=none ${BASE_EXTRA:-}")
    for k in ${KS:-120 240}; do
      jobs+=("pre_${model}_k${k}_s$seed stage=pretrain model=$model seed=$seed forgetting.every_n_steps=$k ${AF_EXTRA:-}")
    done
  done
done
printf '%s\n' "${jobs[@]}" | xargs -P "${JOBS:-16}" -I{} bash -c 'run {}'

jobs=()
for pre in runs/pre_*/; do
  pre=$(basename "$pre")
  [ -f "runs/$pre/metrics.json" ] || continue
  IFS=_ read -r _ model size arm seed <<< "$pre"
  for budget in ${BUDGETS:-500000 2000000}; do
    for protocol in chen afa; do
      adapt=$([ "$protocol" = chen ] && echo adapt=chen || echo adapt=default)
      jobs+=("ada_${pre#pre_}_${protocol}_$budget stage=adapt $adapt model=${model}_$size seed=${seed#s} init_from=runs/$pre/model adapt.corpus_tokens=$budget")
    done
  done
done
printf '%s\n' "${jobs[@]}" | xargs -P "${JOBS:-16}" -I{} bash -c 'run {}'
python3 "$here/plasticity_report.py" "$out/runs" --out "$out/report"
