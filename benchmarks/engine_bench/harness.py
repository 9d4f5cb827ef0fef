"""Timing, memory and equality helpers of the engine benchmark, and its sweep of configurations."""

from __future__ import annotations

import math
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

CLASSES = ("covid", "normal")  # COVID (K = 2), the BiomedCLIP dataset of the paper
VOCAB_WORDS = ("x", "covid", "normal", "chest", "ray", "image", "patient", "of", "a")
# (alpha, lambda_AS) sweep; the first is the paper's BiomedCLIP setting (docs/method.md, "hyper-parameters").
ALPHAS = (0.1, 0.2, 0.05, 0.3, 0.0)
LAMBDAS = (3.0, 1.0, 0.3, 10.0)
ENCODE_BATCH = 32  # FeatureCache's default encoding batch
METRIC_KEYS_SKIP = {"convention", "n_bins", "closed", "n_samples", "n_classes"}


def sweep_configs(n: int) -> list[tuple[float, float]]:
    """``n`` (alpha, lambda) pairs: every alpha with lambda 3 or 1 (alternating), then the other of the
    two, then more lambdas. The first is the paper's BiomedCLIP setting (0.1, 3)."""
    pairs = [(a, LAMBDAS[i % 2]) for i, a in enumerate(ALPHAS)]
    pairs += [(a, LAMBDAS[(i + 1) % 2]) for i, a in enumerate(ALPHAS)]
    for lam in LAMBDAS[2:]:
        pairs += [(a, lam) for a in ALPHAS]
    k = 0
    while len(pairs) < n:  # beyond 20 configurations: more lambdas
        k += 1
        pairs += [(a, round(0.15 * k, 4)) for a in ALPHAS if (a, round(0.15 * k, 4)) not in pairs]
    return pairs[:n]


def objective_for(alpha: float, lam: float):
    """The CalibPrompt objective of one configuration, from the method preset the engine path resolves."""
    from calibprompt.losses import build_objective
    from calibprompt.methods import resolve_method

    return build_objective(resolve_method("calibprompt", alpha=alpha, lambda_as=lam).losses)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Wall-clock timer that synchronises the accelerator at both ends."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0

    def __enter__(self):
        sync(self.device)
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self._t


def _status_kb(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak resident memory (and CUDA allocator peak) during a block.

    Linux: the RSS high-water mark is reset through /proc/self/clear_refs, so each block gets its own
    peak; elsewhere ru_maxrss (a process-lifetime peak) is reported and ``resettable`` is False."""

    def __init__(self, device: torch.device):
        self.device = device
        self.resettable = False
        self.start_mb = self.peak_mb = 0.0
        self.cuda_peak_mb: float | None = None

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.resettable = _status_kb("VmHWM") is not None
        except OSError:
            self.resettable = False
        self.start_mb = (_status_kb("VmRSS") or 0) / 1024
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        hwm = _status_kb("VmHWM") if self.resettable else None
        self.peak_mb = (hwm / 1024) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if self.device.type == "cuda":
            self.cuda_peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20

    def as_dict(self) -> dict:
        out = {"rss_start_mb": round(self.start_mb, 1), "rss_peak_mb": round(self.peak_mb, 1),
               "rss_peak_over_start_mb": round(self.peak_mb - self.start_mb, 1),
               "peak_is_per_phase": self.resettable}
        if self.cuda_peak_mb is not None:
            out["cuda_peak_allocated_mb"] = round(self.cuda_peak_mb, 1)
        return out


class EncoderRecorder:
    """Wraps ``backbone.encode_image`` to record the batch sizes (and time) the engine encodes."""

    def __init__(self, backbone, device):
        self.backbone, self.device = backbone, device
        self.batches: list[int] = []
        self.seconds = 0.0

    def __enter__(self):
        original = type(self.backbone).encode_image.__get__(self.backbone)

        def recorded(images):
            sync(self.device)
            t = time.perf_counter()
            out = original(images)
            sync(self.device)
            self.seconds += time.perf_counter() - t
            self.batches.append(int(images.shape[0]))
            return out

        self.backbone.encode_image = recorded
        return self

    def __exit__(self, *exc):
        del self.backbone.encode_image


def metric_diff(a: dict, b: dict) -> float:
    """Largest absolute difference over the numeric metrics both dicts hold (NaN = NaN counts as 0)."""
    worst = 0.0
    for key, va in a.items():
        if key in METRIC_KEYS_SKIP or key not in b:
            continue
        vb = b[key]
        if not isinstance(va, (int, float)) or not isinstance(vb, (int, float)) or isinstance(va, bool):
            continue
        if math.isnan(va) and math.isnan(vb):
            continue
        worst = max(worst, abs(float(va) - float(vb)) if not (math.isnan(va) or math.isnan(vb)) else math.inf)
    return worst


def compute_metrics(logits: torch.Tensor, labels: np.ndarray) -> dict:
    from calibprompt.metrics import calibration_metrics

    return calibration_metrics(logits.detach().double().cpu().numpy(), labels)


def resolve_device(name: str) -> torch.device:
    """``--device`` as ``calibprompt run`` resolves ``device:``; an unavailable CUDA ends the script."""
    from calibprompt.engine.pipeline import resolve_device as run_device

    try:
        return run_device(name)
    except ValueError:
        raise SystemExit(f"bench_engine: --device {name} requested but CUDA is not available; "
                         "use --device cpu or auto") from None


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"
