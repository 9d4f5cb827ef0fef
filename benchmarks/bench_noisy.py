#!/usr/bin/env python
"""Noisy-view encoding benchmark (PromptSmooth certification, docs/robustness.md).

Certification encodes n0 + n noisy copies of every test image, so noisy views are where its time goes.
For the micro model and open_clip's ViT-B/32 (architecture-exact, random weights), over PneumoniaMNIST
test images exported as PNGs, it times ``FeatureCache`` from an empty cache:

* ``clean``: the test-transform features of N images (views/s);
* ``noisy``: D noisy draws of the same N images at sigma 0.25 (``noisy_features``: preprocessing, seeded
  Gaussian noise, batched encoding, one cache file per view), views/s;
* ``cached``: the same N x D noisy views read back by a new cache object (disk), views/s;

and prints ``noisy_over_clean`` (views/s of noisy over clean: the cost of drawing and adding noise and
of more files) and ``cached_over_noisy``. ``--quick``: 64 images x 8 draws (micro), 32 x 4 (ViT-B/32).
Run ``python benchmarks/bench_noisy.py --quick --json bench_noisy.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_encode import build_models, export_pngs  # noqa: E402


def bench(name: str, backbone, folder: Path, n: int, draws: int, root: Path) -> dict:
    from calibprompt.data import open_dataset
    from calibprompt.features import FeatureCache

    dataset = open_dataset({"source": "folder", "path": str(folder)})
    samples = dataset.samples[:n]
    out = {"model": name, "images": len(samples), "draws": draws}
    cache = FeatureCache(root / f"{name}-clean", workers=0)
    start = time.perf_counter()
    cache.features(backbone, dataset, samples)
    out["clean_views_per_s"] = len(samples) / (time.perf_counter() - start)
    cache = FeatureCache(root / f"{name}-noisy", workers=0)
    start = time.perf_counter()
    first = cache.noisy_features(backbone, dataset, samples, 0.25, range(draws), seed=1)
    out["noisy_views_per_s"] = len(samples) * draws / (time.perf_counter() - start)
    out["files"] = sum(1 for _ in (root / f"{name}-noisy").rglob("*.safetensors"))
    again = FeatureCache(root / f"{name}-noisy", workers=0)
    start = time.perf_counter()
    second = again.noisy_features(backbone, dataset, samples, 0.25, range(draws), seed=1)
    out["cached_views_per_s"] = len(samples) * draws / (time.perf_counter() - start)
    out["encoded_on_reread"] = again.encoded
    out["identical_on_reread"] = bool((first == second).all())
    out["noisy_over_clean"] = out["noisy_views_per_s"] / out["clean_views_per_s"]
    out["cached_over_noisy"] = out["cached_views_per_s"] / out["noisy_views_per_s"]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 x 8 micro and 32 x 4 ViT-B/32 views")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    sizes = {"micro": (64, 8) if args.quick else (256, 32), "vit-b-32": (32, 4) if args.quick else (128, 16)}
    with tempfile.TemporaryDirectory(prefix="bench-noisy-") as tmp:
        root = Path(tmp)
        folder = export_pngs(root / "images", max(n for n, _ in sizes.values()))
        models = build_models(root / "models")
        rows = [bench(name, models[name][0], folder, *sizes[name], root / "cache") for name in sizes]
    for r in rows:
        print(f"{r['model']:>9}: {r['images']} images x {r['draws']} draws; views/s clean {r['clean_views_per_s']:.0f}, "
              f"noisy {r['noisy_views_per_s']:.0f}, cached {r['cached_views_per_s']:.0f}; noisy_over_clean "
              f"{r['noisy_over_clean']:.2f}, cached_over_noisy {r['cached_over_noisy']:.1f}; {r['files']} files; "
              f"re-read encoded {r['encoded_on_reread']}, identical {r['identical_on_reread']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    return 0 if all(r["identical_on_reread"] and r["encoded_on_reread"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
