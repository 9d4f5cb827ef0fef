"""A tuned, calibrated classifier in one safetensors file: what ``calibprompt export`` writes and
``calibprompt predict`` and :class:`~calibprompt.deploy.classifier.CalibPromptClassifier` read.

It holds everything needed beside the frozen backbone: the classifier head's tensors (for CoOp and
CalibPrompt the class text features of the learned prompts, times the logit scale), the post-hoc
calibrator's parameters, the class names and prompt template, the backbone's config section and image-
tower fingerprint, the resolved run config, and the fitted conformal threshold and abstention threshold
when the run had them. Tensors are stored as ``head.<name>``; everything else is JSON in the metadata.
A sha256 over all of it is stored too, so a changed byte anywhere is detected. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from calibprompt.calibration.base import calibrator_from_dict
from calibprompt.calibration.conformal import ConformalPredictor
from calibprompt.calibration.selective import SelectiveThreshold
from calibprompt.methods.heads import HEAD_FORMAT, HeadError, head_from_tensors
from calibprompt.settings import atomic_write_bytes

FORMAT = "calibprompt.model/1"
JSON_KEYS = ("settings", "classnames", "backbone", "config", "calibrator", "conformal", "selective", "info")
TEXT_KEYS = ("format", "kind", "template", "backbone_fingerprint", "sha256")


class ModelFileError(ValueError):
    """An exported model file that cannot be used; the message names the file and what is wrong."""


@dataclass
class DeployedModel:
    """A classifier head with its calibration and decision rules, for one backbone and class list."""

    head: Any
    classnames: list[str]
    template: str
    backbone: dict  # the backbone: config section the head was fitted with
    backbone_fingerprint: str
    calibrator: Any = None
    conformal: ConformalPredictor | None = None
    selective: SelectiveThreshold | None = None
    config: dict = field(default_factory=dict)  # the resolved run config (or the classifier's settings)
    info: dict = field(default_factory=dict)  # method, run id, calibprompt version

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        tensors = {f"head.{name}": getattr(self.head, name).detach().cpu().contiguous()
                   for name in self.head.tensor_shapes}
        meta = {"format": FORMAT, "kind": self.head.kind, "template": self.template,
                "backbone_fingerprint": self.backbone_fingerprint,
                "settings": self.head.settings(), "classnames": list(self.classnames), "backbone": self.backbone,
                "config": self.config, "info": self.info,
                "calibrator": self.calibrator.to_dict() if self.calibrator is not None else None,
                "conformal": self.conformal.state() if self.conformal is not None else None,
                "selective": self.selective.state() if self.selective is not None else None}
        metadata = {k: (json.dumps(v, sort_keys=True, default=str) if k in JSON_KEYS else str(v))
                    for k, v in meta.items()}
        metadata["sha256"] = _digest(tensors, metadata)
        return save(tensors, metadata=metadata)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write_bytes(path, self.to_bytes())
        return path


def load_model(path: str | Path) -> DeployedModel:
    """Read and validate an exported model: format, every metadata key, the checksum, every head tensor
    and shape, the calibrator and thresholds, and that they agree on the number of classes."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist; create it with `calibprompt export RUN_DIR --out "
                             f"{path.name}` or CalibPromptClassifier.save")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ModelFileError(f"{path} is not a readable safetensors file ({err}); export the model again") from None
    if metadata.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not an exported calibprompt model (format {metadata.get('format')!r}, "
                             f"expected {FORMAT!r}); a run's head.safetensors is evaluated with `calibprompt eval "
                             "--head`, exported with `calibprompt export`")
    missing = sorted(set(JSON_KEYS + TEXT_KEYS) - set(metadata))
    unexpected = sorted(set(metadata) - set(JSON_KEYS + TEXT_KEYS))
    if missing or unexpected:
        raise ModelFileError(f"{path}: metadata keys missing {missing} / unexpected {unexpected}; export it again")
    stored = metadata["sha256"]
    if _digest(tensors, {k: v for k, v in metadata.items() if k != "sha256"}) != stored:
        raise ModelFileError(f"{path} was changed after it was exported (checksum mismatch); export it again")
    try:
        fields = {k: json.loads(metadata[k]) for k in JSON_KEYS}
    except json.JSONDecodeError as err:
        raise ModelFileError(f"{path}: metadata is not valid JSON ({err})") from None
    names = fields["classnames"]
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) for n in names):
        raise ModelFileError(f"{path}: classnames must be a list of at least two names, got {names!r}")
    head_tensors = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    if len(head_tensors) != len(tensors):
        raise ModelFileError(f"{path}: unexpected tensors {sorted(k for k in tensors if not k.startswith('head.'))}")
    try:
        head = head_from_tensors(head_tensors, {"format": HEAD_FORMAT, "kind": metadata["kind"],
                                                "settings": json.dumps(fields["settings"])},
                                 str(path), num_classes=len(names))[0]
        calibrator = calibrator_from_dict(fields["calibrator"], f"{path}: calibrator") \
            if fields["calibrator"] is not None else None
        conformal = ConformalPredictor.from_state(fields["conformal"]) if fields["conformal"] is not None else None
        selective = SelectiveThreshold.from_state(fields["selective"]) if fields["selective"] is not None else None
    except (HeadError, ValueError, TypeError, KeyError) as err:
        raise ModelFileError(f"{path}: {err}") from None
    if conformal is not None and conformal.by_class and len(conformal.class_thresholds_) != len(names):
        raise ModelFileError(f"{path}: {len(conformal.class_thresholds_)} class-conditional conformal thresholds for "
                             f"{len(names)} classes")
    if calibrator is not None and calibrator.num_classes_ != len(names):
        raise ModelFileError(f"{path}: the calibrator was fitted for {calibrator.num_classes_} classes, the head has "
                             f"{len(names)}")
    return DeployedModel(head=head.eval(), classnames=names, template=metadata["template"],
                         backbone=fields["backbone"], backbone_fingerprint=metadata["backbone_fingerprint"],
                         calibrator=calibrator, conformal=conformal, selective=selective, config=fields["config"],
                         info=fields["info"])


def export_run(run_dir: str | Path, out: str | Path) -> Path:
    """Write the exported model of a finished run folder (``metrics.json``, ``config.yaml``, ``head.safetensors``)."""
    from calibprompt.config import yaml_load
    from calibprompt.methods.heads import load_head

    run_dir = Path(run_dir)
    result_path = run_dir / "metrics.json"
    if not result_path.is_file():
        raise ModelFileError(f"{run_dir} holds no finished run (no metrics.json); run `calibprompt train` first")
    result = json.loads(result_path.read_text())
    resolved = result.get("config") or yaml_load((run_dir / "config.yaml").read_text(), str(run_dir / "config.yaml"))
    head, meta = load_head(run_dir / "head.safetensors")
    posthoc = result.get("posthoc") or None
    if posthoc and "state" not in posthoc:
        raise ModelFileError(f"{run_dir}: the run's post-hoc calibrator was recorded by an older calibprompt without "
                             "its state; run it again to export it")
    keys = {"conformal": ("alpha", "score", "lambda", "k_reg", "randomized", "by_class", "threshold",
                          "class_thresholds", "n_calibration"),
            "selective": ("target_risk", "threshold", "calibration_coverage", "met")}
    states = {}
    for section, names in keys.items():
        state = result.get(section)
        missing = [k for k in names if state and k not in state]
        if missing:
            raise ModelFileError(f"{run_dir}: metrics.json's {section} section lacks {missing} (written by an older "
                                 "calibprompt); run it again to export it")
        states[section] = {k: state[k] for k in names} if state else None
    try:
        calibrator = calibrator_from_dict(posthoc["state"], f"{run_dir}: post-hoc calibrator") if posthoc else None
        conformal = ConformalPredictor.from_state(states["conformal"]) if states["conformal"] else None
        selective = SelectiveThreshold.from_state(states["selective"]) if states["selective"] else None
    except ValueError as err:
        raise ModelFileError(f"{run_dir}: {err}") from None
    model = DeployedModel(
        head=head, classnames=list(meta.get("classnames") or []), template=meta.get("template") or _template(resolved),
        backbone=resolved["backbone"], backbone_fingerprint=str(meta.get("backbone_fingerprint", "")),
        calibrator=calibrator, conformal=conformal, selective=selective, config=resolved,
        info={"method": result.get("method"), "run_id": result.get("run_id"), "backbone": result.get("backbone"),
              "dataset": result.get("dataset"), "exported_from": str(run_dir.resolve()),
              "calibprompt": (result.get("versions") or {}).get("calibprompt")},
    )
    if len(model.classnames) < 2 or not model.backbone_fingerprint:
        raise ModelFileError(f"{run_dir}/head.safetensors does not record its class names and backbone; run it again")
    return model.save(out)


def _template(resolved: dict) -> str:
    from calibprompt.data import open_dataset

    template = (resolved.get("data") or {}).get("template")
    return template if template else open_dataset(resolved["data"]).template


def _digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    digest = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
