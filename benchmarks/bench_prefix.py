#!/usr/bin/env python
"""Shared-prefix text pass benchmark (issue 18, item 1): one prompt-tuning text step (forward and backward
of the class text features into the context) with the full pass against the shared-prefix pass, for
K = 2, 9 and 20 classes at n_ctx 16, on the text towers of the micro model and of open_clip's ViT-B/32
(PLIP's and QuiltNet's architecture), random weights. Prints the measured speedup and the FLOP ratio
(1 + n + s*K) / (K * (1 + n + s)) the issue expects, with s the mean suffix length (class name, ".",
end token). Run ``python benchmarks/bench_prefix.py [--json F]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

WORDS = ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
         "cancer-associated stroma", "colorectal adenocarcinoma epithelium", "tumor", "necrosis", "fibrosis",
         "inflammation", "hemorrhage", "nerve", "vessel", "gland", "cyst", "calcification", "cartilage"]


def step_seconds(backbone, learner, prefix: bool, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        emb, ids = learner()
        feats = backbone.encode_shared_prefix(emb, ids, 1 + learner.n_ctx) if prefix else \
            backbone.encode_embeddings(emb, ids)
        text = torch.nn.functional.normalize(feats.float(), dim=-1)
        (text @ text.t()).logsumexp(dim=1).mean().backward()
        learner.ctx.grad = None
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(backbone, k: int, n_ctx: int = 16, rounds: int = 7) -> dict:
    """Median text step (forward + backward into the context) of the full pass and of the shared-prefix pass
    for the first ``k`` class names of :data:`WORDS`, with the FLOP ratio the issue expects."""
    from calibprompt.methods.prompt_learner import PromptLearner

    learner = PromptLearner(backbone, WORDS[:k], n_ctx=n_ctx, generator=torch.Generator().manual_seed(0))
    ends = learner.ids.argmax(dim=-1).float()
    s = float((ends - learner.n_ctx).mean())  # suffix tokens: class name, ".", end token
    expected = (1 + n_ctx + s * k) / (k * (1 + n_ctx + s))
    step_seconds(backbone, learner, False, 1)  # warm-up
    step_seconds(backbone, learner, True, 1)
    full = step_seconds(backbone, learner, False, rounds)
    pre = step_seconds(backbone, learner, True, rounds)
    return {"K": k, "n_ctx": n_ctx, "suffix_tokens": s, "full_s": full, "prefix_s": pre, "speedup": full / pre,
            "flop_ratio_expected": expected, "speedup_expected": 1 / expected}


def causal_text_models() -> dict:
    """Random-weight open_clip models with causal text towers: the micro model and ViT-B/32 (PLIP's and
    QuiltNet's architecture), from the shared configs."""
    from calibprompt.pretrain.model import micro_model_cfg
    from calibprompt.settings import shared_file
    from tests.random_models import random_open_clip_backbone

    torch.manual_seed(0)
    return {"micro": random_open_clip_backbone(micro_model_cfg(patch_size=7), "micro").eval(),
            "vit-b-32": random_open_clip_backbone(
                json.loads(Path(shared_file("configs/open_clip/ViT-B-32.json")).read_text()), "vit-b-32").eval()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    rows = []
    for name, backbone in causal_text_models().items():
        for k in (2, 9, 20):
            row = {"model": name, **measure(backbone, k, 16, args.rounds)}
            rows.append(row)
            print(f"{name:>9} K={k:2d}: text step full {1000 * row['full_s']:7.1f} ms, shared prefix "
                  f"{1000 * row['prefix_s']:7.1f} ms, speedup {row['speedup']:4.2f} (FLOP ratio "
                  f"{row['flop_ratio_expected']:.2f}, i.e. up to {row['speedup_expected']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
