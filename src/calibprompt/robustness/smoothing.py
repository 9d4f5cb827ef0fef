"""Certify a finished run: its head (or its prompt, re-tuned per image at test time) on noisy views of
its test images, CERTIFY per image, and the calibration of the smoothed and the single-draw predictions.

Every noisy view goes through the image tower once: the feature cache keys it by (weights, transform,
image content, sigma, noise seed, draw index), so certifying several methods, seeds or settings on the
same images and sigma encodes nothing twice. Draws 0..n0-1 of the certification stream select, draws
n0..n0+n-1 estimate; the single-draw predictions are those of draw n0.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from calibprompt.robustness.certify import DEFAULT_RADII, certified_accuracy, certify_counts, check_radii, check_settings
from calibprompt.robustness.tta import TTA_STREAM, TTASettings, tuned_text_features
from calibprompt.settings import atomic_write_bytes, atomic_write_json, atomic_write_text

CERTIFY_FILE = "certify.json"


@dataclass(frozen=True)
class CertifySettings:
    sigma: float
    n0: int = 100
    n: int = 1000
    alpha: float = 0.001
    radii: tuple[float, ...] = DEFAULT_RADII
    noise_seed: int = 1  # the certification stream (training views use method.noise_seed, default 0)
    max_images: int | None = None  # certify a class-balanced subset of the test images (the original: 500)
    tta: TTASettings | None = None  # PromptSmooth's test-time step before certifying each image
    allow_clean: bool = False  # certify a method that was not trained under noise (a baseline)
    max_rows: int = 1 << 20  # noisy features held in memory at once (images per chunk = max_rows // draws)
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        check_settings(self.sigma, self.alpha, self.n0, self.n)
        check_radii(self.radii)
        if self.max_images is not None and (not isinstance(self.max_images, int) or self.max_images < 1):
            raise ValueError(f"max_images must be a whole number >= 1, got {self.max_images!r}")
        if self.tta is not None:
            self.tta.check()

    def images_per_chunk(self) -> int:
        return max(1, self.max_rows // (self.n0 + self.n))


def certify_run(run_dir: str | Path, settings: CertifySettings, out_dir: str | Path | None = None,
                cache=None, progress: bool = False) -> dict:
    """Certify the finished run in ``run_dir``; writes certify.json, certify.csv and certified_accuracy.png
    into ``out_dir`` (default: the run folder) and returns what certify.json holds."""
    from calibprompt.engine import pipeline
    from calibprompt.engine.artifacts import finished_result, versions
    from calibprompt.methods import METHODS, load_head

    settings.check()
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    result = finished_result(run_dir)
    if result is None:
        raise FileNotFoundError(f"{run_dir} holds no finished run (metrics.json); run `calibprompt train` first")
    resolved = result["config"]
    kind = resolved["resolved_method"]["kind"]
    noisy = METHODS[kind].train_views == "noisy"
    if not (noisy or settings.tta or settings.allow_clean):
        raise ValueError(f"method {resolved['resolved_method']['name']!r} was not trained under noise, so its "
                         "smoothed classifier is not what PromptSmooth certifies: use a promptsmooth method, add the "
                         "test-time step (--tta), or pass --allow-clean to certify it as a clean baseline")
    start = time.perf_counter()
    device = pipeline.resolve_device(resolved["device"])
    dataset, split = _split(resolved, run_dir)
    samples = _subset(split.samples_for("test"), settings.max_images)
    labels = np.array([s.label for s in samples])
    backbone = pipeline.loaded_backbone(resolved["backbone"], device)
    cache = pipeline.feature_cache(cache, resolved)
    head, _meta = load_head(run_dir / "head.safetensors", num_classes=len(dataset.classnames))
    head = head.to(device)
    learner, start_ctx = (_learner(resolved, run_dir, backbone, dataset, device) if settings.tta else (None, None))
    calibrator = _posthoc(result)
    encoded = cache.encoded
    m = settings.n0 + settings.n
    k = len(dataset.classnames)
    selection, estimation = np.zeros((len(samples), k), np.int64), np.zeros((len(samples), k), np.int64)
    single = np.zeros((len(samples), k))
    from calibprompt.progress import progress as make_progress

    bar = make_progress(len(samples), "certifying images", progress)
    step = settings.images_per_chunk()  # memory stays flat whatever n is (Cohen et al.: n = 100,000)
    for lo in range(0, len(samples), step):
        chunk = samples[lo: lo + step]
        feats = cache.noisy_features(backbone, dataset, chunk, settings.sigma, range(m), seed=settings.noise_seed)
        if learner is not None:
            copies = cache.noisy_features(backbone, dataset, chunk, settings.sigma, range(settings.tta.copies),
                                          seed=settings.noise_seed, stream=TTA_STREAM)
            logits = torch.stack([_tta_logits(backbone, learner, start_ctx, copies[i], feats[i], head.scale,
                                              settings.tta, device) for i in range(len(chunk))])
        else:
            with torch.no_grad():
                logits = head(feats.reshape(-1, feats.shape[-1]).to(device)).reshape(len(chunk), m, k).cpu()
        votes = logits.argmax(dim=-1).numpy()
        for j in range(len(chunk)):
            selection[lo + j] = np.bincount(votes[j, : settings.n0], minlength=k)
            estimation[lo + j] = np.bincount(votes[j, settings.n0:], minlength=k)
        single[lo: lo + len(chunk)] = _calibrated(logits[:, settings.n0], calibrator)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    pred, radius = certify_counts(selection, estimation, settings.sigma, settings.alpha)
    report = _report(result, resolved, settings, samples, labels, pred, radius, selection, estimation, single,
                     int(resolved["eval"]["n_bins"]))
    report.update({"seconds": time.perf_counter() - start, "noisy_views_encoded": cache.encoded - encoded,
                   "versions": versions(device), "run_dir": str(run_dir)})
    _write(out_dir, report, samples, labels, pred, radius, selection.argmax(axis=1), estimation, single)
    return report


def _posthoc(result: dict):
    """The run's fitted post-hoc calibrator (``+ts`` and the like), or None: single-draw probabilities are
    calibrated the way the run's own test predictions were, so their metrics compare with ``clean``."""
    state = (result.get("posthoc") or {}).get("state")
    if not state:
        return None
    from calibprompt.calibration import calibrator_from_dict

    return calibrator_from_dict(state, "the run's post-hoc calibrator")


def _calibrated(logits: torch.Tensor, calibrator) -> np.ndarray:
    z = logits.double().numpy()
    return np.asarray(calibrator.transform(z), dtype=np.float64) if calibrator is not None else z


def _split(resolved: dict, run_dir: Path):
    from calibprompt.data import FewShotSplit, open_dataset

    dataset = open_dataset(resolved["data"])
    return dataset, FewShotSplit.from_json(run_dir / "split.json", dataset)


def _subset(samples: list, max_images: int | None) -> list:
    """``max_images`` test images, class by class in turn (each class in its split order): deterministic,
    and as balanced as the classes allow."""
    if max_images is None or max_images >= len(samples):
        return list(samples)
    by_class: dict[int, list] = {}
    for s in samples:
        by_class.setdefault(s.label, []).append(s)
    out, queues = [], [list(v) for _, v in sorted(by_class.items())]
    while len(out) < max_images:
        for queue in queues:
            if queue and len(out) < max_images:
                out.append(queue.pop(0))
    return out


def _learner(resolved: dict, run_dir: Path, backbone, dataset, device):
    """(prompt learner, its starting context) for the test-time step: the run's own context vectors, or for
    a zero-shot run the words of the dataset's template before the class name."""
    from safetensors.torch import load_file

    from calibprompt.methods.prompt_learner import PromptLearner

    p = resolved["prompt"]
    prompt_file = run_dir / "prompt.safetensors"
    if prompt_file.is_file():
        learner = PromptLearner.from_config(backbone, list(dataset.classnames), p, seed=0)  # ctx replaced below
        start = load_file(str(prompt_file))["ctx"]
    elif resolved["resolved_method"]["kind"] == "zeroshot":
        words = p["init"] or dataset.template.split("{}")[0].strip()
        if not words:
            raise ValueError(f"zero-shot test-time tuning starts from the words of the template {dataset.template!r} "
                             "before the class name, and it has none: set prompt.init (e.g. 'a photo of a')")
        learner = PromptLearner(backbone, list(dataset.classnames), init=words, position="end")
        start = learner.ctx.detach().clone()
    else:
        raise ValueError(f"--tta tunes a prompt at test time; method {resolved['resolved_method']['name']!r} has none "
                         "(use a prompt-learning run, or method: zeroshot for zero-shot PromptSmooth)")
    learner = learner.to(device)
    return learner, start.to(device=device, dtype=learner.ctx.dtype)


def _tta_logits(backbone, learner, start, copies: torch.Tensor, feats: torch.Tensor, scale: float,
                tta: TTASettings, device) -> torch.Tensor:
    text = tuned_text_features(backbone, learner, start, copies.to(device), scale, tta)
    with torch.no_grad():
        return (scale * F.normalize(feats.to(device).float(), dim=-1) @ text.t()).cpu()


def _report(result: dict, resolved: dict, settings: CertifySettings, samples, labels, pred, radius, selection,
            estimation, single, n_bins: int) -> dict[str, Any]:
    from calibprompt.metrics import calibration_metrics, calibration_metrics_from_probs

    radii = check_radii(settings.radii)
    votes = estimation / estimation.sum(axis=1, keepdims=True)
    keep = ("accuracy", "ece", "nll", "brier", "adaptive_ece", "mce")
    smoothed = calibration_metrics_from_probs(votes, labels, n_bins=n_bins)
    one_draw = calibration_metrics(single, labels, n_bins=n_bins)
    abstain = float(np.mean(pred < 0))
    return {
        "format": "calibprompt.certify/1",
        "method": resolved["resolved_method"]["name"], "method_kind": resolved["resolved_method"]["kind"],
        "run_id": result.get("run_id"), "seed": result.get("seed"), "dataset": result.get("dataset"),
        "backbone": result.get("backbone"), "n_images": int(len(samples)),
        "settings": {**{k: v for k, v in asdict(settings).items() if k not in ("tta", "extra", "max_rows")},
                     "radii": radii, "tta": asdict(settings.tta) if settings.tta else None},
        # with the test-time step the base classifier depends on the input it certifies, which Cohen et al.'s
        # guarantee does not cover (as in PromptSmooth's own zero-shot results)
        "certificate": "randomized smoothing (Cohen et al.)" if settings.tta is None else
        "heuristic: the test-time step tunes the prompt on noisy copies of the input, so the base classifier "
        "is not fixed and the radius is not a proven certificate",
        "posthoc": (result.get("posthoc") or {}).get("name"),
        "certified_accuracy": {str(r): v for r, v in certified_accuracy(pred, radius, labels, radii).items()},
        "certified_accuracy_strict": {str(r): v for r, v in
                                      certified_accuracy(pred, radius, labels, radii, strict=True).items()},
        "smoothed_accuracy": float(np.mean(pred == labels)), "abstain_rate": abstain,
        "mean_radius_correct": float(np.nanmean(np.where(pred == labels, radius, np.nan)))
        if np.any(pred == labels) else float("nan"),
        "smoothed_votes": {k: float(smoothed[k]) for k in keep},
        "single_draw": {k: float(one_draw[k]) for k in keep},
        "clean": {k: float(result["metrics"][k]) for k in keep if k in result["metrics"]},
        "config": resolved,
    }


def _write(out_dir: Path, report: dict, samples, labels, pred, radius, top, estimation, single) -> None:
    import csv

    out_dir.mkdir(parents=True, exist_ok=True)
    probs = torch.softmax(torch.from_numpy(single), dim=1).numpy()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["idx", "image", "label", "predict", "radius", "correct", "selected", "n_top", "n",
                     "single_draw_predict", "single_draw_confidence"])
    for i, s in enumerate(samples):
        writer.writerow([i, s.ref, int(labels[i]), int(pred[i]), "" if np.isnan(radius[i]) else repr(float(radius[i])),
                         int(pred[i] == labels[i]), int(top[i]), int(estimation[i, top[i]]),
                         int(estimation[i].sum()), int(probs[i].argmax()), repr(float(probs[i].max()))])
    atomic_write_text(out_dir / "certify.csv", buf.getvalue())
    atomic_write_bytes(out_dir / "certified_accuracy.png", accuracy_plot([report]))
    atomic_write_json(out_dir / CERTIFY_FILE, report)


def accuracy_plot(reports: list[dict], labels: list[str] | None = None) -> bytes:
    """PNG of certified accuracy against radius, one line per certify report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for i, rep in enumerate(reports):
        pts = sorted((float(r), v) for r, v in rep["certified_accuracy"].items())
        label = labels[i] if labels else rep["method"]
        ax.step([p[0] for p in pts], [100 * p[1] for p in pts], where="post", marker="o", label=label)
    sigma = reports[0]["settings"]["sigma"] if reports else ""
    ax.set_xlabel("l2 radius (on the [0, 1] image)")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_title(f"randomized smoothing, sigma = {sigma}")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def load_report(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
