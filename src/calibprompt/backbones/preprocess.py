"""Image preprocessing: the paper's test transform (resize shorter side, centre crop) and its train
augmentation (random resized crop + horizontal flip), parameterised per backbone."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocess:
    image_size: int = 224
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    interpolation: str = "bicubic"
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop scale (paper, Dassl default)
    grey: bool = False  # True: one channel (e.g. MedCLIP's own statistics)

    def transform(self, train: bool) -> T.Compose:
        interp = InterpolationMode(self.interpolation)
        if train:
            steps = [
                T.RandomResizedCrop(self.image_size, scale=self.crop_scale, interpolation=interp),
                T.RandomHorizontalFlip(0.5),
            ]
        else:
            steps = [T.Resize(self.image_size, interpolation=interp), T.CenterCrop(self.image_size)]
        if self.grey:
            steps.append(T.Grayscale(1))
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)

    def describe(self, train: bool) -> dict:
        """JSON description: part of the feature-cache key, so a changed transform never reuses features."""
        return {"train": train, **asdict(self)}
