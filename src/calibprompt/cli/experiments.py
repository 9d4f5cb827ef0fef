"""``calibprompt sweep``, ``calibprompt report`` and ``calibprompt tune`` (docs/experiments.md)."""

from __future__ import annotations


from calibprompt.cli.output import emit


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of integers, got {text!r}") from None


def _only(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        axis, _, labels = item.partition("=")
        if not labels:
            raise ValueError(f"--only {item!r}: expected AXIS=LABEL[,LABEL] with AXIS backbone, dataset or method")
        out.setdefault(axis.strip(), []).extend(x.strip() for x in labels.split(",") if x.strip())
    return out


def _grid_args(p, what: str) -> None:
    from calibprompt.experiments.grid import list_presets

    p.add_argument("grid", help=f"grid spec (YAML) or a preset name ({', '.join(list_presets()) or 'none'})")
    p.add_argument("--out", required=True, help=f"{what} folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the grid's base run config for every run, e.g. --set data.path=/data "
                        "(repeatable)")
    p.add_argument("--seeds", type=_int_list, help="comma-separated seeds, replacing the grid's")
    p.add_argument("--only", action="append", default=[], metavar="AXIS=LABELS",
                   help="restrict an axis, e.g. --only backbone=plip --only dataset=kather,pannuke")
    p.add_argument("--executor", choices=("local", "process", "ray"), default="local",
                   help="local: in this process (default); process: --jobs worker processes on this machine; "
                        "ray: Ray tasks on a local instance or --ray-address")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run N cells at once in worker processes on this machine (local executor; each gets "
                        "cores/N threads; one feature encoding per image still holds)")
    p.add_argument("--ray-address", help="Ray cluster to join (e.g. auto, HOST:6379 or ray://HOST:10001)")
    p.add_argument("--cpus-per-run", type=float, default=1.0, help="Ray CPUs per task (default 1)")
    p.add_argument("--gpus-per-run", type=float, default=0.0,
                   help="Ray GPUs per task, fractions pack several runs on one GPU (e.g. 0.25)")
    p.add_argument("--max-in-flight", type=int, help="Ray: most tasks submitted at once (default: cluster capacity)")
    p.add_argument("--cache-dir", help="feature cache root shared by every worker (default: the grid's cache_dir, "
                                       "else $CALIBPROMPT_CACHE/features)")


def register(sub) -> None:
    p = sub.add_parser("sweep", help="run a grid of runs (resumable), results into a store")
    _grid_args(p, "sweep")
    from calibprompt.cli.run import _tracking_flags

    _tracking_flags(p)
    p.add_argument("--shots", type=_int_list, help="comma-separated shots, replacing the grid's")
    p.add_argument("--n-ctx", type=_int_list, help="comma-separated prompt context lengths (an axis for the "
                                                   "prompt-learning methods), replacing the grid's")
    p.add_argument("--store", help="SQLAlchemy URL of the results store (default: sqlite DIR/results.sqlite, "
                                   "or $CALIBPROMPT_STORE)")
    p.add_argument("--no-retry-failed", action="store_true", help="leave runs that failed before as failed")
    p.add_argument("--dry-run", action="store_true", help="print the planned runs and exit")
    p.add_argument("--no-batch", action="store_true",
                   help="train every run alone (default: prompt-learning runs of one backbone, data and prompt "
                        "layout train together, up to 16 per text-encoder pass; results equal within 1e-4)")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("report", help="paper-style tables (md, tex, csv) and an HTML report of a sweep")
    p.add_argument("dir", help="sweep folder (holds sweep.json)")
    p.add_argument("--format", choices=("md", "tex", "csv"),
                   help="print this table format to stdout instead of writing DIR/report/")
    p.add_argument("--metrics", default="accuracy,ece,mce,ace",
                   help="comma-separated metric columns (default accuracy,ece,mce,ace; also nll, brier, "
                        "macro_f1, classwise_ece, smece)")
    p.add_argument("--convention", choices=("standard", "reference"), default="standard",
                   help="metric convention: standard (default) or the official code's (reference)")
    p.add_argument("--store", help="results store URL, when the sweep used one with a password")
    p.add_argument("--out", help="report folder (default DIR/report)")
    p.add_argument("--self-contained", action="store_true",
                   help="embed the figures in report.html, so the one file can be sent on its own")
    p.add_argument("--no-diagrams", action="store_true", help="skip the pooled reliability diagrams")
    p.set_defaults(func=_report)

    p = sub.add_parser("tune", help="tune alpha / lambda_AS (lr, n_ctx) per backbone and dataset on validation "
                                    "shots with Optuna")
    _grid_args(p, "tuning")
    p.add_argument("--method", default="calibprompt", help="method preset or grid method label (default calibprompt)")
    p.add_argument("--objective", default="val_nll",
                   choices=("val_nll", "val_ece", "val_brier", "val_ece_floor"),
                   help="val_nll (default); val_ece; val_brier; val_ece_floor: ECE with validation accuracy "
                        ">= CoOp-CE's - --acc-floor")
    p.add_argument("--acc-floor", type=float, default=0.01, help="accuracy margin of val_ece_floor (fraction)")
    p.add_argument("--trials", type=int, default=20, help="trials per (backbone, dataset) study (default 20)")
    p.add_argument("--params", default="alpha,lambda_as",
                   help="comma-separated parameters to tune: alpha, lambda_as, lr, n_ctx (default alpha,lambda_as)")
    p.add_argument("--range", dest="ranges", action="append", default=[], metavar="NAME=LO:HI|A,B",
                   help="search range, log-uniform LO:HI or a list of choices (e.g. --range alpha=0.01:0.3)")
    p.add_argument("--shots", type=int, help="shots to tune at (default: the grid's single shots value)")
    p.add_argument("--val-shots", type=int, help="validation shots per class (default: the grid's base val_shots)")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite DIR/tune.sqlite); share an RDB URL "
                                     "to run many tune processes on one set of studies")
    p.add_argument("--sampler-seed", type=int, default=0, help="TPE sampler seed (default 0), offset by the study's trial count when it resumes; "
                        "give each process that shares a study its own seed")
    p.add_argument("--no-default-trial", action="store_true",
                   help="do not start each study with the method's default parameters")
    p.set_defaults(func=_tune)


def _load_grid(args):
    from calibprompt.experiments.grid import Grid

    grid = Grid.load(args.grid)
    shots = args.shots if args.command == "sweep" else None  # tune takes a single --shots value itself
    n_ctx = args.n_ctx if args.command == "sweep" else None
    from calibprompt.cli.run import tracking_overrides

    return grid.override(list(args.overrides) + tracking_overrides(args), seeds=args.seeds, shots=shots, only=_only(args.only), n_ctx=n_ctx)


def _sweep(args) -> int:
    from calibprompt.experiments.sweep import BATCH_RUNS, run_sweep

    grid = _load_grid(args)
    if args.dry_run:
        specs = grid.expand()
        emit(args, {"runs": [{"run_id": s.run_id, "title": s.title} for s in specs], "duplicates": grid.duplicates},
             "\n".join([f"{spec.run_id}  {spec.title}" for spec in specs] + [
                 f"{len(specs)} runs" + (f" ({grid.duplicates} duplicate configs dropped)" if grid.duplicates else "")]))
        return 0
    summary = run_sweep(grid, args.out, store_url=args.store, executor=args.executor, ray_address=args.ray_address,
                        cpus_per_run=args.cpus_per_run, gpus_per_run=args.gpus_per_run,
                        max_in_flight=args.max_in_flight, cache_dir=args.cache_dir, jobs=args.jobs,
                        retry_failed=not args.no_retry_failed, log=_status, batch=1 if args.no_batch else BATCH_RUNS)
    done = summary.to_dict()
    emit(args, done, "sweep " + ", ".join(f"{k} {v}" for k, v in done.items() if isinstance(v, (int, float, str)))
         + f"\nreport: calibprompt report {args.out}")
    return 1 if summary.failed else 0


def _report(args) -> int:
    from calibprompt.reporting.collect import collect
    from calibprompt.reporting.html import write_report
    from calibprompt.reporting.tables import render

    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    if args.format:
        text = render(collect(args.dir, args.store, args.convention), args.format, metrics)
        emit(args, {"format": args.format, "text": text}, text)  # --json: the table inside a JSON document
        return 0
    paths = write_report(args.dir, store_url=args.store, metrics=metrics, convention=args.convention,
                         report_dir=args.out, diagrams=not args.no_diagrams, self_contained=args.self_contained)
    emit(args, paths, "\n".join(f"{kind:5s} {path}" for kind, path in paths.items()))
    return 0


def _tune(args) -> int:
    from calibprompt.experiments.tune import parse_ranges, run_tune

    grid = _load_grid(args)
    params = tuple(p.strip() for p in args.params.split(",") if p.strip())
    tuned = run_tune(grid, args.out, method=args.method, objective=args.objective, trials=args.trials, params=params,
                     ranges=parse_ranges(args.ranges), storage=args.storage, seeds=args.seeds, shots=args.shots,
                     val_shots=args.val_shots, acc_floor=args.acc_floor, sampler_seed=args.sampler_seed,
                     executor=args.executor, ray_address=args.ray_address, cpus_per_run=args.cpus_per_run,
                     gpus_per_run=args.gpus_per_run, max_in_flight=args.max_in_flight, cache_dir=args.cache_dir,
                     jobs=args.jobs,
                     default_trial=not args.no_default_trial, log=_status)
    lines = []
    for cell in tuned["cells"]:
        values = ", ".join(f"{k}={v}" for k, v in cell["set"].items())
        lines.append(f"{cell['backbone']} · {cell['dataset']}: {values}  ({tuned['objective']} "
                     f"{cell['first_value']:.4f} -> {cell['value']:.4f}, {cell['trials']} trials)")
        lines.append(f"  {cell['reading']}")
    lines.append(f"use it in a grid with  hparams: {args.out}/tuned.yaml")
    emit(args, tuned, "\n".join(lines))
    return 0


def _status(message: str) -> None:
    """Sweep and tuning status lines: INFO records of the calibprompt logger (stderr at -v / default, the
    folder's log.txt always; -q silences them on stderr)."""
    from calibprompt.progress import log

    log.info(message)
