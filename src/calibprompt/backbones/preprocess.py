"""Image preprocessing: the paper's test transform (resize shorter side, centre crop) and its train
augmentation (random resized crop + horizontal flip), parameterised per backbone.

torchvision is imported on first use, not with this module: listing methods or printing the version
must not pay for it (about a second)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Callable

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's aspect-ratio range (torchvision default)
FLIP_P = 0.5


@dataclass(frozen=True)
class Preprocess:
    image_size: int = 224
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    interpolation: str = "bicubic"
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop scale (paper, Dassl default)
    grey: bool = False  # True: one channel (e.g. MedCLIP's own statistics)

    def transform(self, train: bool) -> Callable:
        """torchvision ``Compose`` of the test transform, or of the train augmentation (global RNG)."""
        from torchvision import transforms as T

        interp = self._interp()
        if train:
            steps = [
                T.RandomResizedCrop(self.image_size, scale=self.crop_scale, interpolation=interp),
                T.RandomHorizontalFlip(FLIP_P),
            ]
        else:
            steps = [T.Resize(self.image_size, interpolation=interp), T.CenterCrop(self.image_size)]
        return T.Compose(steps + self._tail())

    def apply(self, image: Any, train: bool = False, seed: int | None = None):
        """One PIL image -> normalised (C, H, W) tensor. With ``train=True`` the random crop and flip are
        drawn from a private generator seeded with ``seed``: the same pixels as :meth:`transform` after
        ``torch.manual_seed(seed)``, without touching the global RNG, so threads can run it at once."""
        if not train:
            return self._test()(image)
        import torch
        from torchvision.transforms import functional as F

        if seed is None:
            raise ValueError("Preprocess.apply(train=True) needs the view's seed")
        gen = torch.Generator().manual_seed(int(seed))
        width, height = image.size
        top, left, h, w = self._crop_box(width, height, gen)
        image = F.resized_crop(image, top, left, h, w, [self.image_size, self.image_size],
                               self._interp(), antialias=True)
        if torch.rand(1, generator=gen) < FLIP_P:
            image = F.hflip(image)
        return self._tail_compose()(image)

    def _crop_box(self, width: int, height: int, gen) -> tuple[int, int, int, int]:
        """torchvision's ``RandomResizedCrop.get_params``, the same draws in the same order, from ``gen``:
        up to 10 tries of (area fraction, log aspect ratio), then the centre crop of the nearest ratio."""
        import torch

        area = height * width
        log_ratio = torch.log(torch.tensor(CROP_RATIO))
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.crop_scale[0], self.crop_scale[1], generator=gen).item()
            aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen)).item()
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, size=(1,), generator=gen).item())
                left = int(torch.randint(0, width - w + 1, size=(1,), generator=gen).item())
                return top, left, h, w
        in_ratio = float(width) / float(height)
        if in_ratio < min(CROP_RATIO):
            w, h = width, int(round(width / min(CROP_RATIO)))
        elif in_ratio > max(CROP_RATIO):
            w, h = int(round(height * max(CROP_RATIO))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def describe(self, train: bool) -> dict:
        """JSON description: part of the feature-cache key, so a changed transform never reuses features."""
        return {"train": train, **asdict(self)}

    # ---- pieces ---------------------------------------------------------------------------------
    def _interp(self):
        from torchvision.transforms import InterpolationMode

        return InterpolationMode(self.interpolation)

    def _tail(self) -> list:
        from torchvision import transforms as T

        return ([T.Grayscale(1)] if self.grey else []) + [T.ToTensor(), T.Normalize(self.mean, self.std)]

    def _tail_compose(self):
        cached = self.__dict__.get("_tail_c")
        if cached is None:
            from torchvision import transforms as T

            cached = T.Compose(self._tail())
            object.__setattr__(self, "_tail_c", cached)
        return cached

    def _test(self):
        cached = self.__dict__.get("_test_c")
        if cached is None:
            cached = self.transform(False)
            object.__setattr__(self, "_test_c", cached)
        return cached
