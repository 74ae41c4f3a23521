#!/usr/bin/env bash
# The forgetting-variants sweep of experiments/README.md ("forgetting_variants") as parallel single jobs, one CPU
# thread each: the same jobs as
#   afpt -m stage=pipeline forgetting=every_k,temporary,partial,bernoulli seed=0,1,2 pipeline.instruct=false
# on a machine with >= 12 cores. Usage: experiments/forgetting_variants.sh OUT_DIR [extra overrides...]
# TRAINER (default "trainer=cpu") holds the trainer overrides, e.g. TRAINER="trainer=gpu trainer.precision=32-true
# optim.compile=false" runs the 12 jobs side by side on one GPU.
# Each job runs in OUT_DIR/<variant>_s<seed>/; the summary table goes to OUT_DIR/summary.md.
set -uo pipefail
out=$(realpath -m "$1"); shift
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
for v in every_k temporary partial bernoulli; do
  for s in 0 1 2; do
    mkdir -p "$out/work/${v}_s$s"
    (cd "$out/work/${v}_s$s" && afpt stage=pipeline "forgetting=$v" "seed=$s" pipeline.instruct=false \
      ${TRAINER:-trainer=cpu} name=job "$@" > log.txt 2>&1; echo "$v seed $s: exit $?") &
  done
done
wait
for job in "$out"/work/*/runs/job; do
  name=$(basename "$(dirname "$(dirname "$job")")")
  mkdir -p "$out/$name/.hydra" && cp "$job/metrics.json" "$out/$name/" 2>/dev/null
  cp "$job/.hydra/overrides.yaml" "$out/$name/.hydra/" && cp -r "$job/report" "$out/$name/" 2>/dev/null
done
afpt-summary "$out"
