#!/usr/bin/env python
"""Image-encoding benchmark (issue 23): is the encoder kept busy, and what does a process pay to start?

For two models, each architecture-exact with random weights (throughput does not depend on weight
values): the micro model (``calibprompt pretrain-micro``'s architecture, 28-pixel ViT) and open_clip's
ViT-B/32 (PLIP's and QuiltNet's image tower), over PneumoniaMNIST test images exported as PNG files in
class folders (the layout users bring; every path pays for PNG decoding), it times:

* ``decode``: reading, decoding and preprocessing alone (``features.loader``), per worker setting;
* ``encoder``: the image encoder alone on pre-made pixel tensors, at two batch sizes;
* ``end_to_end``: ``FeatureCache.features`` from an empty cache (decode + preprocess + encode + store),
  for the serial path as it was before issue 23 (decoding in the encoder's thread, each cache file
  written before the next batch), and for workers 0, 1, 2 and auto with worker processes and with
  threads (cache files written on a background thread), at two batch sizes;
* ``startup_s``: (median of 3) a fresh ``python`` process that imports calibprompt, loads the micro model from a hub-format
  folder, opens the image folder and encodes its first batch (wall time from spawn to that batch), and
  the wall time of ``calibprompt --version`` and ``calibprompt methods``.

It also checks that the features of every worker setting equal the serial path's bit for bit (exit 1 if
not). The ratios, for the setting with the highest end-to-end throughput of each model:
``end_to_end_over_encoder`` (1.0 = preprocessing fully hidden) and ``end_to_end_over_serial``. The
top-level JSON keys carry the ViT-B/32's, the model whose encoder dominates as in practice.

Run ``python benchmarks/bench_encode.py --quick --json bench_encode.json`` (128 ViT-B/32 images, about
4 minutes on 2 cores) or without ``--quick`` (all 624 test images). Data come from ``CALIBPROMPT_DATA``
(default ``../shared/data``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Idle OpenMP threads must not spin on the cores the loader workers need (docs/performance.md).
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.random_models

import numpy as np  # noqa: E402
import torch  # noqa: E402

CLASSES = ("normal", "pneumonia")
TARGETS = {"end_to_end_over_encoder": 0.9, "end_to_end_over_serial": 1.3, "startup_s": 5.0}


def export_pngs(folder: Path, n: int) -> Path:
    """The first ``n`` PneumoniaMNIST test images as 28x28 grey PNGs in one folder per class."""
    from PIL import Image

    from calibprompt.settings import shared_file

    path = shared_file("medmnist/pneumoniamnist.npz")
    with np.load(path, allow_pickle=False) as data:
        images, labels = data["test_images"][:n], data["test_labels"][:n, 0]
    for name in CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(folder / CLASSES[int(label)] / f"{i:04d}.png")
    return folder


def build_models(root: Path) -> dict:
    """{name: (backbone, hub-format folder or None)}: random-weight micro model (saved, for the start-up
    probe) and ViT-B/32 from the shared open_clip config."""
    from calibprompt.pretrain.model import micro_model_cfg
    from calibprompt.settings import shared_file
    from tests.random_models import random_open_clip_backbone

    micro = random_open_clip_backbone(micro_model_cfg(patch_size=7), "micro-random")
    micro_dir = micro.save_dir(root / "micro-random")
    vit_cfg = json.loads(Path(shared_file("configs/open_clip/ViT-B-32.json")).read_text())
    return {"micro": (micro.eval(), micro_dir), "vit-b-32": (random_open_clip_backbone(vit_cfg, "vit-b-32").eval(), None)}


def rate(n: int, seconds: float) -> float:
    return round(n / seconds, 2) if seconds > 0 else float("inf")


def time_decode(backbone, dataset, samples, batch_size: int, workers, kind: str) -> float:
    from calibprompt.features.loader import BatchBuilder, Item, auto_batches, pixel_batches

    chunks = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    builder = BatchBuilder(dataset, backbone.preprocess, [[Item(s, False, None) for s in c] for c in chunks],
                           batch_size, dtype=backbone.dtype)
    start = time.perf_counter()
    # "auto" decides from the time the consumer spends per batch: here none, so it stays serial
    stream = auto_batches(builder, torch.device("cpu"), kind) if workers == "auto" else pixel_batches(builder, workers, kind)
    for _ in stream:
        pass
    return rate(len(samples), time.perf_counter() - start)


def time_encoder(backbone, pixels: torch.Tensor, batch_size: int) -> float:
    with torch.no_grad():
        backbone.encode_image(pixels[:batch_size])  # warm-up
        start = time.perf_counter()
        for i in range(0, pixels.shape[0], batch_size):
            backbone.encode_image(pixels[i : i + batch_size])
    return rate(pixels.shape[0], time.perf_counter() - start)


def serial_cache_class():
    """The path before issue 23: every batch decoded in the encoder's thread (``workers=0``) and every
    cache file written before the next batch is encoded."""
    from calibprompt.features import FeatureCache

    class SerialCache(FeatureCache):
        def _store(self, weights, key, feat, write=None):
            super()._store(weights, key, feat, None)

    return SerialCache


def time_end_to_end(backbone, folder: Path, batch_size: int, workers, kind: str) -> tuple[float, torch.Tensor]:
    from calibprompt.data import open_dataset
    from calibprompt.features import FeatureCache

    dataset = open_dataset({"source": "folder", "path": str(folder)})  # fresh: no memoised hashes
    with tempfile.TemporaryDirectory() as root:
        if kind == "before":
            cache = serial_cache_class()(root, workers=0)
        else:
            cache = FeatureCache(root, workers=workers, loader_kind=kind)
        start = time.perf_counter()
        feats = cache.features(backbone, dataset, dataset.samples, batch_size=batch_size)
        seconds = time.perf_counter() - start
    return rate(len(dataset.samples), seconds), feats


STARTUP_PROBE = """
import sys, time
from calibprompt.backbones import load_backbone
from calibprompt.data import open_dataset
from calibprompt.features import FeatureCache
backbone = load_backbone({"path": sys.argv[1]})
dataset = open_dataset({"source": "folder", "path": sys.argv[2]})
FeatureCache(sys.argv[3]).features(backbone, dataset, dataset.samples[:32])
print(time.time())
"""


def startup(micro_dir: Path, folder: Path) -> dict:
    """Wall seconds from spawning a process to its first encoded batch, and of two light commands."""
    import statistics

    out: dict = {"first_batch_runs_s": []}
    for _ in range(3):  # median of three fresh processes, each with an empty cache
        with tempfile.TemporaryDirectory() as cache_root:
            spawned = time.time()
            done = subprocess.run([sys.executable, "-c", STARTUP_PROBE, str(micro_dir), str(folder), cache_root],
                                  check=True, capture_output=True, text=True).stdout.split()[-1]
            out["first_batch_runs_s"].append(round(float(done) - spawned, 2))
    out["first_batch_s"] = statistics.median(out["first_batch_runs_s"])
    cli = [sys.executable, "-m", "calibprompt"]
    for name, args in (("version_s", ["--version"]), ("methods_s", ["methods"])):
        start = time.perf_counter()
        subprocess.run(cli + args, check=True, capture_output=True)
        out[name] = round(time.perf_counter() - start, 2)
    probe = ("import contextlib, io, sys; from calibprompt.cli import main\n"
             "with contextlib.redirect_stdout(io.StringIO()): main(['methods'])\n"
             "print(sorted(m for m in ('torchvision', 'open_clip', 'transformers', 'timm') if m in sys.modules))")
    out["methods_imports_model_libraries"] = json.loads(
        subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
        .stdout.strip().replace("'", '"'))
    return out


SETTINGS = [(0, "before"), (0, "process"), (1, "process"), (2, "process"), ("auto", "process"), (1, "thread"), (2, "thread")]


def label_of(workers, kind: str) -> str:
    if kind == "before":
        return "serial (before issue 23)"
    return f"workers={workers},{kind}" if workers else "workers=0"


def bench_model(name: str, backbone, folder: Path, batch_sizes: tuple[int, int], rounds: int, say) -> dict:
    """Medians over ``rounds`` interleaved rounds (each round times the encoder alone, then every loader
    setting end to end), so that a slow spell of a shared machine hits all settings alike."""
    import statistics

    from calibprompt.data import open_dataset

    dataset = open_dataset({"source": "folder", "path": str(folder)})
    samples = dataset.samples
    say(f"[{name}] {len(samples)} images, batch sizes {batch_sizes}, {rounds} rounds")
    result: dict = {"images": len(samples), "rounds": rounds, "decode": {}, "encoder": {}, "end_to_end": {}}
    for workers, kind in SETTINGS[1:]:
        result["decode"][label_of(workers, kind)] = time_decode(backbone, dataset, samples, batch_sizes[0], workers, kind)
    say(f"[{name}] decode+preprocess img/s: {result['decode']}")

    transform = backbone.image_transform(False)
    pixels = torch.stack([transform(dataset.load(s)) for s in samples]).to(backbone.dtype)
    for bs in batch_sizes:
        encoder, e2e, reference = [], {label_of(w, k): [] for w, k in SETTINGS}, None
        for _ in range(rounds):
            encoder.append(time_encoder(backbone, pixels, bs))
            for workers, kind in SETTINGS:
                speed, feats = time_end_to_end(backbone, folder, bs, workers, kind)
                e2e[label_of(workers, kind)].append(speed)
                if reference is None:
                    reference = feats
                elif not torch.equal(reference, feats):
                    result.setdefault("not_bit_identical", []).append(f"batch {bs}, {label_of(workers, kind)}")
        result["encoder"][str(bs)] = round(statistics.median(encoder), 2)
        result["end_to_end"][str(bs)] = {k: round(statistics.median(v), 2) for k, v in e2e.items()}
        result.setdefault("ratio_per_round", {})[str(bs)] = {
            k: [round(v[r] / encoder[r], 3) for r in range(rounds)] for k, v in e2e.items()}
        say(f"[{name}] batch {bs}: encoder {result['encoder'][str(bs)]} img/s (rounds {encoder}), "
            f"end to end {result['end_to_end'][str(bs)]}")

    serial = result["end_to_end"][str(batch_sizes[0])][label_of(0, "before")]
    best = max(((speed, bs, label) for bs, row in result["end_to_end"].items() for label, speed in row.items()))
    result["best"] = {"batch_size": int(best[1]), "setting": best[2], "end_to_end": best[0],
                      "encoder": result["encoder"][best[1]], "serial": serial,
                      "end_to_end_over_encoder": round(best[0] / result["encoder"][best[1]], 3),
                      "end_to_end_over_serial": round(best[0] / serial, 3)}
    say(f"[{name}] best: {result['best']}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="128 ViT-B/32 images instead of all 624")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--batch-sizes", type=int, nargs=2, default=(32, 64),
                        help="the first is the serial path's (the cache's default, 32)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2 quick, 3 full)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def say(text: str) -> None:
        print(text, flush=True)

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    say(f"load average at start: {load}; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = build_models(tmp)
        n_vit = 128 if args.quick else 624
        folders = {"micro": export_pngs(tmp / "pngs-624", 624), "vit-b-32": export_pngs(tmp / f"pngs-{n_vit}", n_vit)}
        out: dict = {"models": {}}
        for name, (backbone, _) in models.items():
            out["models"][name] = bench_model(name, backbone, folders[name], tuple(args.batch_sizes),
                                              args.rounds or (2 if args.quick else 3), say)
        out["startup"] = startup(models["micro"][1], folders["micro"])
        say(f"start-up: {out['startup']}")

    vit = out["models"]["vit-b-32"]["best"]
    out.update(end_to_end_over_encoder=vit["end_to_end_over_encoder"], end_to_end_over_serial=vit["end_to_end_over_serial"],
               startup_s=out["startup"]["first_batch_s"], targets=TARGETS)
    out["targets_met"] = {"end_to_end_over_encoder": out["end_to_end_over_encoder"] >= TARGETS["end_to_end_over_encoder"],
                          "end_to_end_over_serial": out["end_to_end_over_serial"] >= TARGETS["end_to_end_over_serial"],
                          "startup_s": out["startup_s"] < TARGETS["startup_s"]}
    out["machine"] = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                      "torch": torch.__version__, "load_start": load,
                      "load_end": os.getloadavg() if hasattr(os, "getloadavg") else None}
    say(f"end_to_end_over_encoder {out['end_to_end_over_encoder']} (target >= 0.9), end_to_end_over_serial "
        f"{out['end_to_end_over_serial']} (target >= 1.3), startup_s {out['startup_s']} (target < 5)")
    if args.json:
        from calibprompt.settings import atomic_write_json

        atomic_write_json(args.json, out)
    broken = [f"{m}: {x}" for m, r in out["models"].items() for x in r.get("not_bit_identical", [])]
    if broken:
        say(f"FAILED: features differ from the serial path's: {broken}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
