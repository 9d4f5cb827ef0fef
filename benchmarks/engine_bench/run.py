"""One benchmark run: setup, the engine paths, the reference, the comparison and its printed report."""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.engine_bench.harness import (
    ENCODE_BATCH,
    Clock,
    EncoderRecorder,
    PeakMemory,
    load_average,
    metric_diff,
    resolve_device,
    sweep_configs,
    sync,
)
from benchmarks.engine_bench.paths import engine_features, run_engine_batched, run_engine_sequential, time_isolated
from benchmarks.engine_bench.reference import PathStats, ReferencePrompt, run_reference
from benchmarks.engine_bench.setup import build_biomedclip, embed_on_model_device, load_model_dir, open_bench_dataset
from benchmarks.engine_bench.setup import write_synthetic_images

def run_benchmark(args: argparse.Namespace, log=print) -> dict:
    """Run the benchmark described by ``args`` (see :func:`parse_args`); returns the result dict."""
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run_benchmark(args, log)
    finally:
        torch.set_num_threads(threads_before)


def _run_benchmark(args: argparse.Namespace, log=print) -> dict:
    from calibprompt.methods.prompt_training import TrainSettings

    s = SimpleNamespace(args=args, log=log, device=resolve_device(args.device), load_start=load_average(),
                        t_all=time.perf_counter())
    s.workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="calibprompt-bench-"))
    s.workdir.mkdir(parents=True, exist_ok=True)
    s.configs = sweep_configs(args.configs)
    s.n_ref = min(args.ref_configs, len(s.configs))
    s.settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size)
    s.n_views = args.epochs if args.augment else 1
    try:
        _setup(s)
        _engine(s)
        _reference(s)
        _prefix(s)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(s.workdir, ignore_errors=True)
    return _summary(s)


def _setup(s: SimpleNamespace) -> None:
    """Model, data and warm-up, shared by both paths and timed in neither."""
    args, log = s.args, s.log
    # ---- setup (shared by both paths, not timed in either) --------------------------------
    with Clock(s.device) as t_model:
        s.backbone = (load_model_dir(args.model_dir, args.text_dir) if args.model_dir
                    else build_biomedclip(s.workdir)).to(s.device)
    embed_on_model_device(s.backbone)
    s.n_params = sum(p.numel() for p in s.backbone.parameters())
    log(f"model: {s.backbone.info.name}, {s.n_params / 1e6:.1f} M parameters, built in {t_model.seconds:.1f} s "
        f"on {s.device} ({torch.get_num_threads()} CPU threads)")
    with Clock(s.device) as t_data:
        image_root = write_synthetic_images(s.workdir / "images", args.shots, args.n_test, args.image_size)
        s.dataset = open_bench_dataset(image_root)
    s.train_s, s.test_s = s.dataset.samples_in("train"), s.dataset.samples_in("test")
    log(f"data: {len(s.train_s)} train ({args.shots} shots x {len(s.dataset.classnames)} classes), "
        f"{len(s.test_s)} test synthetic {args.image_size}x{args.image_size} PNGs, written and opened "
        f"(verified) in {t_data.seconds:.1f} s")
    s.backbone.fingerprint()  # the cache key's weights hash, computed once per model (shared setup)
    # warm-up: first calls allocate kernels/workspaces; give both paths the same warm start
    with torch.no_grad():
        size = s.backbone.preprocess.image_size
        s.backbone.encode_image(torch.randn(2, 3, size, size, device=s.device,
                                          dtype=next(s.backbone.parameters()).dtype))
    ReferencePrompt(s.backbone, s.dataset.classnames, args.n_ctx, 0).to(s.device).text_features(s.backbone).sum().backward()
    sync(s.device)


def _engine(s: SimpleNamespace) -> None:
    """The engine: sequential configurations, the isolated unavoidable parts, batched configurations, and
    a second process's warm start from the disk cache."""
    from calibprompt.features import FeatureCache

    args, log = s.args, s.log
    # ---- engine, sequential (the run path) ------------------------------------------------
    s.cache = FeatureCache(s.workdir / "cache")
    s.seq = PathStats()
    log(f"engine (sequential): {len(s.configs)} configurations ...")
    with PeakMemory(s.device) as mem, EncoderRecorder(s.backbone, s.device) as s.rec:
        s.seq_metrics, s.seq_logits, s.encode_first = run_engine_sequential(
            s.backbone, s.dataset, s.train_s, s.test_s, s.configs, s.settings, args.seed, s.cache, augment=args.augment,
            n_views=s.n_views, aug_seed=args.aug_seed, n_ctx=args.n_ctx, device=s.device, stats=s.seq)
    s.seq.memory = mem.as_dict()
    log(f"  {s.seq.seconds:.1f} s (first configuration, cold cache: {s.seq.per_config_seconds[0]:.1f} s, "
        f"of which encoding {s.encode_first:.1f} s); {s.seq.images_encoded} images encoded")

    # ---- isolation timings -----------------------------------------------------------------
    steps_per_epoch = (len(s.train_s) // args.batch_size if len(s.train_s) >= args.batch_size
                       else math.ceil(len(s.train_s) / args.batch_size))
    log("isolated encoder/text timings ...")
    s.iso = time_isolated(s.backbone, s.dataset, s.seq.images_encoded, ENCODE_BATCH, s.seq.steps,
                        args.epochs * steps_per_epoch, len(s.configs), args.n_ctx, s.device,
                        image_batches=args.iso_image_batches)

    # ---- engine, batched -------------------------------------------------------------------
    s.bat = PathStats()
    s.bat_metrics = s.bat_logits = None
    if not args.no_batched:
        log("engine (batched multi-configuration) ...")
        with PeakMemory(s.device) as mem:
            s.bat_metrics, s.bat_logits = run_engine_batched(
                s.backbone, s.dataset, s.train_s, s.test_s, s.configs, s.settings, args.seed, s.cache, augment=args.augment,
                n_views=s.n_views, aug_seed=args.aug_seed, n_ctx=args.n_ctx, device=s.device, stats=s.bat,
                max_prompts=args.max_prompts)
        s.bat.memory = mem.as_dict()
        log(f"  {s.bat.seconds:.1f} s warm + {s.encode_first:.1f} s cold encoding")

    # ---- persistent cache shared by a grid: a second process starts warm from disk ------------
    with Clock(s.device) as s.t_disk:
        s.disk = FeatureCache(s.workdir / "cache")
        engine_features(s.disk, s.backbone, s.dataset, s.train_s, s.test_s, augment=args.augment, n_views=s.n_views,
                        aug_seed=args.aug_seed, device=s.device)


def _reference(s: SimpleNamespace) -> None:
    """The reference loop on the first ``n_ref`` configurations."""
    args, log = s.args, s.log
    # ---- reference -------------------------------------------------------------------------
    s.ref = PathStats()
    s.ref_metrics, s.ref_logits = [], []
    with PeakMemory(s.device) as mem:
        for c in range(s.n_ref):
            log(f"reference configuration {c + 1}/{s.n_ref} (alpha={s.configs[c][0]}, lambda={s.configs[c][1]}) ...")
            with Clock(s.device) as clock:
                m, lg = run_reference(s.backbone, s.dataset, s.train_s, s.test_s, *s.configs[c], s.settings, args.seed,
                                      augment=args.augment, n_views=s.n_views, aug_seed=args.aug_seed,
                                      n_ctx=args.n_ctx, device=s.device, stats=s.ref)
            s.ref.per_config_seconds.append(clock.seconds)
            s.ref_metrics.append(m)
            s.ref_logits.append(lg)
            log(f"  {clock.seconds:.1f} s")
    s.ref.memory = mem.as_dict()
    s.ref.seconds = sum(s.ref.per_config_seconds)


def _prefix(s: SimpleNamespace) -> None:
    """The shared-prefix text pass on a causal tower (ViT-B/32's, PLIP's and QuiltNet's; the benchmark's
    BiomedCLIP text tower is bidirectional and keeps the full pass): one text step at K = 9 (the
    NCT-CRC-HE classes) and the run's n_ctx, full pass against shared prefix."""
    s.prefix = None
    if s.args.no_prefix:
        return
    from benchmarks.bench_prefix import causal_text_models, measure

    s.log("shared-prefix text pass (ViT-B/32 text tower, K = 9) ...")
    s.prefix = measure(causal_text_models()["vit-b-32"], 9, s.args.n_ctx, rounds=5)


def _summary(s: SimpleNamespace) -> dict:
    """The comparison, as the result dict (also printed)."""
    args, log = s.args, s.log
    n_cfg = len(s.configs)
    ref_per_config = s.ref.seconds / s.n_ref
    ref_sweep = ref_per_config * n_cfg
    diffs_seq = [metric_diff(s.ref_metrics[c], s.seq_metrics[c]) for c in range(s.n_ref)]
    logit_seq = [float((s.ref_logits[c] - s.seq_logits[c]).abs().max()) for c in range(s.n_ref)]
    diffs_bat = [metric_diff(s.ref_metrics[c], s.bat_metrics[c]) for c in range(s.n_ref)] if s.bat_metrics else []
    logit_bat = [float((s.ref_logits[c] - s.bat_logits[c]).abs().max()) for c in range(s.n_ref)] if s.bat_logits else []
    engine_single = s.seq.per_config_seconds[0]
    engine_sweep = s.seq.seconds
    out = {
        "mode": "quick" if args.quick else ("default" if args.default_sizes else "custom"),
        "device": str(s.device),
        "model": s.backbone.info.name,
        "model_parameters": s.n_params,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
        "epochs": args.epochs, "shots": args.shots, "n_train": len(s.train_s), "n_test": len(s.test_s),
        "classes": len(s.dataset.classnames), "batch_size": args.batch_size, "augment": bool(args.augment),
        "configs": [list(c) for c in s.configs], "reference_configs_timed": s.n_ref,
        "reference_context_length": s.backbone.info.context_length,
        "engine_prompt_length": s.seq.prompt_length,
        # headline numbers
        "single_speedup": ref_per_config / engine_single,
        "sweep_speedup": ref_sweep / engine_sweep,
        "overhead_ratio": engine_sweep / s.iso["unavoidable_sequential"],
        "max_metric_diff": max(diffs_seq + diffs_bat),
        "max_metric_diff_sequential": max(diffs_seq),
        "max_metric_diff_batched": max(diffs_bat) if diffs_bat else None,
        "max_logit_diff": max(logit_seq + logit_bat),
        # times
        "reference_seconds_per_config": s.ref.per_config_seconds,
        "reference_sweep_seconds_extrapolated": ref_sweep,
        "engine_single_seconds": engine_single,
        "engine_sweep_seconds": engine_sweep,
        "engine_per_config_seconds": s.seq.per_config_seconds,
        "engine_cold_encoding_seconds": s.encode_first,
        "engine_encoder_seconds_inside": s.rec.seconds,
        "engine_encoder_rows": int(sum(s.rec.batches)),  # incl. the cache's zero padding of partial batches
        "warm_disk_cache_seconds": s.t_disk.seconds,
        "warm_disk_cache_images_encoded": s.disk.encoded,
        "isolated": s.iso,
        # work counts (reference extrapolated to the sweep)
        "reference_images_encoded_per_config": s.ref.images_encoded // s.n_ref,
        "reference_images_encoded_sweep": s.ref.images_encoded // s.n_ref * n_cfg,
        "engine_images_encoded": s.seq.images_encoded,
        "reference_text_tokens_per_config": s.ref.text_tokens // s.n_ref,
        "reference_text_tokens_sweep": s.ref.text_tokens // s.n_ref * n_cfg,
        "engine_text_tokens": s.seq.text_tokens,
        "memory": {"reference": s.ref.memory, "engine_sequential": s.seq.memory},
        "metrics_reference": s.ref_metrics,
        "metrics_engine": s.seq_metrics[:s.n_ref],
        "load_average_start": s.load_start, "load_average_end": load_average(),
        "total_seconds": time.perf_counter() - s.t_all,
        "versions": {"torch": torch.__version__, "python": platform.python_version(),
                     "platform": platform.platform()},
    }
    if s.bat_metrics is not None:
        bat_sweep = s.encode_first + s.bat.seconds
        out.update({
            "engine_batched_sweep_seconds": bat_sweep,
            "engine_batched_warm_seconds": s.bat.seconds,
            "sweep_speedup_batched": ref_sweep / bat_sweep,
            "overhead_ratio_batched": bat_sweep / s.iso["unavoidable_batched"],
            "batched_vs_sequential_training": (engine_sweep - s.encode_first) / s.bat.seconds,
            "engine_batched_text_tokens": s.bat.text_tokens,
        })
        out["memory"]["engine_batched"] = s.bat.memory
    if s.prefix is not None:
        out["prefix_text_speedup"] = s.prefix["speedup"]
        out["prefix_text"] = s.prefix
    if s.device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(s.device)
    report(out, log)
    return out



def report(r: dict, log=print) -> None:
    n = len(r["configs"])
    iso = r["isolated"]
    log("")
    log(f"=== engine benchmark ({r['mode']}): {r['model']} on {r['device']}, {r['threads']} threads, "
        f"K={r['classes']}, {r['shots']} shots, batch {r['batch_size']}, {r['epochs']} epochs, "
        f"{r['n_test']} test images, {n} configurations, augmentation {'on' if r['augment'] else 'off'}")
    log(f"load average at start {r['load_average_start']}, at end {r['load_average_end']}; "
        f"OMP_WAIT_POLICY={r['omp_wait_policy']}")
    log(f"reference: timed on {r['reference_configs_timed']} configuration(s) "
        f"({', '.join(f'{s:.1f}' for s in r['reference_seconds_per_config'])} s); the sweep figure is their "
        f"mean x {n} (the reference shares nothing between configurations)")
    ref_sweep = r["reference_sweep_seconds_extrapolated"]
    mem = r["memory"]
    rows = [
        ("", "reference", "engine"),
        ("single configuration [s]", f"{ref_sweep / n:.1f}", f"{r['engine_single_seconds']:.1f}"),
        (f"sweep of {n} [s]", f"{ref_sweep:.1f} (extrapolated)", f"{r['engine_sweep_seconds']:.1f}"),
        ("images encoded (sweep)", f"{r['reference_images_encoded_sweep']}",
         f"{r['engine_images_encoded']} ({r['engine_encoder_rows']} rows)"),
        ("text tokens processed (sweep)", f"{r['reference_text_tokens_sweep']}", f"{r['engine_text_tokens']}"),
        ("text sequence length", f"{r['reference_context_length']}", f"{r['engine_prompt_length']}"),
        ("peak RSS [MB]", f"{mem['reference']['rss_peak_mb']:.0f}", f"{mem['engine_sequential']['rss_peak_mb']:.0f}"),
    ]
    if "cuda_peak_allocated_mb" in mem["reference"]:
        rows.append(("peak CUDA allocated [MB]", f"{mem['reference']['cuda_peak_allocated_mb']:.0f}",
                     f"{mem['engine_sequential']['cuda_peak_allocated_mb']:.0f}"))
    width = max(len(a) for a, _, _ in rows)
    for a, b, c in rows:
        log(f"  {a:<{width}}  {b:>22}  {c:>12}")
    log(f"single_speedup  {r['single_speedup']:.2f}x")
    log(f"sweep_speedup   {r['sweep_speedup']:.2f}x")
    log(f"overhead_ratio  {r['overhead_ratio']:.3f}  (engine {r['engine_sweep_seconds']:.1f} s / unavoidable "
        f"{iso['unavoidable_sequential']:.1f} s = {iso['images']} images through the encoder "
        f"{iso['image_seconds']:.1f} s ({iso['image_seconds_per_image']:.3f} s/image) + "
        f"{iso['text_steps']} text steps x {iso['text_step_seconds']:.3f} s + "
        f"{n} eval passes x {iso['text_eval_seconds']:.3f} s, each timed in isolation)")
    if "sweep_speedup_batched" in r:
        log(f"batched multi-configuration engine: sweep {r['engine_batched_sweep_seconds']:.1f} s "
            f"({r['engine_cold_encoding_seconds']:.1f} s cold encoding + {r['engine_batched_warm_seconds']:.1f} s), "
            f"sweep_speedup {r['sweep_speedup_batched']:.2f}x, overhead_ratio {r['overhead_ratio_batched']:.3f} "
            f"({iso['batched_steps']} steps x {iso['batched_step_seconds']:.3f} s isolated); training "
            f"{r['batched_vs_sequential_training']:.2f}x faster than sequential")
    if "prefix_text_speedup" in r:
        p = r["prefix_text"]
        log(f"prefix_text_speedup {r['prefix_text_speedup']:.2f}x  (ViT-B/32 text tower, K={p['K']}, n_ctx {p['n_ctx']}: "
            f"step {1000 * p['full_s']:.0f} ms full, {1000 * p['prefix_s']:.0f} ms shared prefix; FLOP ratio "
            f"{p['flop_ratio_expected']:.2f}, i.e. up to {p['speedup_expected']:.2f}x)")
    log(f"persistent cache: a second process reads every feature from disk in {r['warm_disk_cache_seconds']:.2f} s "
        f"({r['warm_disk_cache_images_encoded']} images encoded)")
    ok = r["max_metric_diff"] <= 1e-4
    log(f"metric equality (engine vs reference, {r['reference_configs_timed']} configuration(s)): "
        f"max |diff| = {r['max_metric_diff']:.2e} (sequential {r['max_metric_diff_sequential']:.2e}"
        + (f", batched {r['max_metric_diff_batched']:.2e}" if r.get("max_metric_diff_batched") is not None else "")
        + f"), max |logit diff| = {r['max_logit_diff']:.2e} -> {'OK' if ok else 'FAIL'} (tolerance 1e-4)")
    log(f"total {r['total_seconds']:.1f} s")


# ---------------------------------------------------------------------------------------------------
