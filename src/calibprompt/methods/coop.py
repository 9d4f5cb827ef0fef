"""CoOp prompt learning with any loss list: CalibPrompt, its ablations and every loss baseline.

The learned context vectors are spliced into each class prompt and encoded by the frozen text tower
(:mod:`calibprompt.methods.prompt_learner`); training runs over cached image features
(:mod:`calibprompt.methods.prompt_training`). The head is linear in the image feature: the class text
features of the learned prompts, scaled by the backbone's logit scale. The context vectors are kept
beside it as ``prompt.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from calibprompt.methods.base import FitContext, FitResult, Method, register_method, warn_if_smac_alpha_inert
from calibprompt.methods.heads import LinearHead
from calibprompt.methods.prompt_learner import PromptLearner
from calibprompt.methods.prompt_training import TrainResult, TrainSettings, train_prompts, train_prompts_batched


@register_method
class CoOp(Method):
    name = "coop"
    family = "prompt"
    formula = ("t_k = TextTower([SOT] ctx_1..ctx_n <class k>.), z_k = s · cos(f, t_k); ctx minimises "
               "Σ_n w_n L_n (the method's loss list)")
    reference = "Zhou et al., CoOp (IJCV 2022); losses as in CalibPrompt (BMVC 2025)"
    has_prototypes = True
    uses_text_tower = True

    def learner(self, ctx: FitContext) -> PromptLearner:
        return PromptLearner.from_config(ctx.backbone, ctx.classnames, ctx.prompt_cfg, ctx.seed).to(ctx.device)

    def fit(self, ctx: FitContext) -> FitResult:
        learner = self.learner(ctx)
        warn_if_smac_alpha_inert(self.losses, ctx.labels, int(ctx.train_cfg["batch_size"]))
        result = train_prompts(ctx.backbone, learner, self.objective(), ctx.train_views, ctx.labels, _settings(ctx),
                               int(ctx.seed), zs_text_features=ctx.zs_text, progress=ctx.progress)
        return self._result(ctx, learner, _train_info(result, ctx))

    @classmethod
    def batchable(cls) -> bool:
        """Whether configurations of this method can train together (:func:`fit_together`)."""
        return cls.fit is CoOp.fit

    def batch_key(self, ctx: FitContext) -> tuple | None:
        """Configurations whose keys are equal can train together (:func:`fit_together`): one backbone and
        class list, one prompt layout, steps that line up. None: this one trains alone (a subclass with
        its own ``fit``, such as calibprompt-auto's cross-validation)."""
        if not self.batchable():
            return None
        p, tr = ctx.prompt_cfg, ctx.train_cfg
        return (id(ctx.backbone), tuple(ctx.classnames), str(ctx.device), int(p["n_ctx"]), p["position"], p["init"],
                int(tr["epochs"]), int(tr["batch_size"]), bool(tr["drop_last"]), tr.get("amp", "none"), int(len(ctx.labels)),
                ctx.zs_text.detach().cpu().numpy().tobytes())

    def from_prompt(self, ctx: FitContext, path: str | Path) -> FitResult:
        """The head of context vectors saved by an earlier run (``prompt.safetensors``)."""
        from safetensors.torch import load_file

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            names = (handle.metadata() or {}).get("classnames")
        if names is not None and json.loads(names) != [c.replace("_", " ") for c in ctx.classnames]:
            raise ValueError(f"{path} holds context vectors learned for the classes {json.loads(names)}; this "
                             f"dataset has {ctx.classnames}")
        learner = self.learner(ctx)
        ctx_tensor = load_file(str(path))["ctx"]
        if tuple(ctx_tensor.shape) != tuple(learner.ctx.shape):
            raise ValueError(f"{path}: context of shape {tuple(ctx_tensor.shape)} does not fit this prompt learner "
                             f"{tuple(learner.ctx.shape)}; check prompt.n_ctx / prompt.csc and the backbone")
        with torch.no_grad():
            learner.ctx.copy_(ctx_tensor.to(learner.ctx.dtype))
        return self._result(ctx, learner, {"prompt_from": str(path)})

    def _result(self, ctx: FitContext, learner: PromptLearner, info: dict) -> FitResult:
        from safetensors.torch import save

        with torch.no_grad():
            text = learner.text_features(ctx.backbone)
        meta = {"n_ctx": str(learner.n_ctx), "position": learner.position,
                "classnames": json.dumps(learner.classnames)}
        prompt = save({"ctx": learner.ctx.detach().cpu().contiguous()}, metadata=meta)
        head = LinearHead(text, scale=ctx.scale, normalize_weight=False)
        info["prompt_shape"] = list(learner.ids.shape)  # (K, tokens): what one text-encoder pass processes
        return FitResult(head, info, files={"prompt.safetensors": prompt})


def _settings(ctx: FitContext) -> TrainSettings:
    return TrainSettings(**{k: ctx.train_cfg[k] for k in TrainSettings.__dataclass_fields__})


def _train_info(result: TrainResult, ctx: FitContext) -> dict:
    info = {"steps": result.steps, "epoch_losses": result.losses, "text_tokens": result.text_tokens,
            "n_train": int(len(ctx.labels)), "seconds": result.seconds}
    if ctx.train_cfg.get("amp") == "fp16":
        info["skipped_steps"] = result.skipped_steps
        if result.skipped_steps * 4 > result.steps:
            from calibprompt.progress import note

            note(f"train.amp fp16: the loss scaler skipped {result.skipped_steps} of {result.steps} steps "
                 "(gradients overflowed); use bf16 or train.amp: none")
    return info


def fit_together(methods: list[CoOp], ctxs: list[FitContext], max_prompts: int | None = None) -> list[FitResult]:
    """Fit several CoOp configurations of one :meth:`CoOp.batch_key` with one text-encoder pass per step for
    all of them (:func:`~calibprompt.methods.prompt_training.train_prompts_batched`): each ends where its own
    ``fit`` would, up to float rounding (tests: metrics within 1e-4). Each result's info says
    ``batched: C`` and its ``seconds`` is its share of the joint training time."""
    keys = {m.batch_key(c) for m, c in zip(methods, ctxs)}
    if len(keys) != 1 or None in keys:
        raise ValueError("fit_together needs CoOp configurations of one batch key (see CoOp.batch_key)")
    learners = [m.learner(c) for m, c in zip(methods, ctxs)]
    for m, c in zip(methods, ctxs):
        warn_if_smac_alpha_inert(m.losses, c.labels, int(c.train_cfg["batch_size"]))
    results = train_prompts_batched(ctxs[0].backbone, learners, [m.objective() for m in methods],
                                    [c.train_views for c in ctxs], [c.labels for c in ctxs],
                                    [_settings(c) for c in ctxs], [int(c.seed) for c in ctxs],
                                    zs_text_features=ctxs[0].zs_text, max_prompts=max_prompts,
                                    progress=ctxs[0].progress)
    return [m._result(c, learner, {**_train_info(r, c), "batched": len(methods)})
            for m, c, learner, r in zip(methods, ctxs, learners, results)]
