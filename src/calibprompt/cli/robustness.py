"""``calibprompt certify``: train (or reuse) a run, then certify it by randomized smoothing (docs/robustness.md)."""

from __future__ import annotations

import argparse


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of numbers, got {text!r}") from None


def register(sub) -> None:
    p = sub.add_parser(
        "certify", help="certified robustness of a config's method by randomized smoothing (PromptSmooth)",
        description="Train (or reuse) the config's run in OUT/run, then certify its smoothed classifier on noisy "
                    "views of the test images (Cohen et al.'s CERTIFY): certified accuracy per radius, abstain rate, "
                    "and ECE / NLL / Brier of the vote probabilities and of single noisy draws. Writes OUT/certify.json, "
                    "OUT/certify.csv and OUT/certified_accuracy.png.")
    p.add_argument("config", help="run config (YAML); method promptsmooth, promptsmooth-as, promptsmooth-calibprompt, "
                                  "or any prompt method / zeroshot with --tta")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    p.add_argument("--sigma", type=float, required=True, help="noise level on the [0, 1] image, e.g. 0.25")
    p.add_argument("--n0", type=int, default=100, help="selection draws per image (default 100)")
    p.add_argument("--n", type=int, default=1000, help="estimation draws per image (default 1000; Cohen et al. 100,000)")
    p.add_argument("--alpha", type=float, default=0.001, help="failure probability (default 0.001)")
    p.add_argument("--radii", type=_floats, default=None, help="radii to report, e.g. 0,0.25,0.5,0.75,1")
    p.add_argument("--max-images", type=int, help="certify this many test images, class by class in turn")
    p.add_argument("--noise-seed", type=int, default=1, help="seed of the certification noise stream (default 1)")
    p.add_argument("--tta", action="store_true", help="PromptSmooth's test-time step on each image first "
                                                      "(zero-shot PromptSmooth with method zeroshot)")
    p.add_argument("--tta-copies", type=int, default=100, help="noisy copies per image for --tta (default 100)")
    p.add_argument("--tta-steps", type=int, default=1, help="AdamW steps per image for --tta (default 1)")
    p.add_argument("--tta-lr", type=float, default=5e-3, help="AdamW learning rate for --tta (default 5e-3)")
    p.add_argument("--allow-clean", action="store_true",
                   help="certify a method that was not trained under noise (a clean baseline)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (overrides the config)")
    p.set_defaults(func=_certify)


def _certify(args: argparse.Namespace) -> int:
    from pathlib import Path

    from calibprompt.cli.output import emit
    from calibprompt.config import load_config, resolve
    from calibprompt.engine.run import run
    from calibprompt.methods import METHODS
    from calibprompt.robustness.certify import DEFAULT_RADII
    from calibprompt.robustness.smoothing import CertifySettings, certify_run
    from calibprompt.robustness.tta import TTASettings

    settings = CertifySettings(sigma=args.sigma, n0=args.n0, n=args.n, alpha=args.alpha,
                               radii=tuple(args.radii) if args.radii is not None else DEFAULT_RADII,
                               noise_seed=args.noise_seed, max_images=args.max_images,
                               tta=TTASettings(args.tta_copies, args.tta_steps, args.tta_lr) if args.tta else None,
                               allow_clean=args.allow_clean)
    settings.check()  # bad settings fail before any training
    overrides = list(args.overrides) + ([f"device={args.device}"] if args.device else [])
    cfg = load_config(args.config, overrides)
    method = resolve(cfg)["resolved_method"]
    if args.tta and method["kind"] != "zeroshot" and not METHODS[method["kind"]].uses_text_tower:
        raise ValueError(f"--tta tunes a prompt at test time; method {method['name']!r} learns none (use a "
                         "prompt-learning method, or method: zeroshot for zero-shot PromptSmooth)")
    if METHODS[method["kind"]].train_views != "noisy" and not (args.tta or args.allow_clean):
        raise ValueError(f"method {method['name']!r} was not trained under noise: use promptsmooth, promptsmooth-as or "
                         "promptsmooth-calibprompt, add --tta (PromptSmooth's test-time step), or pass --allow-clean "
                         "to certify it as a clean baseline")
    out = Path(args.out)
    run(cfg, out / "run", quiet=bool(args.quiet))
    report = certify_run(out / "run", settings, out_dir=out, progress=not args.quiet)
    acc = "  ".join(f"r={float(r):g}: {100 * v:.1f}%" for r, v in report["certified_accuracy"].items())
    text = "\n".join([
        f"certified {report['n_images']} images · {report['method']} · sigma {args.sigma} · n0 {args.n0} · n {args.n} "
        f"· alpha {args.alpha}",
        f"  certified accuracy  {acc}",
        f"  abstain {100 * report['abstain_rate']:.1f}%  smoothed accuracy {100 * report['smoothed_accuracy']:.1f}%",
        f"  ECE: votes {100 * report['smoothed_votes']['ece']:.2f}%  single draw {100 * report['single_draw']['ece']:.2f}%"
        f"  clean {100 * report['clean'].get('ece', float('nan')):.2f}%",
        f"  files: {out / 'certify.json'}, {out / 'certify.csv'}, {out / 'certified_accuracy.png'}"])
    emit(args, {k: v for k, v in report.items() if k != "config"}, text)
    return 0
