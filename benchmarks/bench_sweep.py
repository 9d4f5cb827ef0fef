#!/usr/bin/env python
"""Sweep benchmark (issue 18, item 2): `calibprompt sweep` with prompt-learning runs trained together (the
default) against `--no-batch`, on the same grid, from the same warm feature cache.

Model: open_clip ViT-B/32 (PLIP's and QuiltNet's architecture) with random weights, written in open_clip's
hub format; data: BreastMNIST from the shared data folder (``CALIBPROMPT_DATA``). The grid is CoOp-CE and
CalibPrompt x ``--seeds`` seeds (8 shots, n_ctx 16, ``--epochs`` epochs). The cache is filled first by an
untimed one-run sweep, so both timed sweeps only train and evaluate. Printed: each sweep's wall time, the
ratio, and the largest difference of any metric between the two.

    python benchmarks/bench_sweep.py --quick --json bench_sweep.json     # 5 seeds, 10 epochs
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _sweep(grid: Path, out: Path, cache: Path, *flags: str) -> float:
    from calibprompt.cli import main

    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["sweep", str(grid), "--out", str(out), "-qq", "--cache-dir", str(cache), *flags])
    if code != 0:
        raise SystemExit(f"bench_sweep: sweep into {out} exited {code}")
    return time.perf_counter() - start


def _metrics(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text())["metrics"] for p in (out / "runs").glob("*/metrics.json")}


def main(argv=None) -> int:
    import yaml

    from calibprompt.settings import shared_file
    from tests.random_models import write_random_open_clip

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="5 seeds, 10 epochs (the default)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        root = Path(tmp)
        model = write_random_open_clip(root / "vit-b-32",
                                       json.loads(Path(shared_file("configs/open_clip/ViT-B-32.json")).read_text()))
        spec = {"name": "bench-sweep",
                "base": {"train": {"epochs": args.epochs, "augment": False}, "val_shots": 4, "eval": {"bootstrap": 0}},
                "backbones": {"vit-b-32": {"path": str(model)}},
                "datasets": {"breast": {"source": "medmnist", "path": str(shared_file("medmnist/breastmnist.npz"))}},
                "methods": ["coop-ce", "calibprompt"], "shots": 8, "seeds": list(range(1, args.seeds + 1))}
        grid = root / "grid.yaml"
        grid.write_text(yaml.safe_dump(spec))
        cache = root / "cache"
        warm = root / "warm.yaml"
        warm.write_text(yaml.safe_dump({**spec, "methods": ["coop-ce"], "base": {**spec["base"], "train": {
            **spec["base"]["train"], "epochs": 1}}}))
        _sweep(warm, root / "warm", cache, "--no-batch")  # every seed's split encoded once, untimed
        seconds = {"batched": _sweep(grid, root / "batched", cache),
                   "alone": _sweep(grid, root / "alone", cache, "--no-batch")}
        together, alone = _metrics(root / "batched"), _metrics(root / "alone")
    diff = max(abs(a[k] - alone[run][k]) for run, a in together.items() for k in a
               if isinstance(a[k], float) and math.isfinite(a[k]) and "aurc" not in k)
    runs = 2 * args.seeds
    result = {"runs": runs, "epochs": args.epochs, "model": "ViT-B/32 (random weights)", "dataset": "BreastMNIST",
              "sweep_seconds_batched": seconds["batched"], "sweep_seconds_alone": seconds["alone"],
              "batched_speedup": seconds["alone"] / seconds["batched"], "max_metric_diff_batched": diff}
    print(f"sweep of {runs} runs ({args.epochs} epochs, warm cache): trained together {seconds['batched']:.1f} s, "
          f"each alone (--no-batch) {seconds['alone']:.1f} s -> {result['batched_speedup']:.2f}x; "
          f"max metric difference {diff:.1e} (AURC-type rank metrics left out)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if diff <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
