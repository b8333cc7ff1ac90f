"""Which stage loses the prompt? MuLan cycle consistency of the held-out captions' clips made four ways, each caption
with several seeds, judged as evaluate.py judges (WORK/mulan.pt's audio tower against its text tower's embeddings of
the held-out captions):

  prompt     the whole hierarchy from the caption (what make demo does);
  semantic   the caption's real clip's semantic tokens in place, coarse and fine generated from them and the caption;
  coarse     its real coarse codes (RVQ levels 1-4) in place, the fine levels generated;
  codec      its real codes of all levels, decoded (the codec's ceiling; no sampling, so one row per caption).

A stage that keeps what the judge hears leaves the rank of the true caption where the row below it has it. Besides top-1
and top-5 the mean rank of the true caption (0 is first, of the held-out captions) is printed: it moves by less than a
top-1 count does from a single clip. Writes RESULTS (JSON).
"""
from __future__ import annotations

import datetime
import json

import numpy as np
import torch
from common import Dataset
from evaluate import caption_ranks, decode, held_out_captions, load_judge, measure_parser, pack_codes, real_clips, tower_embeddings
from mulan import CROP_S
from prefill import real_tokens

from vivace import Engine

ROWS = ("prompt", "semantic", "coarse")


def summary(rank: torch.Tensor) -> dict:
    return {
        "clips": len(rank),
        "top1": float((rank == 0).float().mean()),
        "top5": float((rank < 5).float().mean()),
        "mean_rank": float(rank.float().mean()),
        "mean_rank_standard_error": float(rank.float().std() / len(rank) ** 0.5),
        "ranks": rank.tolist(),  # per clip, seed-major: two packs' runs compare clip by clip
    }


@torch.no_grad()
def main() -> None:
    parser = measure_parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1000, 2000, 3000],
                        help="caption i gets seed s + i for each s (evaluate.py uses 1000)")
    parser.add_argument("--quantize", default="int8", help="the engine's quantize option (int8, as make demo; 'none': float32)")
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--seconds", type=float, default=CROP_S)
    parser.add_argument("--batch", type=int, default=14)
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS),
                        help="which of the generated rows to make (the codec and real rows are always measured)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = Dataset.load(args.data)
    tower, text = load_judge(data, args.work)
    captions = held_out_captions(data)
    engine = Engine.from_pack(args.pack, quantize=None if args.quantize == "none" else args.quantize)
    pack = engine.pack
    real = real_clips(data, captions, args.seconds)
    codes = pack_codes(pack, real)  # [captions, levels, frames]
    semantic = [pack.semantic_tokenizer(clip).numpy().reshape(-1) for clip in real]
    options = {} if args.guidance_scale is None else {"guidance_scale": args.guidance_scale}
    report: dict = {}
    for stage in args.rows:
        fill = {
            "prompt": {},
            "semantic": {c: (semantic[k], None) for k, c in enumerate(captions)},
            "coarse": {c: (semantic[k], codes[k].T.numpy()) for k, c in enumerate(captions)},
        }[stage]
        with real_tokens(fill):
            clips = np.concatenate([
                engine.generate(captions[i : i + args.batch], duration_s=args.seconds, seed=seed + i, **options)
                for seed in args.seeds for i in range(0, len(captions), args.batch)
            ])
        report[stage] = summary(caption_ranks(tower_embeddings(tower, clips), text))
        print(stage, {k: v for k, v in report[stage].items() if k != "ranks"}, flush=True)
    resynthesised = decode(pack, codes)
    report["codec"] = summary(caption_ranks(tower_embeddings(tower, resynthesised.numpy()), text))
    report["real"] = summary(caption_ranks(tower_embeddings(tower, real.numpy()), text))
    for row in ("codec", "real"):
        print(row, {k: v for k, v in report[row].items() if k != "ranks"}, flush=True)
    results = {
        "date": datetime.date.today().isoformat(), "pack": str(args.pack), "quantize": args.quantize,
        "guidance_scale": engine.info()["guidance_scale"] if args.guidance_scale is None else args.guidance_scale,
        "seeds": args.seeds, "seconds": args.seconds, "captions": len(captions), **report,
    }
    args.results.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
