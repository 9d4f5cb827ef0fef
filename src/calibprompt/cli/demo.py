"""``calibprompt pretrain-micro`` and ``calibprompt demo`` (docs/demo.md)."""

from __future__ import annotations

from calibprompt.cli.output import emit


def register(sub) -> None:
    p = sub.add_parser(
        "pretrain-micro",
        help="pretrain the micro Med-VLM on MedMNIST train splits (offline stand-in for a real Med-VLM)",
        description="Pretrain the micro Med-VLM (open_clip CLIP, CLIP BPE, ~7.8 M parameters) contrastively on "
                    "the train splits of MedMNIST datasets paired with caption paraphrases, and save it in "
                    "open_clip's hub format. Test splits are never read.",
    )
    p.add_argument("--datasets", default="pneumoniamnist,breastmnist",
                   help="comma-separated MedMNIST flags or data paths (default: pneumoniamnist,breastmnist)")
    p.add_argument("--out", help="model folder (default: <cache>/models/micro-medmnist[-<datasets>])")
    p.add_argument("--steps", type=int, help="pretraining steps (default 400)")
    p.add_argument("--logit-scale", default=None,
                   help="fixed logit scale (default 100) or 'learned'")
    p.add_argument("--seed", type=int, help="pretraining seed (default 0)")
    p.add_argument("--retrain", action="store_true", help="pretrain again even if the folder holds a model")
    p.add_argument("--no-download", action="store_true", help="never download MedMNIST files")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser(
        "demo",
        help="the whole method on real MedMNIST images with the micro Med-VLM: table, report, summary.json",
        description="Find the data, pretrain the micro Med-VLM if missing, then run zero-shot, CoOp-CE, CoOp-LS, "
                    "CalibPrompt and their temperature-scaled variants over several seeds; print a table and write "
                    "a Markdown report with reliability diagrams, summary.json and per-seed paired differences.",
    )
    p.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    p.add_argument("--dataset", help="MedMNIST flag (default pneumoniamnist), or a data YAML / folder / .npz path")
    p.add_argument("--seeds", help="number of seeds (e.g. 5 -> seeds 1..5) or a list such as 1,2,3 (default 5)")
    p.add_argument("--config", help="demo config YAML (default: the packaged configs/demo.yaml)")
    p.add_argument("--model", help="model folder: a micro model (pretrained there if missing) or any open_clip "
                                   "hub-format folder, used as it is")
    p.add_argument("--pretrain-steps", type=int, help="micro pretraining steps when it has to be pretrained")
    p.add_argument("--retrain", action="store_true", help="pretrain the micro model again")
    p.add_argument("--eval-on", choices=("test", "val"),
                   help="evaluate on the test split (default) or on the val images that are not validation shots "
                        "(for investigations and tuning that must not look at the test split)")
    p.add_argument("--robustness", action="store_true",
                   help="instead of the table: CoOp-CE, CalibPrompt, PromptSmooth and PromptSmooth + AS under Gaussian "
                        "noise (sigma 0.25), certified by randomized smoothing; writes robustness.json and a figure")
    p.add_argument("--sigma", type=float, default=0.25, help="noise level of --robustness (default 0.25)")
    p.add_argument("--ablation", choices=("shots", "ctx"),
                   help="instead of the table: the paper's study of shots (1-16) or context tokens (4-24) for CoOp-CE "
                        "and CalibPrompt (3 seeds unless --seeds); writes ablation.json and a figure")
    p.set_defaults(func=_demo)


def _scale(value):
    if value is None:
        return {}
    if str(value).lower() in ("learned", "learn", "none", "null"):
        return {"logit_scale": None}
    return {"logit_scale": float(value)}


def _pretrain(args) -> int:
    from calibprompt.demo import resolve_dataset
    from calibprompt.pretrain import PretrainSettings, ensure_model, medmnist_data_cfg, read_meta

    cfgs = []
    for spec in [s.strip() for s in args.datasets.split(",") if s.strip()]:
        if args.no_download and "/" not in spec and not spec.endswith(".npz"):
            cfgs.append(medmnist_data_cfg(spec.lower(), download=False))
        else:
            cfgs.append(resolve_dataset(spec, args.quiet)[0])
    overrides = _scale(args.logit_scale)
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.seed is not None:
        overrides["seed"] = args.seed
    folder, meta, trained = ensure_model(cfgs, args.out, PretrainSettings(**overrides), progress=not args.quiet,
                                         retrain=args.retrain, log=None if not args.quiet else (lambda m: None))
    final = (read_meta(folder) or meta)["history"][-1]
    lines = [] if trained else [f"{folder} already holds a micro model pretrained on "
                                f"{[s['name'] for s in meta['sources']]}; pass --retrain to pretrain it again"]
    lines += [f"model {folder}: zero-shot accuracy on the val splits {final['val_zero_shot_accuracy']}, "
              f"logit scale {final['logit_scale']:.4g}", f"use it with:  backbone: {{path: {folder}}}"]
    emit(args, {"model": str(folder), "trained_now": trained, "val_zero_shot_accuracy": final["val_zero_shot_accuracy"],
                "logit_scale": final["logit_scale"]}, "\n".join(lines))
    return 0


def _demo(args) -> int:
    from calibprompt.demo import run_demo

    if args.robustness:
        from calibprompt.demo.robustness import run_robustness

        done = run_robustness(args.out, dataset=args.dataset, seeds=args.seeds, config=args.config, model=args.model,
                              quiet=args.quiet, sigma=args.sigma)
        emit(args, {k: done[k] for k in ("rows", "paired", "settings", "figure")}, done["text"])
        return 0
    if args.ablation:
        from calibprompt.demo.ablation import run_ablation

        done = run_ablation(args.out, args.ablation, dataset=args.dataset, seeds=args.seeds, config=args.config,
                            model=args.model, quiet=args.quiet)
        emit(args, {k: done[k] for k in ("axis", "rows", "claims", "figure")}, done["text"])
        return 0
    overrides = {"steps": args.pretrain_steps} if args.pretrain_steps else None
    done = run_demo(args.out, dataset=args.dataset, seeds=args.seeds, config=args.config, model=args.model,
                    quiet=args.quiet, retrain=args.retrain, pretrain_overrides=overrides, eval_on=args.eval_on)
    emit(args, {"rows": done["rows"], "paired": done["paired"], "out": str(args.out)}, done["text"])
    return 0
