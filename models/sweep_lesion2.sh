#!/usr/bin/env bash
# The GPU sweep behind lesion 2.0.0 (one short lease): four runs of models.train_lesion2 side by side on one GPU,
# from the packed cache (python -m models.train_lesion2 --pack .carry/lesion2_224.npz) and the encoder weights
# file (.carry/lite0-encoder.pth). Usage: models/sweep_lesion2.sh OUTDIR [MINUTES]
set -euo pipefail
out=${1:?OUTDIR}; minutes=${2:-6}
export PYTHONUNBUFFERED=1 CTRIAGE_LITE0_WEIGHTS=.carry/lite0-encoder.pth
common=(--device cuda --packed .carry/lesion2_224.npz --batch 32 --steps 3000 --threads 4 --max-minutes "$minutes")
python3 -m models.train_lesion2 --name l2-a "${common[@]}" >"$out/l2-a.out" 2>&1 &
python3 -m models.train_lesion2 --name l2-b "${common[@]}" --noncovid-weight 0.5 --blob-weight 0.5 >"$out/l2-b.out" 2>&1 &
python3 -m models.train_lesion2 --name l2-c "${common[@]}" --lr 2e-3 --encoder-lr 1.0 >"$out/l2-c.out" 2>&1 &
python3 -m models.train_lesion2 --name l2-d "${common[@]}" --no-pretrained >"$out/l2-d.out" 2>&1 &
wait
for r in l2-a l2-b l2-c l2-d; do
  cp "models/runs/$r/best.pt" "$out/$r.pt" 2>/dev/null || true
  cat "models/runs/$r/train.log" >>"$out/$r.out" 2>/dev/null || true
done
