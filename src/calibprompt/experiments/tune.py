"""``calibprompt tune``: choose alpha and lambda_AS (optionally lr and n_ctx) per (backbone, dataset) with
Optuna, scoring every trial on the validation shots only (never the test split; see ``validation``).

Objectives (all minimised; each trial's value is the mean over the tuning seeds):

* ``val_nll`` (default): validation negative log-likelihood, a proper scoring rule that rewards both
  accuracy and calibration;
* ``val_ece``: validation ECE (standard convention, ``eval.n_bins`` bins);
* ``val_brier``: validation Brier score;
* ``val_ece_floor``: validation ECE, subject to validation accuracy >= (CoOp-CE's validation accuracy
  with the same seeds) - ``acc_floor``. A violating trial scores ``1 + ECE + shortfall``, so any trial
  that keeps the accuracy beats every one that does not.

Trial 0 of every study is the method's default parameters, so "before" is the untuned preset.
Studies live in Optuna storage (SQLite ``DIR/tune.sqlite`` by default, or any RDB URL so that many
``calibprompt tune`` processes on many machines share the trials). Each study's name carries a hash of
the cell's fixed settings, so changing them starts a new study instead of mixing trials.
Output: ``DIR/tuned.yaml`` (the grid's ``hparams:`` input) and ``DIR/trials.csv``.
"""

from __future__ import annotations

import copy
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from calibprompt.config import config_hash, merge, resolve
from calibprompt.experiments.executors import make_executor
from calibprompt.experiments.grid import Grid, GridError, _nested, method_params
from calibprompt.experiments.tune_summary import summary, trials_csv
from calibprompt.experiments.sweep import feature_cache_root, folder_lock
from calibprompt.experiments.tasks import evaluate_trial
from calibprompt.engine.validation import check_tunable
from calibprompt.settings import atomic_write_text

OBJECTIVES = {
    "val_nll": "mean validation NLL",
    "val_ece": "mean validation ECE",
    "val_brier": "mean validation Brier score",
    "val_ece_floor": "mean validation ECE, with validation accuracy >= CoOp-CE's - acc_floor",
}
#: name -> (config key, kind, low, high) for float ranges; (key, "cat", choices) for categorical
SPACE: dict[str, tuple] = {
    "alpha": ("method.alpha", "log", 0.005, 0.3),
    "lambda_as": ("method.lambda_as", "log", 1e-3, 10.0),
    "lr": ("train.lr", "log", 5e-4, 1e-2),
    "n_ctx": ("prompt.n_ctx", "cat", [4, 8, 16]),
}
DEFAULT_PARAMS = ("alpha", "lambda_as")
REFERENCE_METHOD = "coop-ce"


@dataclass
class CellStudy:
    backbone: str
    dataset: str
    study: Any
    configs: list[dict]  # one per seed, without the tuned parameters
    reference: float | None = None  # CoOp-CE validation accuracy (val_ece_floor)
    failures: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.backbone} · {self.dataset}"


def objective_value(objective: str, metrics: list[dict], reference: float | None = None,
                    acc_floor: float = 0.01) -> float:
    """The objective of one trial from its per-seed validation metrics (see module docstring)."""
    def avg(key: str) -> float:
        return sum(float(m[key]) for m in metrics) / len(metrics)

    if objective == "val_nll":
        return avg("nll")
    if objective == "val_ece":
        return avg("ece")
    if objective == "val_brier":
        return avg("brier")
    if objective == "val_ece_floor":
        if reference is None:
            raise ValueError("val_ece_floor needs the CoOp-CE reference accuracy")
        shortfall = (reference - acc_floor) - avg("accuracy")
        return avg("ece") + (1.0 + shortfall if shortfall > 0 else 0.0)
    raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")


def parse_ranges(items: list[str] | None) -> dict[str, tuple]:
    """``alpha=0.01:0.3`` (log-uniform) or ``n_ctx=4,8,16`` (categorical) -> space overrides."""
    out = {}
    for item in items or []:
        name, _, spec = item.partition("=")
        if name not in SPACE or not spec:
            raise ValueError(f"--range {item!r}: expected NAME=LOW:HIGH or NAME=A,B,C with NAME in {list(SPACE)}")
        key = SPACE[name][0]
        if ":" in spec:
            lo, hi = (float(x) for x in spec.split(":", 1))
            if not 0 < lo < hi:
                raise ValueError(f"--range {item!r}: need 0 < LOW < HIGH (log-uniform)")
            out[name] = (key, "log", lo, hi)
        else:
            values = [yaml.safe_load(x) for x in spec.split(",")]
            out[name] = (key, "cat", values)
    return out


def _suggest(trial, name: str, space: tuple):
    if space[1] == "cat":
        return trial.suggest_categorical(name, space[2])
    return trial.suggest_float(name, space[2], space[3], log=True)


def _apply(cfg: dict, params: dict, space: dict[str, tuple]) -> dict:
    cfg = copy.deepcopy(cfg)
    for name, value in params.items():
        merge(cfg, _nested(space[name][0], value), source=f"tuned {name}")
    return cfg


def _in_space(value: Any, space: tuple) -> bool:
    if space[1] == "cat":
        return value in space[2]
    return isinstance(value, (int, float)) and space[2] <= float(value) <= space[3]


def run_tune(grid: Grid, out_dir: str | Path, *, method: str = "calibprompt", objective: str = "val_nll",
             trials: int = 20, params: tuple[str, ...] = DEFAULT_PARAMS, ranges: dict[str, tuple] | None = None,
             storage: str | None = None, seeds: list[int] | None = None, shots: int | None = None,
             val_shots: int | None = None, acc_floor: float = 0.01, sampler_seed: int = 0,
             executor: str = "local", ray_address: str | None = None, cpus_per_run: float = 1.0,
             gpus_per_run: float = 0.0, max_in_flight: int | None = None, cache_dir: str | None = None, jobs: int = 1,
             default_trial: bool = True, log: Callable[[str], None] | None = print) -> dict:
    """Tune ``method`` on every (backbone, dataset) of ``grid``; returns the tuned.yaml content."""
    import optuna

    log = log or (lambda _msg: None)
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if trials < 1:
        raise ValueError("--trials must be >= 1")
    space = {**SPACE, **(ranges or {})}
    unknown = [p for p in params if p not in space]
    if unknown:
        raise ValueError(f"unknown tuning parameter(s) {unknown}; choose from {list(SPACE)}")
    section, label = _method_section(grid, method)
    accepted = method_params(section["name"])
    for p in params:
        key = space[p][0]
        if key.startswith("method.") and key.split(".", 1)[1] not in accepted:
            raise ValueError(f"method {section['name']!r} has no parameter {p!r} (it takes {sorted(accepted - {'n_ctx_axis'}) or 'none'})")
    seeds = list(seeds or grid.seeds)
    if shots is None:
        if grid.shots and len(grid.shots) > 1:
            raise ValueError(f"the grid has several shots {grid.shots}; choose one with --shots")
        shots = grid.shots[0] if grid.shots else None
    out_dir = Path(out_dir).absolute()
    storage = storage or f"sqlite:///{out_dir / 'tune.sqlite'}"
    cache_root = feature_cache_root(grid, cache_dir)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()

    with folder_lock(out_dir, ".tune.lock"):
        cells: list[CellStudy] = []
        for backbone, dataset in grid.combos():
            configs = []
            for seed in seeds:
                cfg = grid.cell_config(backbone, dataset, section, shots, seed, label, apply_hparams=False)
                if val_shots is not None:
                    cfg["val_shots"] = int(val_shots)
                try:
                    check_tunable(resolve(cfg))
                except (GridError, ValueError) as err:
                    raise ValueError(f"tune {label or section['name']} · {backbone} · {dataset}: {err}") from None
                configs.append(cfg)
            fixed = config_hash({"configs": [resolve(c) for c in configs], "objective": objective,
                                 "params": sorted(params), "space": {p: space[p] for p in params},
                                 "acc_floor": acc_floor if objective == "val_ece_floor" else None})
            name = f"{grid.name}:{backbone}:{dataset}:{section['name']}:{objective}:{fixed[:10]}"
            study = optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True)
            # a resumed study must not replay the points drawn before: offset the seed by its trial count
            study.sampler = optuna.samplers.TPESampler(seed=sampler_seed + len(study.trials))
            _fail_own_stale(study)
            if default_trial and not study.trials:
                defaults = _defaults(section, params, space)
                if defaults:
                    study.enqueue_trial(defaults)
            cells.append(CellStudy(backbone, dataset, study, configs,
                                   reference=study.user_attrs.get("reference_accuracy")))
        ex = make_executor(executor, ray_address=ray_address, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run,
                           max_in_flight=max_in_flight, jobs=jobs)
        try:
            if objective == "val_ece_floor":
                _references(cells, ex, cache_root, log)
            _optimise(cells, ex, trials, params, space, objective, acc_floor, cache_root, log)
        finally:
            ex.close()
        tuned = summary(grid, cells, section, objective, OBJECTIVES[objective], storage, seeds, shots, params, space,
                        acc_floor)
        atomic_write_text(out_dir / "tuned.yaml", yaml.safe_dump(tuned, sort_keys=False))
        atomic_write_text(out_dir / "trials.csv", trials_csv(cells, params))
    log(f"tune: {len(cells)} studies, {trials} trials each, in {time.perf_counter() - start:.1f} s -> "
        f"{out_dir / 'tuned.yaml'}")
    return tuned


def _method_section(grid: Grid, method: str) -> tuple[dict, str | None]:
    """``method`` as a grid method label (its section and cells apply) or a preset name."""
    if method in grid.methods:
        return copy.deepcopy(grid.methods[method]), method
    for label, section in grid.methods.items():
        if section["name"] == method and len(section) == 1:
            return {"name": method}, label
    return {"name": method}, None


def _defaults(section: dict, params: tuple[str, ...], space: dict[str, tuple]) -> dict:
    from calibprompt.config import DEFAULTS
    from calibprompt.methods import resolve_method

    preset = resolve_method(section["name"], **{k: v for k, v in section.items() if k != "name"}).params
    out = {}
    for p in params:
        key = space[p][0]
        section_name, _, leaf = key.partition(".")
        value = preset.get(leaf) if section_name == "method" else DEFAULTS[section_name][leaf]
        if value is None or not _in_space(value, space[p]):
            return {}  # the default lies outside the searched range: let the sampler start
        out[p] = value
    return out


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _fail_own_stale(study) -> None:
    """Trials left RUNNING by a dead tune process of this host are marked FAIL (others are left alone:
    with a shared database they may belong to live workers)."""
    import optuna

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner = str(t.user_attrs.get("owner", ""))
        name, _, pid = owner.rpartition(":")
        if name == host and pid.isdigit() and not _alive(int(pid)):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _references(cells: list[CellStudy], ex, cache_root: str, log) -> None:
    """CoOp-CE validation accuracy per cell (same seeds and settings), computed once per study."""
    todo = [c for c in cells if c.reference is None]
    for cell in todo:
        configs = []
        for cfg in cell.configs:
            ref = copy.deepcopy(cfg)
            ref["method"] = {"name": REFERENCE_METHOD}
            configs.append(ref)
        ex.submit(evaluate_trial, {"configs": configs, "cache_root": cache_root, **ex.task_options()}, tag=cell)
    while ex.pending():
        cell, outcome = ex.next_result()
        if not outcome.ok:
            raise RuntimeError(f"tune {cell.label}: the CoOp-CE reference failed: {outcome.error}")
        acc = [s["metrics"]["accuracy"] for s in outcome.value["per_seed"]]
        cell.reference = sum(acc) / len(acc)
        cell.study.set_user_attr("reference_accuracy", cell.reference)
        log(f"tune {cell.label}: CoOp-CE validation accuracy {cell.reference * 100:.2f}%")


def _optimise(cells: list[CellStudy], ex, trials: int, params, space, objective, acc_floor, cache_root, log) -> None:
    import optuna

    counting = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)

    def wants(cell: CellStudy) -> bool:
        if cell.failures >= max(3, trials):
            return False
        return len(cell.study.get_trials(deepcopy=False, states=counting)) < trials

    while True:
        submitted = True
        while submitted and ex.pending() < ex.parallelism:
            submitted = False
            for cell in cells:
                if ex.pending() >= ex.parallelism or not wants(cell):
                    continue
                trial = cell.study.ask()
                trial.set_user_attr("owner", _owner())
                values = {p: _suggest(trial, p, space[p]) for p in params}
                configs = [_apply(cfg, values, space) for cfg in cell.configs]
                ex.submit(evaluate_trial, {"configs": configs, "cache_root": cache_root, **ex.task_options()},
                          tag=(cell, trial, values))
                submitted = True
        if not ex.pending():
            break
        (cell, trial, values), outcome = ex.next_result()
        shown = ", ".join(f"{k}={_short(v)}" for k, v in values.items())
        if not outcome.ok:
            cell.failures += 1
            first = (outcome.error or "").strip().splitlines()[0] if outcome.error else "error"
            cell.errors.append(first)
            trial.set_user_attr("error", first)
            cell.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            log(f"tune {cell.label} trial {trial.number} ({shown}) FAILED: {first}")
            continue
        per_seed = outcome.value["per_seed"]
        metrics = [s["metrics"] for s in per_seed]
        value = objective_value(objective, metrics, cell.reference, acc_floor)
        trial.set_user_attr("seed_values", [objective_value(objective, [m], cell.reference, acc_floor)
                                            for m in metrics])
        for key in ("accuracy", "ece", "nll", "brier"):
            trial.set_user_attr(f"val_{key}", sum(m[key] for m in metrics) / len(metrics))
        trial.set_user_attr("n_val", per_seed[0]["n_val"])
        cell.study.tell(trial, value)
        log(f"tune {cell.label} trial {trial.number} ({shown}): {objective} {value:.4f} "
            f"(val acc {trial.user_attrs['val_accuracy'] * 100:.1f}%, ECE {trial.user_attrs['val_ece'] * 100:.2f}%)")
    for cell in cells:
        if not [t for t in cell.study.trials if t.state == optuna.trial.TrialState.COMPLETE]:
            raise RuntimeError(f"tune {cell.label}: no trial finished; last error: "
                               f"{cell.errors[-1] if cell.errors else 'none recorded'}")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
