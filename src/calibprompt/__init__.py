"""calibprompt: calibration-aware prompt learning for medical vision-language models."""

__version__ = "0.1.0"
