#!/usr/bin/env python
"""Engine benchmark (issue 6): calibprompt's cached-feature engine against a faithful reference loop.

Both paths run in one process on the same model object, the same synthetic PNG dataset (opened through
``calibprompt.data``, so image decoding is paid by both) and the same CalibPrompt objective
(LS(alpha) + SMAC(alpha) + lambda * AS), over a sweep of (alpha, lambda) configurations:

* **reference** (CoOp/Dassl-style, like the official CalibPrompt code): every training step decodes its
  batch, runs the frozen image encoder (under ``no_grad``) and the text encoder on the full
  ``context_length`` (256 for BiomedCLIP) token sequences; every run re-encodes the whole test set
  (batch 100, text features recomputed per test batch as CoOp's ``CustomCLIP.forward`` does). Same
  batch size, optimizer, schedule, losses and initial context as the engine; its batch order and
  augmentation views are drawn exactly as the engine draws them, so the two can be compared number
  for number. It shares nothing between configurations, so it is timed on ``--ref-configs`` of them
  and its mean per-configuration time multiplied by the sweep size (said so in the output).
* **engine, sequential** (what ``calibprompt run`` does per configuration): ``FeatureCache`` encodes each
  image (and view) once, ``train_prompts`` tunes the context over cached features with trimmed prompts,
  ``predict_logits`` scores the cached test features. The first configuration starts from an empty
  cache, so its wall time is the single-run time; the sweep's wall time is literal.
* **engine, batched** (past the targets): ``train_prompts_batched`` trains all configurations in
  lockstep with one text-encoder pass per step over their stacked prompts. It reuses the features the
  sequential sweep cached; its sweep time is that block plus the cold encoding time measured in the
  sequential sweep's first configuration (printed as such).

``overhead_ratio`` = engine sweep time / its unavoidable parts, each timed in isolation in this
process: one image-encoder pass per image and view the engine encoded (same batch sizes, random pixels)
+ the text-encoder steps it ran (forward + backward, same shapes) + its evaluation text passes.

Run ``python benchmarks/bench_engine.py --quick --json out.json`` (10 epochs, 100 test images) or
without ``--quick`` (the paper's 50 epochs, 1,000 test images). The model is the architecture-exact
BiomedCLIP built from the shared configs (``CALIBPROMPT_DATA``, default ``../shared/data``) with random
weights and a stand-in 30,522-entry WordPiece vocabulary (not PubMedBERT's; timing does not depend on
weight values or token ids). ``--model-dir`` benchmarks another open_clip hub-format folder instead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

# OpenMP worker threads that spin while they wait make every small operation crawl when the cores are
# shared with other processes (measured at load 4 on 2 cores: a 20-token text step 3.0 s spinning,
# 0.5 s sleeping; encoder throughput unchanged). Both paths run under the same policy. It must be set
# before torch loads OpenMP; an OMP_WAIT_POLICY already in the environment wins.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: benchmarks.*, tests.*

from benchmarks.engine_bench.memory import memory_probe, memory_probe_one  # noqa: E402
from benchmarks.engine_bench.run import run_benchmark  # noqa: E402

__all__ = ["main", "memory_probe", "parse_args", "run_benchmark"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="10 epochs, 100 test images, 10 configurations")
    p.add_argument("--epochs", type=int, help="default 50 (quick 10)")
    p.add_argument("--n-test", type=int, help="test images; default 1000 (quick 100)")
    p.add_argument("--configs", type=int, default=10, help="engine configurations (alpha, lambda pairs)")
    p.add_argument("--ref-configs", type=int,
                   help="configurations the reference is timed on (default 2; quick 1: it shares nothing "
                        "between configurations, so each costs the same)")
    p.add_argument("--shots", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--n-ctx", type=int, default=16)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--augment", action="store_true",
                   help="paper augmentation (random resized crop + flip, a fresh view per epoch); the reference "
                        "draws the same views on the fly, so equality still holds")
    p.add_argument("--aug-seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:i]")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--image-size", type=int, default=224, help="side of the synthetic PNGs")
    p.add_argument("--model-dir", help="open_clip hub-format folder to benchmark instead of BiomedCLIP")
    p.add_argument("--text-dir", help="BERT text folder for --model-dir")
    p.add_argument("--max-prompts", type=int, help="batched engine: sequences per text-encoder pass")
    p.add_argument("--no-batched", action="store_true", help="skip the batched multi-configuration engine")
    p.add_argument("--batched", action="store_true", help=argparse.SUPPRESS)  # the default since issue 18
    p.add_argument("--no-prefix", action="store_true",
                   help="skip the shared-prefix text step timing (prefix_text_speedup, ViT-B/32 text tower)")
    p.add_argument("--iso-image-batches", type=int,
                   help="isolated encoder batches timed for the unavoidable image cost (quick 1, default 4)")
    p.add_argument("--memory-probe", type=int, nargs="+", metavar="N",
                   help="only measure peak RSS while streaming N test images through the cache (e.g. 250 1000)")
    p.add_argument("--compare-allocators", action="store_true",
                   help="memory probe: also run each size with a fixed glibc mmap threshold")
    p.add_argument("--probe-one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--workdir", help="keep images/cache here (default: a temporary folder, removed)")
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument("--json", help="write the results to this JSON file")
    args = p.parse_args(argv)
    args.default_sizes = not args.quick and args.epochs is None and args.n_test is None
    if args.epochs is None:
        args.epochs = 10 if args.quick else 50
    if args.n_test is None:
        args.n_test = 100 if args.quick else 1000
    # --quick must fit in about 4.5 minutes on 2 cores: the reference is timed on one configuration and the
    # encoder in isolation on one batch. The batched engine runs in every mode (it is what `calibprompt
    # sweep` does by default since issue 18).
    if args.iso_image_batches is None:
        args.iso_image_batches = 1 if args.quick else (4 if args.default_sizes else 2)
    if args.ref_configs is None:
        args.ref_configs = 1 if args.quick else 2
    if min(args.epochs, args.n_test, args.configs, args.ref_configs, args.shots, args.batch_size) < 1:
        p.error("epochs, n-test, configs, ref-configs, shots and batch-size must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe_one:
        print(json.dumps(memory_probe_one(args)))
        return 0
    if not args.model_dir:
        from calibprompt.settings import DATA_ENV, data_dir

        missing = [f for f in ("configs/biomedclip/open_clip_config.json", "configs/pubmedbert/config.json")
                   if not (data_dir() / f).is_file()]
        if missing:
            print(f"bench_engine: shared config file(s) {', '.join(str(data_dir() / f) for f in missing)} not found. "
                  f"Set {DATA_ENV} to the shared data folder (default ../shared/data, relative to the current "
                  "directory), or pass --model-dir.", file=sys.stderr)
            return 2
    result = memory_probe(args) if args.memory_probe else run_benchmark(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float) + "\n")
        print(f"wrote {args.json}")
    if not args.memory_probe and result["max_metric_diff"] > 1e-4:
        return 1
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
