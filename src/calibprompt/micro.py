"""A micro Med-VLM that the project trains itself, so the whole method can be seen working offline.

The model is an ordinary open_clip ``CLIP`` (causal text transformer, CLIP BPE tokenizer) with a small
config: a ViT with patch 7 on 28x28 images (width 128, 4 layers) and a text transformer of width 128,
3 layers, context 32 (7.8 M parameters, 6.3 M of them the BPE token-embedding table). It is trained
contrastively on real MedMNIST images paired with caption paraphrases built from the class
descriptions; captions of the same class count as positives of each other (a multi-positive,
"supervised" CLIP loss), plus an image-image InfoNCE between two augmented views that keeps the image
features rich (without it they collapse onto one point per class). It is saved in open_clip's hub
format, so it loads through the normal backbone path::

    backbone: {path: ~/.cache/calibprompt/models/micro-medmnist}

Which images are used for what (see docs/demo.md):

* **pretraining** uses the *train* split of each source dataset, minus a reserved *downstream pool*;
* the **downstream pool** (per class :func:`reserve_size` train images, chosen by a seed-independent
  content hash) is never seen in pretraining; the demo draws its few-shot *training shots* from it;
* the *val* split is used to report zero-shot accuracy during pretraining (no selection is made on
  it: the last step is saved) and, in the demo, for the validation shots of temperature scaling;
* the *test* split is never read here.

The saved logit scale is 100 (``logit_scale: 100``), as CLIP-style Med-VLMs effectively have; it is not
learned, but rises from 10 to 100 during the first half of pretraining, because at 100 from the first
step every image sits on the majority class for hundreds of steps. ``logit_scale: null`` learns it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from calibprompt.settings import atomic_write_json, cache_dir, data_dir, sha256_file

MODEL_PREFIX = "micro-medmnist"
DEFAULT_SOURCES = ("pneumoniamnist", "breastmnist")
META_FILE = "micro_pretrain.json"
MAX_VAL_EVAL = 2000  # val images per dataset for the zero-shot accuracy reported while pretraining
ZENODO = "https://zenodo.org/records/10519652"

# ------------------------------------------------------------------------------------------------
# Architecture
# ------------------------------------------------------------------------------------------------


def micro_model_cfg(context_length: int = 32, width: int = 128, embed_dim: int = 128, vision_layers: int = 4,
                    text_layers: int = 3, patch_size: int = 4, image_size: int = 28) -> dict:
    """open_clip ``model_cfg`` of the micro model (CLIP BPE vocabulary of 49,408 tokens)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "patch_size": patch_size, "width": width,
                       "layers": vision_layers, "head_width": 32, "mlp_ratio": 4.0},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": width,
                     "heads": max(1, width // 32), "layers": text_layers},
    }


# ------------------------------------------------------------------------------------------------
# Captions: modality templates x class descriptions
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskText:
    """How a dataset is described in text: its zero-shot template, caption templates (each with one
    "{}") and, per class name, paraphrases of the class description."""

    modality: str
    zero_shot: str
    templates: tuple[str, ...]
    descriptions: dict[str, tuple[str, ...]] = field(default_factory=dict)


_CHEST = (
    "a chest x-ray showing {}.", "a chest radiograph with {}.", "chest x-ray: {}.",
    "a frontal chest x-ray of a child with {}.", "paediatric chest radiograph, {}.",
    "an x-ray image of the chest showing {}.", "a chest x-ray with findings of {}.",
    "radiograph of the lungs: {}.",
)
_BREAST = (
    "a breast ultrasound image showing {}.", "breast ultrasound: {}.", "an ultrasound scan of the breast with {}.",
    "a sonogram of the breast showing {}.", "breast sonography, {}.", "an ultrasound image of breast tissue with {}.",
    "a breast ultrasound with findings of {}.", "ultrasound of the breast: {}.",
)

TASKS: dict[str, TaskText] = {
    "pneumoniamnist": TaskText(
        "chest X-ray", "A chest X-ray image of a {} patient.", _CHEST, {
            "normal": ("normal", "normal lungs", "no pneumonia", "clear lungs", "no acute findings",
                       "healthy lungs", "no consolidation", "no signs of infection"),
            "pneumonia": ("pneumonia", "signs of pneumonia", "lung consolidation", "lung opacity",
                          "a pulmonary infection", "infiltrates in the lungs", "bacterial or viral pneumonia",
                          "pneumonic opacities"),
        }),
    "breastmnist": TaskText(
        "breast ultrasound", "A breast ultrasound image showing {} tissue.", _BREAST, {
            "malignant": ("malignant", "a malignant tumour", "breast cancer", "a malignant lesion",
                          "a suspicious irregular mass", "carcinoma", "malignant tissue"),
            "normal, benign": ("normal, benign", "a benign lesion", "normal breast tissue", "no malignancy",
                               "a benign mass", "a benign cyst or fibroadenoma", "normal, benign tissue"),
        }),
}

TASKS["retinamnist"] = TaskText(
    "retinal fundus", "A retinal fundus photograph with diabetic retinopathy grade {}.", (
        "a retinal fundus photograph with diabetic retinopathy grade {}.", "fundus image, retinopathy grade {}.",
        "a colour fundus photo of diabetic retinopathy grade {}.", "retina: diabetic retinopathy severity {}.",
        "an eye fundus image graded {} for diabetic retinopathy.", "grade {} diabetic retinopathy in a fundus image.",
    ), {str(k): (str(k),) for k in range(5)})

# Modality of the other 2D single-label MedMNIST subsets (captions then use the class name only).
MODALITIES = {
    "pathmnist": "colon pathology", "dermamnist": "dermatoscopic", "octmnist": "retinal OCT",
    "retinamnist": "retinal fundus", "bloodmnist": "blood cell microscopy", "tissuemnist": "kidney cortex microscopy",
    "organamnist": "abdominal CT", "organcmnist": "abdominal CT", "organsmnist": "abdominal CT",
}
_GENERIC = (
    "a {m} image of {}.", "{m} image: {}.", "a {m} image showing {}.", "an example of {} in a {m} image.",
    "a {m} scan of {}.", "{m}, {}.", "a medical image of {}.", "an image showing {}.",
)


def task_text(name: str) -> TaskText:
    """Text description of dataset ``name`` (a MedMNIST flag, else a generic medical one)."""
    from calibprompt.data.medmnist import parse_flag

    try:
        flag = parse_flag(name)[0]
    except ValueError:
        flag = name.lower()
    if flag in TASKS:
        return TASKS[flag]
    modality = MODALITIES.get(flag, "medical")
    zero_shot = f"A {modality} image of {{}}."
    templates = tuple(t.replace("{m}", modality) for t in _GENERIC)
    return TaskText(modality, zero_shot, templates)


def class_captions(text: TaskText, classname: str, template: str | None = None) -> list[str]:
    """Caption paraphrases of one class: every template x every description, plus the dataset's
    zero-shot prompt and the bare class name, deduplicated, lower-case."""
    descriptions = text.descriptions.get(classname, ()) or (classname, f"findings of {classname}",
                                                           f"a case of {classname}")
    if classname not in descriptions:
        descriptions = (classname, *descriptions)
    out = [t.format(d) for t in text.templates for d in descriptions]
    out += [(template or text.zero_shot).format(classname), f"{classname}."]
    return list(dict.fromkeys(c.lower() for c in out))


# ------------------------------------------------------------------------------------------------
# Finding MedMNIST files
# ------------------------------------------------------------------------------------------------

def find_medmnist(flag: str, download: bool = True, quiet: bool = False) -> Path:
    """Path of ``<flag>.npz``: ``$CALIBPROMPT_DATA/medmnist/``, then the medmnist package's folder
    (``~/.medmnist``), then the calibprompt cache; when absent everywhere and ``download``, the
    ``medmnist`` package downloads it (from Zenodo) into the cache. Raises FileNotFoundError with
    instructions when it cannot be found or fetched."""
    name = f"{flag}.npz"
    places = [data_dir() / "medmnist", Path.home() / ".medmnist", cache_dir() / "medmnist"]
    for place in places:
        if (place / name).is_file():
            return place / name
    target = cache_dir() / "medmnist"
    error = "downloading is disabled"
    if download:
        error = _download_medmnist(flag, target, quiet)
        if error is None and (target / name).is_file():
            return target / name
    searched = "\n".join(f"  {p / name}" for p in places)
    raise FileNotFoundError(
        f"MedMNIST file {name} not found. Looked in:\n{searched}\n"
        f"and could not download it ({error}). Either set CALIBPROMPT_DATA to a folder holding "
        f"medmnist/{name} (the project's CI uses ../shared/data), or copy {name} from {ZENODO} (MedMNIST v2, "
        f"CC BY 4.0) into {target}/, or connect to the internet and rerun (the medmnist package then "
        "downloads it)."
    )


def _download_medmnist(flag: str, target: Path, quiet: bool) -> str | None:
    try:
        import medmnist
        from medmnist import INFO
    except ImportError:
        return "the medmnist package is not installed: pip install medmnist"
    if flag not in INFO:
        return f"{flag!r} is not a MedMNIST flag"
    target.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"downloading {flag}.npz with the medmnist package into {target} ...", file=sys.stderr)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)
    try:
        cls = getattr(medmnist, INFO[flag]["python_class"])
        cls(split="test", root=str(target), download=True)
    except Exception as err:  # noqa: BLE001 - offline machines fail in many ways; report one line
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
        for partial in target.glob(f"{flag}*.npz*"):  # never leave half a download behind
            if not _complete_npz(partial):
                partial.unlink(missing_ok=True)
        return f"{type(err).__name__}: {first or 'the download failed (is the machine offline?)'}"
    finally:
        socket.setdefaulttimeout(previous)
    return None


def _complete_npz(path: Path) -> bool:
    try:
        import numpy as np

        with np.load(path, allow_pickle=False) as npz:
            return "test_images" in npz.files
    except Exception:  # noqa: BLE001 - unreadable means incomplete
        return False


def medmnist_data_cfg(flag: str, download: bool = True, quiet: bool = False) -> dict:
    """The ``data:`` section for MedMNIST subset ``flag`` with the micro model's zero-shot template."""
    return {"source": "medmnist", "path": str(find_medmnist(flag, download, quiet)), "name": flag,
            "template": task_text(flag).zero_shot}


# ------------------------------------------------------------------------------------------------
# Which images pretraining may use
# ------------------------------------------------------------------------------------------------

def _rank(salt: str, digest: str) -> str:
    return hashlib.sha256(f"calibprompt/{salt}/{digest}".encode()).hexdigest()


def train_part(dataset) -> list:
    """The images of ``dataset`` that are not test images: its train split, or for an unsplit
    source everything outside the deterministic test hold-out (``data.test_fraction``)."""
    if dataset.has_split:
        return dataset.samples_in("train")
    from calibprompt.data import holdout_test

    if dataset.test_fraction is None:
        raise ValueError(f"dataset {dataset.name!r} has no train/test split; set data.test_fraction so "
                         "the test images can be kept out of pretraining")
    return holdout_test(dataset, dataset.test_fraction)[0]


def reserve_size(n: int) -> int:
    """Images of a class (of ``n`` in the train part) reserved for the downstream few-shot pool:
    a quarter, at most 64, and at least half of a small class up to 16 (so 8 shots always fit)."""
    return min(64, max(n // 4, min(16, n // 2)))


def downstream_pool(dataset) -> list:
    """Per class, :func:`reserve_size` images of the train part, chosen by a seed-independent content
    hash. They are kept out of pretraining so the demo's few-shot training shots are new to the model."""
    pool = []
    train = train_part(dataset)
    for label in range(dataset.num_classes):
        members = sorted((s for s in train if s.label == label),
                         key=lambda s: (_rank("micro-reserve", dataset.content_hash(s)), s.ref))
        pool += members[: reserve_size(len(members))]
    return pool


def pretrain_samples(dataset) -> list:
    """Train-part images minus the downstream pool (and minus any image whose content equals a
    reserved or test image)."""
    reserved = {dataset.content_hash(s) for s in downstream_pool(dataset)}
    test_hashes = {dataset.content_hash(s) for s in dataset.samples_in("test")} if dataset.has_split else set()
    blocked = reserved | test_hashes
    return [s for s in train_part(dataset) if dataset.content_hash(s) not in blocked]


# ------------------------------------------------------------------------------------------------
# Pretraining
# ------------------------------------------------------------------------------------------------

@dataclass
class PretrainSettings:
    steps: int = 400  # optimisation steps (the cost does not grow with the dataset)
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 30
    logit_scale: float | None = 100.0  # exp(s) of the saved model, not learned; None learns it (init 1/0.07)
    logit_scale_start: float = 10.0  # the fixed scale rises log-linearly from this value ...
    logit_scale_ramp: float = 0.5  # ... over this fraction of the steps, then stays at logit_scale
    eval_every: int = 100  # steps between zero-shot accuracy reports on the val splits
    max_images_per_class: int = 4000  # cap on large datasets (class-balanced, content-ranked subsample)
    captions_per_group: int = 16  # captions of every class encoded per step
    balance: str = "sqrt"  # how often each dataset is drawn: "sqrt" (~ sqrt of its size) or "size"
    augment: bool = True  # random resized crop (area 0.5-1) and horizontal flip
    instance_weight: float = 1.0  # image-image InfoNCE between two views of each image (0: off); without it
    #                               the image features collapse onto one point per class (docs/demo.md)
    instance_scale: float = 10.0  # its logit scale (temperature 0.1)
    threads: int | None = None  # torch threads while pretraining; None: measured (1 or all, see ThreadTuner)
    seed: int = 0
    context_length: int = 32
    width: int = 128
    vision_layers: int = 4
    text_layers: int = 3
    patch_size: int = 7

    def validate(self) -> None:
        for key in ("steps", "batch_size", "eval_every", "captions_per_group"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"pretraining {key} must be >= 1, got {getattr(self, key)}")
        if self.logit_scale is not None and not 1 <= float(self.logit_scale) <= 100:
            raise ValueError(f"logit_scale must be in [1, 100] or null (learned), got {self.logit_scale}")
        if self.balance not in ("sqrt", "size"):
            raise ValueError(f"balance must be 'sqrt' or 'size', got {self.balance!r}")
        if 28 % self.patch_size:
            raise ValueError(f"patch_size must divide the image size 28, got {self.patch_size}")


@dataclass
class _Group:
    dataset: str
    label: int
    classname: str
    captions: list[str]


def _image_tensor(dataset, samples: Sequence, transform) -> torch.Tensor:
    return torch.stack([transform(dataset.load(s)) for s in samples]) if samples else torch.empty(0)


def _subsample(dataset, samples: list, cap: int) -> list:
    out = []
    for label in range(dataset.num_classes):
        members = sorted((s for s in samples if s.label == label),
                         key=lambda s: (_rank("micro-subsample", dataset.content_hash(s)), s.ref))
        out += members[:cap]
    return out


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random resized crop (area 0.5-1, aspect 3/4-4/3) and horizontal flip, in one
    ``grid_sample`` call on the normalised batch."""
    b = x.shape[0]
    area = torch.empty(b).uniform_(0.5, 1.0, generator=generator)
    log_ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = log_ratio.exp()
    sx = (area * ratio).sqrt().clamp(max=1.0)
    sy = (area / ratio).sqrt().clamp(max=1.0)
    tx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - sx)
    ty = (torch.rand(b, generator=generator) * 2 - 1) * (1 - sy)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx * flip, tx
    theta[:, 1, 1], theta[:, 1, 2] = sy, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _encode_text(model, ids: torch.Tensor) -> torch.Tensor:
    """open_clip's text path on ids trimmed to their longest real length (exact under the causal
    mask: positions after the end-of-text token never reach it)."""
    length = int(ids.argmax(dim=1).max()) + 1
    ids = ids[:, :length]
    x = model.token_embedding(ids) + model.positional_embedding[:length]
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)]
    return x @ model.text_projection


class ThreadTuner:
    """Chooses the torch thread count by timing real steps: 1 thread against all cores, two steps
    each, at the start and again every ``every`` steps. On an idle machine all cores win; on a busy
    one (other processes on the same cores) multi-threaded steps can be 5-10x slower than one thread,
    because every small op waits at a thread barrier for a descheduled thread."""

    def __init__(self, every: int, fixed: int | None = None):
        cores = max(1, os.cpu_count() or 1)
        try:
            cores = min(cores, len(os.sched_getaffinity(0)))
        except AttributeError:  # not on Linux
            pass
        self.candidates = [fixed] if fixed else sorted({1, cores})
        self.every = max(every, 8)
        self.times: dict[int, list[float]] = {}
        self.choice = self.candidates[-1]
        self.history: list[int] = []

    def _phase(self, step: int) -> int:
        return step % self.every - 1  # step 0 of each period (warm-up effects) is not timed

    def before(self, step: int) -> None:
        phase = self._phase(step)
        if len(self.candidates) > 1 and 0 <= phase < 2 * len(self.candidates):
            if phase == 0:
                self.times = {}
            torch.set_num_threads(self.candidates[phase // 2])
        else:
            torch.set_num_threads(self.choice)

    def after(self, step: int, seconds: float) -> None:
        phase = self._phase(step)
        if len(self.candidates) > 1 and 0 <= phase < 2 * len(self.candidates):
            self.times.setdefault(self.candidates[phase // 2], []).append(seconds)
            if phase == 2 * len(self.candidates) - 1:
                self.choice = min(self.times, key=lambda k: sum(self.times[k]))
                self.history.append(self.choice)


def multi_positive_clip_loss(logits: torch.Tensor, image_groups: torch.Tensor,
                             text_groups: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss in which every caption of an image's class is a positive: the target of
    each row is uniform over its positives. Captions whose class has no image in the batch are left
    out of the text-to-image half."""
    positive = (image_groups[:, None] == text_groups[None, :]).float()  # (B, M)
    i2t = torch.sum(-positive / positive.sum(1, keepdim=True) * F.log_softmax(logits, dim=1), dim=1).mean()
    has = positive.sum(0) > 0
    pos_t = positive.t()[has]
    t2i = torch.sum(-pos_t / pos_t.sum(1, keepdim=True) * F.log_softmax(logits.t()[has], dim=1), dim=1).mean()
    return 0.5 * (i2t + t2i)


def _param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embedding" in name or name.endswith("class_embedding") or "ln_" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, images: torch.Tensor, labels: torch.Tensor, prompts: list[str]) -> float:
    if len(labels) == 0:
        return float("nan")
    text = F.normalize(_encode_text(model, tokenizer(prompts).long()), dim=-1)
    feats = torch.cat([model.encode_image(images[i:i + 512]) for i in range(0, len(images), 512)])
    pred = (F.normalize(feats, dim=-1) @ text.t()).argmax(dim=1)
    return float((pred == labels).float().mean())


def pretrain_micro(data_cfgs: Sequence[dict], out_dir: str | Path, settings: PretrainSettings | None = None,
                   progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Pretrain the micro model on the pretraining images of each ``data:`` config and save it to
    ``out_dir`` (open_clip hub format plus ``micro_pretrain.json``). Returns that metadata."""
    settings = settings or PretrainSettings()
    settings.validate()
    previous = torch.get_num_threads()
    try:
        return _pretrain(data_cfgs, out_dir, settings, progress, log)
    finally:
        torch.set_num_threads(previous)


def _pretrain(data_cfgs: Sequence[dict], out_dir: str | Path, settings: PretrainSettings, progress: bool,
              log: Callable[[str], None] | None) -> dict:
    from open_clip.model import CLIP
    from open_clip.tokenizer import SimpleTokenizer

    from calibprompt.backbones.open_clip_model import OpenClipBackbone
    from calibprompt.backbones.preprocess import Preprocess
    from calibprompt.data import open_dataset

    say = log or (lambda msg: print(msg, file=sys.stderr))
    t_start = time.perf_counter()
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    preprocess = Preprocess(image_size=28)
    transform = preprocess.transform(False)

    # ---- data: images of the pretraining part, and one caption group per (dataset, class) --------
    groups: list[_Group] = []
    train_x, train_g, val_x, val_y, val_prompts, sources = [], [], [], [], [], []
    for cfg in data_cfgs:
        dataset = open_dataset(cfg)
        text = task_text(dataset.name)
        samples = _subsample(dataset, pretrain_samples(dataset), settings.max_images_per_class)
        offset = len(groups)
        for label, name in enumerate(dataset.classnames):
            groups.append(_Group(dataset.name, label, name, class_captions(text, name, dataset.template)))
        train_x.append(_image_tensor(dataset, samples, transform))
        train_g.append(torch.tensor([offset + s.label for s in samples]))
        val = _subsample(dataset, dataset.samples_in("val"), max(1, MAX_VAL_EVAL // dataset.num_classes))
        val_x.append(_image_tensor(dataset, val, transform))
        val_y.append(torch.tensor([s.label for s in val], dtype=torch.long))
        val_prompts.append([dataset.template.format(c) for c in dataset.classnames])
        sources.append({
            "name": dataset.name, "path": str(dataset.location), "template": dataset.template,
            "classnames": dataset.classnames, "fingerprint": dataset.fingerprint(),
            "pretrain_images": len(samples), "pretrain_split": "train" if dataset.has_split else "train part",
            "reserved_for_downstream": len(downstream_pool(dataset)), "val_images": len(val),
            "test_images_used": 0,
            "captions_per_class": {g.classname: len(g.captions) for g in groups[offset:]},
        })
        say(f"pretraining data: {dataset.name}: {len(samples)} train images "
            f"({len(downstream_pool(dataset))} reserved for few-shot, test split unused), "
            f"{len(groups) - offset} classes, "
            f"{min(len(g.captions) for g in groups[offset:])}-{max(len(g.captions) for g in groups[offset:])} "
            "captions per class")
    images = torch.cat(train_x)
    image_groups = torch.cat(train_g)
    tokenizer = SimpleTokenizer(context_length=settings.context_length)
    group_tokens = [tokenizer(g.captions).long() for g in groups]
    too_long = [c for g, ids in zip(groups, group_tokens) for c, row in zip(g.captions, ids) if row[-1] != 0]
    if too_long:
        raise ValueError(f"captions longer than the context ({settings.context_length}): {too_long[:3]}")

    # ---- model -----------------------------------------------------------------------------------
    model_cfg = micro_model_cfg(settings.context_length, settings.width, settings.width, settings.vision_layers,
                                settings.text_layers, settings.patch_size)
    model = CLIP(**model_cfg)
    learned_scale = settings.logit_scale is None
    if not learned_scale:
        model.logit_scale.data.fill_(math.log(float(settings.logit_scale)))
    model.logit_scale.requires_grad_(learned_scale)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(_param_groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.98),
                                  eps=1e-6)
    n = len(images)
    sizes = torch.tensor([len(t) for t in train_x], dtype=torch.float64)
    share = sizes.sqrt() if settings.balance == "sqrt" else sizes
    sample_weight = torch.cat([torch.full((len(t),), float(share[i] / sizes[i])) for i, t in enumerate(train_x)])
    total = int(settings.steps)
    warmup = min(settings.warmup_steps, max(total // 10, 1))

    def lr_at(step: int) -> float:
        if step < warmup:
            return settings.lr * (step + 1) / warmup
        return 0.5 * settings.lr * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    def scale_at(step: int) -> float:
        """Fixed-scale schedule: starting at 100 stalls learning for hundreds of steps (every image
        collapses onto the majority class), so the scale rises from logit_scale_start to logit_scale."""
        ramp = settings.logit_scale_ramp * total
        start, end = float(settings.logit_scale_start), float(settings.logit_scale)
        if ramp < 1 or step >= ramp or start >= end:
            return end
        return start * (end / start) ** (step / ramp)

    say(f"micro model: {n_params / 1e6:.2f} M parameters; {n} images, {len(groups)} caption groups; "
        f"{total} steps of {settings.batch_size} (~{total * settings.batch_size / n:.1f} epochs); logit scale "
        + ("learned" if learned_scale else f"fixed (not learned): {settings.logit_scale_start:g} rising to "
           f"{settings.logit_scale:g} over the first {settings.logit_scale_ramp:.0%} of the steps"))
    history: list[dict] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="pretraining micro model", unit="step")
    model.train()
    losses: list[float] = []
    tuner = ThreadTuner(settings.eval_every, settings.threads)
    for step in range(total):
        tuner.before(step)
        t_step = time.perf_counter()
        idx = torch.multinomial(sample_weight, settings.batch_size, replacement=True, generator=generator)
        x = images[idx]
        if settings.augment:
            x = _augment(x, generator)
        g = image_groups[idx]
        # captions: `captions_per_group` random paraphrases of every class
        caption_ids, caption_g = [], []
        for k, ids in enumerate(group_tokens):
            pick = torch.randint(len(ids), (settings.captions_per_group,), generator=generator)
            caption_ids.append(ids[pick])
            caption_g.append(torch.full((settings.captions_per_group,), k))
        caption_ids, caption_g = torch.cat(caption_ids), torch.cat(caption_g)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        if settings.instance_weight > 0:
            x2 = _augment(images[idx], generator) if settings.augment else x
            both = F.normalize(model.encode_image(torch.cat([x, x2])), dim=-1)
            img, img2 = both[: len(idx)], both[len(idx):]
        else:
            img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(_encode_text(model, caption_ids), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100.0) if learned_scale else torch.tensor(scale_at(step))
        loss = multi_positive_clip_loss(scale * img @ txt.t(), g, caption_g)
        if settings.instance_weight > 0:
            # keeps features of different images of a class apart (richer features, as a real VLM has)
            sim = settings.instance_scale * img @ img2.t()
            target = torch.arange(len(idx))
            loss = loss + settings.instance_weight * 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if learned_scale:
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        tuner.after(step, time.perf_counter() - t_step)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if (step + 1) % settings.eval_every == 0 or step + 1 == total:
            model.eval()
            val_acc = {src["name"]: zero_shot_accuracy(model, tokenizer, vx, vy, vp)
                       for src, vx, vy, vp in zip(sources, val_x, val_y, val_prompts)}
            model.train()
            record = {"step": step + 1, "loss": sum(losses) / len(losses), "logit_scale": float(scale),
                      "val_zero_shot_accuracy": val_acc}
            losses = []
            history.append(record)
            line = (f"  step {step + 1}/{total}: loss {record['loss']:.3f}, zero-shot val accuracy "
                    + ", ".join(f"{k} {v * 100:.1f}%" for k, v in val_acc.items()))
            if bar is not None:
                bar.write(line)
            else:
                say(line.strip())
    if bar is not None:
        bar.close()
    model.eval().requires_grad_(False)
    seconds = time.perf_counter() - t_start

    backbone = OpenClipBackbone(model, model_cfg, preprocess, name=Path(out_dir).name)
    meta = {
        "format": "calibprompt.micro/1",
        "model": "micro Med-VLM (open_clip CLIP, CLIP BPE tokenizer)",
        "parameters": n_params,
        "model_cfg": model_cfg,
        "settings": asdict(settings),
        "sources": sources,
        "splits": {
            "pretraining": "train split minus the downstream pool (reserved min(64, n//4) per class)",
            "downstream_pool": "few-shot training shots of the demo (never seen in pretraining)",
            "val": "zero-shot accuracy reported during pretraining (no selection); validation shots of the demo",
            "test": "never used here",
        },
        "history": history,
        "seconds": round(seconds, 1),
        "torch": torch.__version__,
        "threads_chosen": tuner.history,
    }
    save_model(backbone, Path(out_dir), meta)
    say(f"saved micro model to {out_dir} ({seconds / 60:.1f} min)")
    return meta


def save_model(backbone, out_dir: Path, meta: dict) -> None:
    """Write the hub-format folder atomically: a temporary sibling folder renamed into place."""
    out_dir = Path(out_dir).expanduser()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    backbone.save_dir(tmp)
    meta = {**meta, "weights_sha256": sha256_file(tmp / "open_clip_model.safetensors")}
    atomic_write_json(tmp / META_FILE, meta)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


# ------------------------------------------------------------------------------------------------
# Where the model lives; pretrain when missing
# ------------------------------------------------------------------------------------------------

def model_dir(sources: Sequence[str] = DEFAULT_SOURCES, root: str | Path | None = None) -> Path:
    """``<cache>/models/micro-medmnist`` for the default sources, else ``micro-medmnist-<names>``."""
    base = Path(root).expanduser() if root else cache_dir() / "models"
    names = sorted(sources)
    if names == sorted(DEFAULT_SOURCES):
        return base / MODEL_PREFIX
    label = "-".join(n.replace("mnist", "") for n in names)
    if len(label) > 40:
        label = hashlib.sha256("|".join(names).encode()).hexdigest()[:12]
    return base / f"{MODEL_PREFIX}-{label}"


def read_meta(folder: str | Path) -> dict | None:
    """The pretraining metadata of a micro model folder, or None when it is not a complete one."""
    folder = Path(folder).expanduser()
    path = folder / META_FILE
    if not (folder / "open_clip_model.safetensors").is_file() or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def ensure_model(data_cfgs: Sequence[dict], folder: str | Path | None = None,
                 settings: PretrainSettings | None = None, progress: bool = True, retrain: bool = False,
                 log: Callable[[str], None] | None = None) -> tuple[Path, dict, bool]:
    """The micro model pretrained on ``data_cfgs`` (pretraining it when missing, or when ``retrain``).
    Returns (folder, metadata, whether it was trained now). A folder pretrained on other datasets is
    an error: choose another folder."""
    names = [str(c.get("name") or Path(c["path"]).stem) for c in data_cfgs]
    folder = Path(folder).expanduser() if folder else model_dir(names)
    meta = read_meta(folder)
    if meta is not None and not retrain:
        have = sorted(s["name"] for s in meta.get("sources", []))
        if have != sorted(names):
            raise ValueError(f"{folder} holds a micro model pretrained on {have}, not {sorted(names)}; "
                             "pass another folder or --retrain")
        return folder, meta, False
    meta = pretrain_micro(data_cfgs, folder, settings, progress=progress, log=log)
    return folder, meta, True
