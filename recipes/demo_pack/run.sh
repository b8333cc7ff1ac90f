#!/usr/bin/env bash
# Rebuilds the bundled demo pack from nothing: render -> codec -> semantic units -> MuLan -> codes -> stages -> pack
# -> evaluation. Usage: recipes/demo_pack/run.sh [DATA] [WORK] [PACK]; about 2 hours on 2 CPU cores with the
# default budgets (CODEC_MIN, SEMANTIC_MIN, STAGE_MIN, in minutes). Needs: apt-get install fluidsynth
# fluid-soundfont-gm; pip install -e ".[demo]" mido scikit-learn matplotlib.
set -euo pipefail
cd "$(dirname "$0")"
DATA=${1:-/tmp/vivace-demo/data}
WORK=${2:-/tmp/vivace-demo/work}
PACK=${3:-../../packs/demo}
CODEC_MIN=${CODEC_MIN:-40}
SEMANTIC_MIN=${SEMANTIC_MIN:-30}
STAGE_MIN=${STAGE_MIN:-45}
mkdir -p "$DATA" "$WORK"
python render.py "$DATA" --pieces 560 --seconds 20
python codec_train.py "$DATA" "$WORK/codec.pt" --minutes "$CODEC_MIN" &
python semantic.py "$DATA"
python mulan.py "$DATA" "$WORK"
python stages_train.py semantic "$DATA" "$WORK/semantic.pt" --minutes "$SEMANTIC_MIN" --batch 16
wait
python encode.py "$DATA" "$WORK/codec.pt"
python codec_train.py "$DATA" "$WORK/codec.pt" --resume "$WORK/codec.pt" --decoder-only --lr 5e-4 --minutes "$STAGE_MIN" &
python stages_train.py coarse "$DATA" "$WORK/coarse.pt" --minutes "$STAGE_MIN" --batch 12 &
python stages_train.py fine "$DATA" "$WORK/fine.pt" --minutes "$STAGE_MIN" --batch 12
wait
python build_pack.py "$DATA" "$WORK" "$PACK"
python evaluate.py "$DATA" "$WORK" "$PACK" results.json --pictures ../../docs/images
