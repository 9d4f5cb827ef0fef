"""``calibprompt train``, ``calibprompt eval`` and ``calibprompt methods``."""

from __future__ import annotations

from calibprompt.cli.output import emit_json



def register(sub) -> None:
    for name, helptext in (("train", "fit a config's method (prompts, probe or adapter) and evaluate it"),
                           ("eval", "evaluate zero-shot (method: zeroshot), a saved head (--head) or prompt (--prompt)")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("config", help="run config (YAML)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.epochs=10 (repeatable)")
        p.add_argument("--out", required=True, help="output folder")
        p.add_argument("--split", help="reuse a few-shot split file (JSON) written by an earlier run")
        p.add_argument("--device", help="cpu, cuda, cuda:N or auto (overrides the config)")
        if name == "train":
            _tracking_flags(p)
        p.add_argument("--overwrite", action="store_true",
                       help="replace a finished run of a different config in --out")
        if name == "eval":
            p.add_argument("--head", help="head.safetensors of a finished run (any method) to evaluate")
            p.add_argument("--prompt", help="prompt.safetensors of a finished prompt-learning run to evaluate")
        p.set_defaults(func=_run_command)

    p = sub.add_parser("methods", help="list every method (prompt learning, feature-space, zero-shot) with its formula")
    p.set_defaults(func=_methods)


def _tracking_flags(p) -> None:
    p.add_argument("--mlflow", metavar="URI", help="mirror the run(s) to this MLflow tracking URI "
                                                  "(e.g. sqlite:///mlruns.db); sets tracking.mlflow")
    p.add_argument("--tensorboard", action="store_true", help="write TensorBoard event files into each run folder "
                                                              "(tensorboard --logdir OUT); sets tracking.tensorboard")


def tracking_overrides(args) -> list[str]:
    """``--set`` items for the tracking flags."""
    out = []
    if getattr(args, "mlflow", None):
        out.append(f"tracking.mlflow={args.mlflow}")
    if getattr(args, "tensorboard", False):
        out.append("tracking.tensorboard=true")
    return out


def _run_command(args) -> int:
    from calibprompt.config import load_config
    from calibprompt.engine.run import run

    overrides = list(args.overrides)
    if args.split:
        overrides.append(f"split_file={args.split}")
    if args.device:
        overrides.append(f"device={args.device}")
    overrides += tracking_overrides(args)
    cfg = load_config(args.config, overrides)
    head_from = getattr(args, "head", None) or getattr(args, "prompt", None)
    if args.command == "eval" and head_from is None and cfg["method"].get("name") != "zeroshot":
        raise ValueError("eval needs --head FILE (or --prompt FILE), or a config with method: zeroshot")
    result = run(cfg, args.out, quiet=args.quiet, overwrite=args.overwrite, head_from=head_from)
    # Under parity: reference the official code's metric definitions are the ones to compare with its logs
    # (its MCE is a weighted maximum, for one); both are in metrics.json, and the line names which it shows.
    reference = (result.get("config") or {}).get("backbone", {}).get("parity") == "reference"
    convention = "reference" if reference else "standard"
    shown = result["metrics_reference" if reference else "metrics"]
    summary = {k: shown[k] for k in ("accuracy", "ece", "mce", "ace", "nll", "brier") if k in shown}
    from calibprompt.cli.output import emit

    text = "\n".join([
        f"run {result['run_id']} · {result['method']} · {result['backbone']} · {result['dataset']}",
        f"  {convention} metrics" + (" (the official code's definitions)" if reference else "") + ": "
        + "  ".join(f"{k} {v * 100:.2f}%" if k not in ("nll", "brier") else f"{k} {v:.4f}" for k, v in summary.items()),
        f"  files in {args.out}; metrics.json holds both conventions"])
    emit(args, {"run_id": result["run_id"], "out": args.out, "convention": convention, **summary,
                "intervals": result.get("intervals")}, text)
    return 0


def _methods(args) -> int:
    from calibprompt.methods import list_methods

    methods = list_methods()
    if args.json:
        emit_json(methods)
        return 0
    from calibprompt.methods import posthoc_suffixes

    width = max(len(m["name"]) for m in methods)
    for family in ("zero-shot", "prompt", "feature"):
        print({"zero-shot": "Zero-shot", "prompt": "Prompt learning (CoOp + a loss list)",
               "feature": "Feature-space (heads on frozen image features; method.losses takes a loss list)"}[family])
        for m in methods:
            if m["family"] == family:
                print(f"  {m['name']:<{width}}  {m['description']}")
    print("Any name may end in " + ", ".join("+" + s for s in posthoc_suffixes())
          + " to add that post-hoc calibrator, fitted on the validation shots (needs val_shots).")
    return 0
