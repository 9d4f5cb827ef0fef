"""``calibprompt demo``: the whole method, end to end, on real medical images, with one command
(docs/demo.md). ``pipeline`` runs it, ``config`` reads its config and writes its splits, ``report``
writes its tables, figures and report."""

from calibprompt.demo.config import load_demo_config, parse_seeds, resolve_dataset, write_splits
from calibprompt.demo.pipeline import run_demo
from calibprompt.reporting.stats import paired_differences, verdict

__all__ = ["load_demo_config", "paired_differences", "parse_seeds", "resolve_dataset", "run_demo", "verdict",
           "write_splits"]
