"""Few-shot PromptSmooth (Hussein et al., MICCAI 2024): CoOp prompts learned on Gaussian-noised images.

The frozen image tower sees ``x + sigma * eps`` (noise on the [0, 1] image after resizing and cropping,
renormalised, not clamped); only the context vectors learn, so that the smoothed classifier
g(x) = argmax_c P[f(x + eps) = c] is accurate and certifiable (``calibprompt.robustness``). As in the
original, one prompt serves every noise level: training view v uses ``sigmas[v % len(sigmas)]``
(default 0.25, 0.5, 0.75, 1.0: the original's mixed-noise set). Each view is the run's augmented view
(random crop and flip, ``train.augment``) with its own noise draw, cached like any other view.

The presets (``calibprompt methods``): ``promptsmooth`` (CE, the original objective), ``promptsmooth-as``
(+ lambda_as * AS, the paper's "PromptSmooth + angular loss"), ``promptsmooth-calibprompt`` (+ SMAC).
The test-time (zero-shot) variant and its combination with these prompts: ``calibprompt certify --tta``.
"""

from __future__ import annotations

from calibprompt.features import Noise
from calibprompt.methods.base import register_method
from calibprompt.methods.coop import CoOp

DEFAULT_SIGMAS = (0.25, 0.5, 0.75, 1.0)


@register_method
class PromptSmooth(CoOp):
    name = "promptsmooth"
    formula = ("CoOp on noisy views: t_k = TextTower([SOT] ctx <class k>), z_k = s · cos(f(x + sigma_v·eps), t_k); "
               "ctx minimises the loss list; sigma_v cycles through `sigmas`")
    reference = "Hussein et al., PromptSmooth (MICCAI 2024); Cohen et al., randomized smoothing (ICML 2019)"
    train_views = "noisy"
    params = {"sigmas": list(DEFAULT_SIGMAS), "noise_seed": 0}

    def validate(self) -> None:
        sigmas = self.hparams["sigmas"]
        if isinstance(sigmas, (int, float)) and not isinstance(sigmas, bool):
            sigmas = self.hparams["sigmas"] = [sigmas]
        if not isinstance(sigmas, (list, tuple)) or not sigmas or not all(
                isinstance(s, (int, float)) and not isinstance(s, bool) and s > 0 for s in sigmas):
            raise ValueError(f"method '{self.name}': sigmas={sigmas!r} is invalid; it must be a noise level > 0 or a "
                             "non-empty list of them, e.g. [0.25, 0.5, 0.75, 1.0]")
        self.hparams["sigmas"] = [float(s) for s in sigmas]
        self._number("noise_seed", 0, integer=True)

    def train_noise(self, n_views: int) -> list[Noise]:
        """The noise of each of ``n_views`` training views."""
        sigmas = self.hparams["sigmas"]
        return [Noise(sigmas[v % len(sigmas)], int(self.hparams["noise_seed"]), v, "train") for v in range(n_views)]
