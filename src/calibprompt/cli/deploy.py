"""``calibprompt export`` and ``calibprompt predict``: take a finished run to new images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a finished run as one model file for `predict`",
        description="Write a finished run (head, post-hoc calibrator, class names, backbone identity, conformal "
                    "and abstention thresholds) as one safetensors file. See docs/deploy.md.")
    p.add_argument("run_dir", help="folder of a finished run (it holds metrics.json and head.safetensors)")
    p.add_argument("--out", required=True, help="model file to write, e.g. model.safetensors")
    p.set_defaults(func=_export)

    p = subparsers.add_parser(
        "predict", help="classify new images with an exported model",
        description="Per image: calibrated class probabilities, the predicted class, the conformal prediction "
                    "set and the abstention flag (when the model has them).")
    p.add_argument("model", help="model file written by `calibprompt export` or CalibPromptClassifier.save")
    p.add_argument("inputs", nargs="+", help="image files, folders (searched recursively) or CSV files of paths")
    p.add_argument("--format", choices=("json", "csv"), default="csv",
                   help="output format (default csv; --json is --format json)")
    p.add_argument("--out", help="write here instead of printing")
    p.add_argument("--backbone-path", help="where the backbone's weights are on this machine, when not where the "
                                           "model was exported")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--cache-dir", help="feature cache root (default: $CALIBPROMPT_CACHE or ~/.cache/calibprompt)")
    p.set_defaults(func=_predict)


def _export(args: argparse.Namespace) -> int:
    from calibprompt.deploy import export_run, load_model

    path = export_run(args.run_dir, args.out)
    model = load_model(path)  # read back: what is written must load
    parts = [f"{len(model.classnames)} classes", f"head {model.head.kind}",
             f"calibrator {model.calibrator.name if model.calibrator else 'none'}",
             f"conformal {model.conformal.score} alpha={model.conformal.alpha}" if model.conformal else "no conformal sets",
             f"abstains below {model.selective.threshold_:.4g}" if model.selective else "no abstention"]
    from calibprompt.cli.output import emit

    emit(args, {"model": str(path), "classes": list(model.classnames), "head": model.head.kind,
                "calibrator": model.calibrator.name if model.calibrator else None,
                "conformal": {"score": model.conformal.score, "alpha": model.conformal.alpha} if model.conformal else None,
                "abstain_below": model.selective.threshold_ if model.selective else None},
         f"wrote {path} ({', '.join(parts)})")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from calibprompt.deploy import load_model, predict_files, render
    from calibprompt.settings import atomic_write_text

    model = load_model(args.model)
    records = predict_files(model, args.inputs, backbone_path=args.backbone_path, device=args.device,
                            cache_dir=args.cache_dir, progress=not args.quiet)
    text = render(records, "json" if args.json else args.format)
    if args.out:
        from calibprompt.cli.output import emit_json

        atomic_write_text(Path(args.out), text)
        if args.json:
            emit_json({"out": str(args.out), "predictions": len(records)})
        elif not args.quiet:
            print(f"wrote {len(records)} predictions to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0
