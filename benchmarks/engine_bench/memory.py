"""Memory probe: peak RSS of the engine at several test-set sizes, in fresh processes."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.engine_bench.harness import Clock, PeakMemory, _status_kb, load_average, resolve_device
from benchmarks.engine_bench.setup import build_biomedclip, load_model_dir, open_bench_dataset, write_synthetic_images

ENTRY = Path(__file__).resolve().parents[1] / "bench_engine.py"

def memory_probe_one(args: argparse.Namespace) -> dict:
    from calibprompt.features import FeatureCache

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    backbone = (load_model_dir(args.model_dir, args.text_dir) if args.model_dir
                else build_biomedclip(workdir / f"probe-{args.probe_one}")).to(device)
    dataset = open_bench_dataset(workdir / "images")
    test_s = dataset.samples_in("test")[: args.probe_one]
    backbone.fingerprint()
    with PeakMemory(device) as mem, Clock(device) as clock:
        cache = FeatureCache(workdir / f"probe-cache-{args.probe_one}-{os.getpid()}")
        feats = cache.features(backbone, dataset, test_s)
    after = (_status_kb("VmRSS") or 0) / 1024
    return {"n_test": len(test_s), "seconds": clock.seconds, **mem.as_dict(),
            "rss_after_over_start_mb": round(after - mem.start_mb, 1),
            "allocator": os.environ.get("MALLOC_MMAP_THRESHOLD_") and
            f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}" or "glibc default",
            "feature_matrix_mb": feats.numel() * feats.element_size() / 2**20,
            "pixels_if_not_streamed_mb": len(test_s) * 3 * backbone.preprocess.image_size ** 2 * 4 / 2**20}


ALLOCATORS = {"glibc default": {}, "fixed mmap threshold": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def memory_probe(args: argparse.Namespace, log=print) -> dict:
    """Each size in its own process, with glibc's default allocator settings and, with
    ``--compare-allocators``, again with a fixed mmap threshold (large blocks always mapped and unmapped,
    so resident memory follows live data)."""
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="calibprompt-memprobe-"))
    sizes = sorted(args.memory_probe)
    try:
        write_synthetic_images(workdir / "images", args.shots, max(sizes), args.image_size)
        out: dict = {"load_average_start": load_average(), "allocators": {}}
        allocators = ALLOCATORS if args.compare_allocators else {"glibc default": {}}
        for name, env in allocators.items():
            rows = []
            for n in sizes:
                cmd = [sys.executable, str(ENTRY), "--probe-one", str(n), "--workdir", str(workdir),
                       "--device", args.device, "--image-size", str(args.image_size)]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                if args.model_dir:
                    cmd += ["--model-dir", args.model_dir] + (["--text-dir", args.text_dir] if args.text_dir else [])
                child_env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | env
                done = subprocess.run(cmd, check=True, capture_output=True, text=True, env=child_env)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                log(f"[{name}] {n:>5} test images: peak RSS {row['rss_peak_mb']:.0f} MB = {row['rss_start_mb']:.0f} MB "
                    f"before + {row['rss_peak_over_start_mb']:.0f} MB while encoding, "
                    f"{row['rss_after_over_start_mb']:.0f} MB held after ({row['seconds']:.0f} s); feature matrix "
                    f"{row['feature_matrix_mb']:.2f} MB; the pixels alone would be "
                    f"{row['pixels_if_not_streamed_mb']:.0f} MB if not streamed")
            growth = rows[-1]["rss_peak_over_start_mb"] - rows[0]["rss_peak_over_start_mb"]
            held = rows[-1]["rss_after_over_start_mb"] - rows[0]["rss_after_over_start_mb"]
            feat_growth = rows[-1]["feature_matrix_mb"] - rows[0]["feature_matrix_mb"]
            log(f"[{name}] from {sizes[0]} to {sizes[-1]} images: encoding peak {growth:+.1f} MB, held after "
                f"{held:+.1f} MB (the feature matrix grows by {feat_growth:.2f} MB)")
            out["allocators"][name] = {"rows": rows, "peak_growth_mb": growth, "held_growth_mb": held,
                                       "feature_matrix_growth_mb": feat_growth}
        out["load_average_end"] = load_average()
        return out
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
