"""Prompt tuning over cached image features.

Per step only the text encoder runs: the K class prompts are assembled from the context vectors, encoded
(trimmed to their real length, which is exact), and compared with the cached features of the batch.

``train_prompts_batched`` trains several configurations at once (one text-encoder pass per step over all
their prompts), each ending where ``train_prompts`` would; see docs/performance.md.

Protocol defaults (paper; docs/method.md, "training protocol"): 50 epochs, batch 16 with ``drop_last`` when the training set
has >= 16 images, SGD lr 0.002 momentum 0.9 weight decay 5e-4, one constant warm-up epoch at 1e-5, then
cosine decay stepped once per epoch: epoch k >= 1 uses lr/2 * (1 + cos(pi (k-1) / epochs)).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from calibprompt.backbones.base import Backbone
from calibprompt.features.cache import AMP_DTYPES, autocast
from calibprompt.methods.base import check_labels
from calibprompt.methods.prompt_learner import PromptLearner
from calibprompt.progress import progress as make_progress

OPTIMIZERS = ("sgd", "adam")


@dataclass
class TrainSettings:
    epochs: int = 50
    batch_size: int = 16
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    optimizer: str = "sgd"
    drop_last: bool = True  # applied only when the training set has >= batch_size images (Dassl)
    shared_prefix: bool = True  # causal towers: the start token and shared context once per step
    amp: str = "none"  # mixed precision of the text tower's pass: "bf16", "fp16" (loss-scaled) or "none"

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train.optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"train.amp {self.amp!r} is not one of {tuple(AMP_DTYPES)}")
        for key in ("epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0 or self.warmup_lr < 0:
            raise ValueError("train.lr must be > 0 and train.warmup_lr >= 0")

    def lr_at(self, epoch: int) -> float:
        """Learning rate of epoch ``epoch`` (0-based): constant warm-up, then cosine per epoch."""
        if epoch < self.warmup_epochs:
            return self.warmup_lr
        k = epoch - self.warmup_epochs
        return 0.5 * self.lr * (1 + math.cos(math.pi * k / self.epochs))


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # mean loss per epoch
    steps: int = 0
    seconds: float = 0.0
    text_tokens: int = 0  # token positions processed by the text encoder (forward)
    skipped_steps: int = 0  # fp16 only: steps the loss scaler skipped because gradients overflowed


def make_optimizer(params, settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                               weight_decay=settings.weight_decay, dampening=0, nesterov=False)
    return torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)


def class_logits(image_features: torch.Tensor, text_features: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """exp(s) * <f_i/|f_i|, t_k/|t_k|>; ``text_features`` are already normalised."""
    return scale * F.normalize(image_features, dim=-1) @ text_features.t()


def view_schedule(n_images: int, n_views: int, epochs: int, generator: torch.Generator) -> torch.Tensor:
    """(epochs, n_images) view index per epoch and image: a fresh view every epoch when the bank has
    one view per epoch (the paper's on-the-fly augmentation); random views when it has fewer."""
    if n_views >= epochs:
        return torch.arange(epochs).unsqueeze(1).expand(epochs, n_images).clone()
    return torch.randint(n_views, (epochs, n_images), generator=generator)


def train_prompts(backbone: Backbone, learner: PromptLearner, objective, views: torch.Tensor,
                  labels: torch.Tensor, settings: TrainSettings, seed: int,
                  zs_text_features: torch.Tensor | None = None, progress: bool = False) -> TrainResult:
    """Tune ``learner.ctx`` on cached features ``views`` (N, V, E) with labels (N,).

    ``objective`` is a callable ``(logits, labels, text_features, zs_logits=, zs_text_features=)``
    (see :func:`calibprompt.losses.build_objective`); zero-shot logits are computed from the batch
    features and ``zs_text_features`` when the objective needs them."""
    settings.validate()
    device = learner.ctx.device
    generator = torch.Generator().manual_seed(seed)
    needs = getattr(objective, "needs", set())
    if needs & {"zs_logits", "zs_text_features"} and zs_text_features is None:
        raise ValueError(f"objective needs zero-shot features ({sorted(needs)}) but none were given")
    n = views.shape[0]
    check_labels(labels, learner.n_classes)
    drop_last = settings.drop_last and n >= settings.batch_size
    # Batch order and views are drawn on the CPU (the same stream on every device) and moved once per
    # epoch; losses stay on the device until the epoch ends: no host sync inside a step (fp16 loss scaling
    # aside: deciding to skip a step reads its scale).
    schedule = view_schedule(n, views.shape[1], settings.epochs, generator).to(device)
    optimizer = make_optimizer([learner.ctx], settings)
    scaler = grad_scaler(device, settings.amp, learner)
    scale = backbone.logit_scale.to(device).float()
    views, labels = views.to(device), labels.to(device)
    result = TrainResult()
    start = time.perf_counter()
    bar = make_progress(settings.epochs, "prompt tuning (epochs)", progress)
    learner.train()
    for epoch in range(settings.epochs):
        for group in optimizer.param_groups:
            group["lr"] = settings.lr_at(epoch)
        order = torch.randperm(n, generator=generator).to(device)
        stop = n - n % settings.batch_size if drop_last else n
        epoch_losses = []
        for begin in range(0, stop, settings.batch_size):
            idx = order[begin : begin + settings.batch_size]
            feats = views[idx, schedule[epoch, idx]]
            with autocast(device, settings.amp):  # the text tower only: logits and losses stay float32
                text = learner.text_features(backbone, shared_prefix=settings.shared_prefix)
            logits = class_logits(feats, text, scale)
            extra = {}
            if zs_text_features is not None and needs & {"zs_logits", "zs_text_features"}:
                extra = {"zs_logits": class_logits(feats, zs_text_features, scale),
                         "zs_text_features": zs_text_features}
            loss = objective(logits, labels[idx], text, **extra)
            optimizer.zero_grad(set_to_none=True)
            result.skipped_steps += step(loss, optimizer, scaler)
            epoch_losses.append(loss.detach())
            result.steps += 1
            result.text_tokens += learner.ids.numel()
        result.losses.append(_mean(epoch_losses))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    learner.eval()
    result.seconds = time.perf_counter() - start
    return result


def train_prompts_batched(backbone: Backbone, learners: Sequence[PromptLearner], objectives: Sequence,
                          views: torch.Tensor | Sequence[torch.Tensor], labels: torch.Tensor | Sequence[torch.Tensor],
                          settings: TrainSettings | Sequence[TrainSettings], seeds: int | Sequence[int],
                          zs_text_features: torch.Tensor | None = None, max_prompts: int | None = None,
                          progress: bool = False) -> list[TrainResult]:
    """Train several configurations' context vectors in lockstep, with one text-encoder pass per step
    for all of them (their C x K prompts stacked into one batch).

    Configuration ``c`` ends exactly where ``train_prompts(backbone, learners[c], objectives[c], views,
    labels, settings[c], seeds[c])`` would: the same batches and views (its own generator), the same
    optimizer, schedule and loss. Each prompt sequence goes through the text encoder independently of
    the others (per-sequence attention masks, no batch statistics), so the sum of the C losses gives
    each context exactly its own gradient; results differ from the sequential ones only by float
    rounding of the larger matrix products. On CPU, one pass over C*K short sequences costs far less
    than C passes over K of them (the weights are read once per step instead of C times).

    ``views``/``labels`` may be one tensor for all configurations or one per configuration (e.g. seeds
    with their own few-shot splits); every configuration must then have the same number of training images.

    With ``shared_prefix`` settings (the default) and shared contexts before the class names, a causal
    text tower runs each configuration's start token and context once per step and only the class
    suffixes per class (``Backbone.encode_shared_prefix`` with one group per configuration).

    Requirements: every learner has the same prompt layout (token ids, n_ctx, class position; CSC and
    shared contexts may be mixed), and every configuration the same ``epochs``, ``batch_size`` and
    ``drop_last`` so their steps line up; learning rate, warm-up, momentum, weight decay and optimizer
    may differ. ``settings``/``seeds`` may be one value for all. ``max_prompts`` bounds the sequences
    per text-encoder pass (memory); configurations are then processed in chunks, each with its own
    forward and backward. ``TrainResult.seconds`` is each configuration's share of the wall time."""
    learners = list(learners)
    objectives = list(objectives)
    n_cfg = len(learners)
    if n_cfg == 0:
        raise ValueError("train_prompts_batched needs at least one prompt learner")
    if len(objectives) != n_cfg:
        raise ValueError(f"{len(objectives)} objectives for {n_cfg} prompt learners; give one per learner")
    if len({id(learner) for learner in learners}) != n_cfg:
        raise ValueError("the same PromptLearner was passed twice; each configuration needs its own")
    settings_list = list(settings) if isinstance(settings, (list, tuple)) else [settings] * n_cfg
    seed_list = [int(s) for s in seeds] if isinstance(seeds, (list, tuple)) else [int(seeds)] * n_cfg
    if len(settings_list) != n_cfg or len(seed_list) != n_cfg:
        raise ValueError("give one TrainSettings and one seed per learner (or a single one for all)")
    for s in settings_list:
        s.validate()
    first, base = learners[0], settings_list[0]
    for i, (learner, s) in enumerate(zip(learners, settings_list)):
        if (learner.ids.shape != first.ids.shape or not torch.equal(learner.ids, first.ids)
                or learner.n_ctx != first.n_ctx or learner.position != first.position):
            raise ValueError(f"learner {i} has another prompt layout (class names, n_ctx or position) than "
                             "learner 0; batched training needs identical layouts")
        if (s.epochs, s.batch_size, s.drop_last) != (base.epochs, base.batch_size, base.drop_last):
            raise ValueError(f"settings {i} differ from settings 0 in epochs/batch_size/drop_last; their "
                             "steps would not line up")
    needs = [getattr(obj, "needs", set()) for obj in objectives]
    zs_needed = [bool(nd & {"zs_logits", "zs_text_features"}) for nd in needs]
    if any(zs_needed) and zs_text_features is None:
        raise ValueError("an objective needs zero-shot features but none were given")
    if max_prompts is not None and max_prompts < first.n_classes:
        raise ValueError(f"max_prompts={max_prompts} is below the number of classes ({first.n_classes})")
    per_pass = n_cfg if max_prompts is None else max(1, max_prompts // first.n_classes)
    chunks = [list(range(i, min(i + per_pass, n_cfg))) for i in range(0, n_cfg, per_pass)]

    device = first.ctx.device
    views_list = [v.to(device) for v in views] if isinstance(views, (list, tuple)) else [views.to(device)] * n_cfg
    labels_list = [y.to(device) for y in labels] if isinstance(labels, (list, tuple)) else [labels.to(device)] * n_cfg
    if len(views_list) != n_cfg or len(labels_list) != n_cfg:
        raise ValueError("give one views tensor and one labels tensor per learner (or a single one for all)")
    n = views_list[0].shape[0]
    if any(v.shape[0] != n or len(y) != n for v, y in zip(views_list, labels_list)):
        raise ValueError(f"configurations have different numbers of training images ({[v.shape[0] for v in views_list]}); "
                         "their steps would not line up")
    for y in labels_list:
        check_labels(y, first.n_classes)
    drop_last = base.drop_last and n >= base.batch_size
    generators = [torch.Generator().manual_seed(seed) for seed in seed_list]
    schedules = [view_schedule(n, v.shape[1], base.epochs, g).to(device) for v, g in zip(views_list, generators)]
    optimizers = [make_optimizer([learner.ctx], s) for learner, s in zip(learners, settings_list)]
    if len({s.amp for s in settings_list}) > 1:
        raise ValueError("batched configurations need one train.amp (their text passes are one pass)")
    # One loss scaler per configuration: each loss reaches only its own context, so scaling each by its own
    # factor gives every configuration the steps (and skips) it would have alone.
    scalers = [grad_scaler(device, s.amp, learner) for s, learner in zip(settings_list, learners)]
    scale = backbone.logit_scale.to(device).float()
    if zs_text_features is not None:
        zs_text_features = zs_text_features.to(device)
    results = [TrainResult() for _ in learners]
    start = time.perf_counter()
    bar = make_progress(base.epochs, f"prompt tuning x{n_cfg} (epochs)", progress)
    for learner in learners:
        learner.train()
    stop = n - n % base.batch_size if drop_last else n
    tokens_per_cfg = int(first.ids.numel())
    # The prompts' token ids do not change during training: one tensor per chunk, so the shared-prefix
    # pass reads each chunk's layout once (Backbone.encode_shared_prefix), not every step.
    chunk_ids = [torch.cat([learners[c].ids for c in chunk]) for chunk in chunks]
    prefix = first.prefix_length if base.shared_prefix and all(learner.prefix_length for learner in learners) else 0
    for epoch in range(base.epochs):
        if bar is not None and epoch:
            bar.update(1)
        for optimizer, s in zip(optimizers, settings_list):
            for group in optimizer.param_groups:
                group["lr"] = s.lr_at(epoch)
        orders = [torch.randperm(n, generator=g).to(device) for g in generators]
        epoch_losses: list[list[torch.Tensor]] = [[] for _ in learners]
        for begin in range(0, stop, base.batch_size):
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            for chunk, ids in zip(chunks, chunk_ids):
                with autocast(device, base.amp):  # the text tower only: logits and losses stay float32
                    embeddings = torch.cat([learners[c]()[0] for c in chunk])
                    if prefix:  # each configuration's start token and context once, its class suffixes against them
                        encoded = backbone.encode_shared_prefix(embeddings, ids, prefix, groups=len(chunk))
                    else:
                        encoded = backbone.encode_embeddings(embeddings, ids)
                text = F.normalize(encoded.float(), dim=-1)
                text = text.view(len(chunk), first.n_classes, -1)
                total = None
                for j, c in enumerate(chunk):
                    idx = orders[c][begin : begin + base.batch_size]
                    feats = views_list[c][idx, schedules[c][epoch, idx]]
                    extra = {}
                    if zs_needed[c]:
                        extra = {"zs_logits": class_logits(feats, zs_text_features, scale),
                                 "zs_text_features": zs_text_features}
                    loss = objectives[c](class_logits(feats, text[j], scale), labels_list[c][idx],
                                         text[j], **extra)
                    epoch_losses[c].append(loss.detach())
                    loss = loss if scalers[c] is None else scalers[c].scale(loss)
                    total = loss if total is None else total + loss
                total.backward()
            for c in range(n_cfg):
                results[c].skipped_steps += step(None, optimizers[c], scalers[c])
                results[c].steps += 1
                results[c].text_tokens += tokens_per_cfg
        for c, losses in enumerate(epoch_losses):
            results[c].losses.append(_mean(losses))
    if bar is not None:
        bar.update(1)
        bar.close()
    for learner in learners:
        learner.eval()
    share = (time.perf_counter() - start) / n_cfg
    for result in results:
        result.seconds = share
    return results


FP16_INIT_SCALE = 2.0**10  # torch's 2**16 overflows the first steps of prompt tuning (few steps, all count)


def grad_scaler(device: torch.device, amp: str, learner: PromptLearner | None = None):
    """A loss scaler for fp16 training (its 5-bit exponent underflows small gradients otherwise); None for
    bf16 and full precision, which need none. The context must be float32 (a backbone loaded in fp16 gives
    an fp16 context, whose gradients the scaler cannot unscale)."""
    if amp != "fp16":
        return None
    if learner is not None and learner.ctx.dtype != torch.float32:
        raise ValueError(f"train.amp fp16 needs a float32 context, but this backbone gives {learner.ctx.dtype} "
                         "(it was loaded in half precision): load it in fp32 (backbone precision) or use "
                         "train.amp: none")
    if hasattr(torch.amp, "GradScaler"):  # torch >= 2.3, any device
        return torch.amp.GradScaler(device.type, init_scale=FP16_INIT_SCALE)
    if device.type == "cuda":
        return torch.cuda.amp.GradScaler(init_scale=FP16_INIT_SCALE)
    raise ValueError("train.amp fp16 on the CPU needs torch >= 2.3; use bf16")


def step(loss: torch.Tensor | None, optimizer, scaler) -> int:
    """Back-propagate ``loss`` (unless done already: None) and step ``optimizer``, through ``scaler`` when
    there is one; returns 1 when the scaler skipped the step (gradients overflowed; it lowers the scale)."""
    if loss is not None:
        (loss if scaler is None else scaler.scale(loss)).backward()
    if scaler is None:
        optimizer.step()
        return 0
    before = scaler.get_scale()  # fp16 only: one read from the device per step
    scaler.step(optimizer)
    scaler.update()
    return int(scaler.get_scale() < before)


def _mean(losses: list[torch.Tensor]) -> float:
    """Mean of an epoch's step losses, read from the device once (the sum of their float32 values in
    double precision, as adding Python floats step by step gave)."""
    return sum(torch.stack(losses).tolist()) / len(losses) if losses else 0.0


@torch.no_grad()
def batched_text_features(backbone: Backbone, learners: Sequence[PromptLearner],
                          max_prompts: int | None = None) -> torch.Tensor:
    """(C, K, embed_dim) normalised class features of C learners of one prompt layout, computed in as few
    text-encoder passes as ``max_prompts`` allows (equal to each ``learner.text_features(backbone)``
    up to float rounding)."""
    learners = list(learners)
    k = learners[0].n_classes
    per_pass = len(learners) if max_prompts is None else max(1, max_prompts // k)
    out = []
    for i in range(0, len(learners), per_pass):
        chunk = learners[i : i + per_pass]
        pieces = [learner() for learner in chunk]
        embeddings = torch.cat([emb for emb, _ in pieces])
        ids = torch.cat([ids for _, ids in pieces])
        out.append(F.normalize(backbone.encode_embeddings(embeddings, ids).float(), dim=-1).view(len(chunk), k, -1))
    return torch.cat(out)
