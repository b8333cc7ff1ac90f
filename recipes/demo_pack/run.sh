#!/usr/bin/env bash
# Rebuilds the bundled demo pack from nothing: render -> codec (beside semantic units, MuLan and the semantic stage)
# -> codes -> coarse and fine stages -> pack -> evaluation.
# Usage: recipes/demo_pack/run.sh [DATA] [WORK] [PACK]. Budgets are environment variables in minutes: CODEC_MIN,
# SEMANTIC_MIN, STAGE_MIN, GAN_MIN (100, 60, 55, 75: about 4.3 hours end to end on 2 cores; the bundled pack's decoder
# had further adversarial runs, README.md). GAN_MIN=0 leaves out the adversarial stage, which fine-tunes the decoder
# alone with the multi-scale STFT discriminator after the stages are trained and ships the moving average of its
# weights at the check with the best held-out SI-SNR. Each training step checkpoints as it goes; to split one over
# several runs, call its script again with --resume (codec_train.py --resume WORK/codec.pt, stages_train.py ... --resume).
# Needs: apt-get install fluidsynth fluid-soundfont-gm; pip install -e ".[demo]" mido scikit-learn matplotlib.
set -euo pipefail
cd "$(dirname "$0")"
DATA=${1:-/tmp/vivace-demo/data}
WORK=${2:-/tmp/vivace-demo/work}
PACK=${3:-../../packs/demo}
PIECES=${PIECES:-2000}
CODEC_MIN=${CODEC_MIN:-100}
GAN_MIN=${GAN_MIN:-75}
SEMANTIC_MIN=${SEMANTIC_MIN:-60}
STAGE_MIN=${STAGE_MIN:-55}
BASELINE=${BASELINE:-}  # an earlier pack to evaluate beside the new one
mkdir -p "$DATA" "$WORK"
[ -f "$DATA/clips.npy" ] || python render.py "$DATA" --pieces "$PIECES" --seconds 20
python codec_train.py "$DATA" "$WORK/codec.pt" --minutes "$CODEC_MIN" &
python semantic.py "$DATA"
python mulan.py "$DATA" "$WORK"
python stages_train.py semantic "$DATA" "$WORK/semantic.pt" --minutes "$SEMANTIC_MIN" --batch 16
wait
python encode.py "$DATA" "$WORK/codec.pt"
python stages_train.py coarse "$DATA" "$WORK/coarse.pt" --minutes "$STAGE_MIN" --batch 12 &
python stages_train.py fine "$DATA" "$WORK/fine.pt" --minutes "$STAGE_MIN" --batch 12
wait
CODEC=codec.pt
if [ "$GAN_MIN" != 0 ]; then  # the decoder alone, encoder and RVQ frozen: the codes the stages trained on stay valid
  python codec_train.py "$DATA" "$WORK/codec_gan.pt" --resume "$WORK/codec.pt" --adversarial --decoder-only --lr 5e-4 \
    --frame-locked 20 --ema 0.999 --batch 6 --crop-frames 50 --threads 2 --minutes "$GAN_MIN"
  CODEC=codec_gan.best.pt
fi
python build_pack.py "$DATA" "$WORK" "$PACK" --codec "$WORK/$CODEC"
python evaluate.py "$DATA" "$WORK" "$PACK" results.json --pictures ../../docs/images ${BASELINE:+--baseline-pack "$BASELINE"}
