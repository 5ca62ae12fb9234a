#!/usr/bin/env bash
# A seed sweep of lesion model 2 on one GPU (one short lease): the shipped recipe (l2-b's command) with emphysema
# as a training negative (--emphysema 0.3, models/LESION2.md "Emphysema from the start"), several seeds side by
# side, each keeping its weights at every evaluation. On 10 validation slices the seed-to-seed spread is as large as
# any difference between recipes, and freedom from stray foci is a property of a draw: train several, keep the one
# that passes every check (screen on the CPU afterwards: compose, phantoms, then models.check_candidate).
#
# Needs the packed cache (python -m models.train_lesion2 --pack .carry/lesion2_224.npz) and the encoder weights
# file (.carry/lite0-encoder.pth). Usage: models/sweep_lesion2.sh OUTDIR [MINUTES] [SEEDS]
#   e.g. models/sweep_lesion2.sh "$OUT" 8 "0 1 2 3 4 5"
# OUTDIR gets, per seed, l2e-sN/step{250,500,750,1000,...}.pt and the run's log.
set -euo pipefail
out=${1:?OUTDIR}; minutes=${2:-8}; seeds=${3:-"0 1 2 3"}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 CTRIAGE_LITE0_WEIGHTS=.carry/lite0-encoder.pth
recipe=(--steps 4000 --batch 8 --lr 1e-3 --encoder-lr 0.5 --mix "doctor=4,pseudo=3,noncovid=2,hu-neg=1"
        --blob-weight 0.2 --emphysema 0.3 --keep-every --eval-every 250)
common=(--device cuda --packed .carry/lesion2_224.npz --threads 2 --max-minutes "$minutes")
for s in $seeds; do
  python3 -m models.train_lesion2 --name "l2e-s$s" --seed "$s" "${recipe[@]}" "${common[@]}" >"$out/l2e-s$s.out" 2>&1 &
done
wait
for s in $seeds; do
  mkdir -p "$out/l2e-s$s"
  cp models/runs/"l2e-s$s"/step*.pt "$out/l2e-s$s/" 2>/dev/null || true
  cat "models/runs/l2e-s$s/train.log" >>"$out/l2e-s$s.out" 2>/dev/null || true
done
