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

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from calibprompt.pretrain.captions import class_captions, task_text
from calibprompt.pretrain.model import micro_model_cfg, save_model
from calibprompt.pretrain.sources import _image_tensor, _subsample, downstream_pool, pretrain_samples
from calibprompt.pretrain.threads import ThreadTuner
from calibprompt.progress import progress as make_progress

MAX_VAL_EVAL = 2000  # val images per dataset for the zero-shot accuracy reported while pretraining


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


@dataclass
class _Data:
    """Everything pretraining reads: images with their caption-group index, tokenised captions per
    group, val images for the zero-shot accuracy reports, and the record of each source."""

    images: torch.Tensor
    image_groups: torch.Tensor
    sample_weight: torch.Tensor
    groups: list
    group_tokens: list
    val: list  # (images, labels, prompts) per source
    sources: list
    tokenizer: object


def _load_data(data_cfgs: Sequence[dict], settings: PretrainSettings, transform, say) -> _Data:
    """Images of each source's pretraining part and one caption group per (dataset, class)."""
    from open_clip.tokenizer import SimpleTokenizer

    from calibprompt.data import open_dataset

    groups: list[_Group] = []
    train_x, train_g, val, sources = [], [], [], []
    for cfg in data_cfgs:
        dataset = open_dataset(cfg)
        text = task_text(dataset.name)
        samples = _subsample(dataset, pretrain_samples(dataset), settings.max_images_per_class)
        offset = len(groups)
        for label, name in enumerate(dataset.classnames):
            groups.append(_Group(dataset.name, label, name, class_captions(text, name, dataset.template)))
        train_x.append(_image_tensor(dataset, samples, transform))
        train_g.append(torch.tensor([offset + s.label for s in samples]))
        val_s = _subsample(dataset, dataset.samples_in("val"), max(1, MAX_VAL_EVAL // dataset.num_classes))
        val.append((_image_tensor(dataset, val_s, transform), torch.tensor([s.label for s in val_s], dtype=torch.long),
                    [dataset.template.format(c) for c in dataset.classnames]))
        reserved = len(downstream_pool(dataset))
        counts = [len(g.captions) for g in groups[offset:]]
        sources.append({
            "name": dataset.name, "path": str(dataset.location), "template": dataset.template,
            "classnames": dataset.classnames, "fingerprint": dataset.fingerprint(),
            "pretrain_images": len(samples), "pretrain_split": "train" if dataset.has_split else "train part",
            "reserved_for_downstream": reserved, "val_images": len(val_s), "test_images_used": 0,
            "captions_per_class": {g.classname: len(g.captions) for g in groups[offset:]},
        })
        say(f"pretraining data: {dataset.name}: {len(samples)} train images ({reserved} reserved for few-shot, "
            f"test split unused), {len(groups) - offset} classes, {min(counts)}-{max(counts)} captions per class")
    tokenizer = SimpleTokenizer(context_length=settings.context_length)
    group_tokens = [tokenizer(g.captions).long() for g in groups]
    too_long = [c for g, ids in zip(groups, group_tokens) for c, row in zip(g.captions, ids) if row[-1] != 0]
    if too_long:
        raise ValueError(f"captions longer than the context ({settings.context_length}): {too_long[:3]}")
    sizes = torch.tensor([len(t) for t in train_x], dtype=torch.float64)
    share = sizes.sqrt() if settings.balance == "sqrt" else sizes
    weight = torch.cat([torch.full((len(t),), float(share[i] / sizes[i])) for i, t in enumerate(train_x)])
    return _Data(torch.cat(train_x), torch.cat(train_g), weight, groups, group_tokens, val, sources, tokenizer)


def _build_model(settings: PretrainSettings):
    """(open_clip CLIP, its model_cfg, whether the logit scale is learned)."""
    from open_clip.model import CLIP

    model_cfg = micro_model_cfg(settings.context_length, settings.width, settings.width, settings.vision_layers,
                                settings.text_layers, settings.patch_size)
    model = CLIP(**model_cfg)
    learned_scale = settings.logit_scale is None
    if not learned_scale:
        model.logit_scale.data.fill_(math.log(float(settings.logit_scale)))
    model.logit_scale.requires_grad_(learned_scale)
    return model, model_cfg, learned_scale


def lr_at(settings: PretrainSettings, step: int) -> float:
    """Linear warm-up, then cosine decay to 0 at the last step."""
    total = int(settings.steps)
    warmup = min(settings.warmup_steps, max(total // 10, 1))
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    return 0.5 * settings.lr * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def scale_at(settings: PretrainSettings, step: int) -> float:
    """Fixed-scale schedule: starting at 100 stalls learning for hundreds of steps (every image
    collapses onto the majority class), so the scale rises from logit_scale_start to logit_scale."""
    ramp = settings.logit_scale_ramp * int(settings.steps)
    start, end = float(settings.logit_scale_start), float(settings.logit_scale)
    if ramp < 1 or step >= ramp or start >= end:
        return end
    return start * (end / start) ** (step / ramp)


def _step_loss(model, data: _Data, settings: PretrainSettings, generator: torch.Generator,
               scale: torch.Tensor) -> torch.Tensor:
    """Loss of one batch: multi-positive CLIP loss plus the image-image InfoNCE between two views."""
    idx = torch.multinomial(data.sample_weight, settings.batch_size, replacement=True, generator=generator)
    x = data.images[idx]
    if settings.augment:
        x = _augment(x, generator)
    g = data.image_groups[idx]
    caption_ids, caption_g = [], []  # `captions_per_group` random paraphrases of every class
    for k, ids in enumerate(data.group_tokens):
        pick = torch.randint(len(ids), (settings.captions_per_group,), generator=generator)
        caption_ids.append(ids[pick])
        caption_g.append(torch.full((settings.captions_per_group,), k))
    caption_ids, caption_g = torch.cat(caption_ids), torch.cat(caption_g)
    if settings.instance_weight > 0:
        x2 = _augment(data.images[idx], generator) if settings.augment else x
        both = F.normalize(model.encode_image(torch.cat([x, x2])), dim=-1)
        img, img2 = both[: len(idx)], both[len(idx):]
    else:
        img = F.normalize(model.encode_image(x), dim=-1)
    txt = F.normalize(_encode_text(model, caption_ids), dim=-1)
    loss = multi_positive_clip_loss(scale * img @ txt.t(), g, caption_g)
    if settings.instance_weight > 0:
        # keeps features of different images of a class apart (richer features, as a real VLM has)
        sim = settings.instance_scale * img @ img2.t()
        target = torch.arange(len(idx))
        loss = loss + settings.instance_weight * 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target))
    return loss


def _pretrain(data_cfgs: Sequence[dict], out_dir: str | Path, settings: PretrainSettings, progress: bool,
              log: Callable[[str], None] | None) -> dict:
    from calibprompt.backbones.open_clip_model import OpenClipBackbone
    from calibprompt.backbones.preprocess import Preprocess

    from calibprompt.progress import log as logger

    say = log or logger.info
    t_start = time.perf_counter()
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    preprocess = Preprocess(image_size=28)
    data = _load_data(data_cfgs, settings, preprocess.transform(False), say)
    model, model_cfg, learned_scale = _build_model(settings)
    n_params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(_param_groups(model, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.98),
                                  eps=1e-6)
    total = int(settings.steps)
    say(f"micro model: {n_params / 1e6:.2f} M parameters; {len(data.images)} images, {len(data.groups)} caption "
        f"groups; {total} steps of {settings.batch_size} (~{total * settings.batch_size / len(data.images):.1f} "
        "epochs); logit scale " + ("learned" if learned_scale else
                                   f"fixed (not learned): {settings.logit_scale_start:g} rising to "
                                   f"{settings.logit_scale:g} over the first {settings.logit_scale_ramp:.0%} of the steps"))
    history: list[dict] = []
    bar = make_progress(total, "pretraining micro model (steps)", progress, unit="step")
    model.train()
    losses: list[float] = []
    tuner = ThreadTuner(settings.eval_every, settings.threads)
    for step in range(total):
        tuner.before(step)
        t_step = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(settings, step)
        scale = model.logit_scale.exp().clamp(max=100.0) if learned_scale else torch.tensor(scale_at(settings, step))
        loss = _step_loss(model, data, settings, generator, scale)
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
            history.append(_report(model, data, step, total, losses, scale, bar, say))
            losses = []
    if bar is not None:
        bar.close()
    model.eval().requires_grad_(False)
    seconds = time.perf_counter() - t_start
    meta = {
        "format": "calibprompt.micro/1", "model": "micro Med-VLM (open_clip CLIP, CLIP BPE tokenizer)",
        "parameters": n_params, "model_cfg": model_cfg, "settings": asdict(settings), "sources": data.sources,
        "splits": {
            "pretraining": "train split minus the downstream pool (reserved min(64, n//4) per class)",
            "downstream_pool": "few-shot training shots of the demo (never seen in pretraining)",
            "val": "zero-shot accuracy reported during pretraining (no selection); validation shots of the demo",
            "test": "never used here",
        },
        "history": history, "seconds": round(seconds, 1), "torch": torch.__version__,
        "threads_chosen": tuner.history,
    }
    save_model(OpenClipBackbone(model, model_cfg, preprocess, name=Path(out_dir).name), Path(out_dir), meta)
    say(f"saved micro model to {out_dir} ({seconds / 60:.1f} min)")
    return meta


def _report(model, data: _Data, step: int, total: int, losses: list[float], scale, bar, say) -> dict:
    """Zero-shot accuracy on each source's val images, as a history record and a printed line."""
    model.eval()
    val_acc = {src["name"]: zero_shot_accuracy(model, data.tokenizer, vx, vy, vp)
               for src, (vx, vy, vp) in zip(data.sources, data.val)}
    model.train()
    record = {"step": step + 1, "loss": sum(losses) / len(losses), "logit_scale": float(scale),
              "val_zero_shot_accuracy": val_acc}
    line = (f"  step {step + 1}/{total}: loss {record['loss']:.3f}, zero-shot val accuracy "
            + ", ".join(f"{k} {v * 100:.1f}%" for k, v in val_acc.items()))
    if bar is not None:
        bar.write(line)
    else:
        say(line.strip())
    return record
