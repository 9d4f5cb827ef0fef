"""Post-hoc calibrators fitted on validation logits (``fit`` / ``transform``), one registry.

| name   | what                                                   | keeps argmax (accuracy)? |
|--------|--------------------------------------------------------|--------------------------|
| ts     | temperature scaling: z / T, T by NLL (float64)         | yes (T > 0)              |
| zs-ts  | temperature fitted on one dataset, saved, reused       | yes                      |
| vs     | vector scaling: w ⊙ z + b per class, by NLL            | no (the bias can flip)   |
| hb     | histogram binning (top-label or one-vs-rest)           | no                       |
| iso    | isotonic regression one-vs-rest, then renormalised     | no                       |

A calibrator whose ``as_suffix`` is true may follow a method name (``coop-ce+ts``).
"""

from calibprompt.calibration.base import CALIBRATORS, Calibrator, get_calibrator, load_calibrator, register_calibrator
from calibprompt.calibration.scaling import TemperatureScaling, VectorScaling, ZeroShotTemperature  # noqa: I001
from calibprompt.calibration.binning import HistogramBinning, IsotonicCalibration  # registered after scaling

__all__ = [
    "CALIBRATORS",
    "Calibrator",
    "HistogramBinning",
    "IsotonicCalibration",
    "TemperatureScaling",
    "VectorScaling",
    "ZeroShotTemperature",
    "get_calibrator",
    "load_calibrator",
    "register_calibrator",
]
