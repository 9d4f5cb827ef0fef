"""``calibprompt datasets`` and ``calibprompt data {prepare,inspect}``."""

from __future__ import annotations

from calibprompt.cli.output import emit_json

import argparse
import warnings
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    listing = subparsers.add_parser("datasets", help="list the paper's datasets",
                                    description="List the five paper datasets: classes, template, modality.")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(func=cmd_datasets)

    data = subparsers.add_parser(
        "data", help="prepare or inspect datasets",
        description="Prepare a paper dataset from its raw download, or inspect any dataset.")
    sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    prep = sub.add_parser("prepare", help="convert a raw public download into the paper layout",
                          description="Convert the raw public download of a paper dataset into "
                          "ROOT/<folder>/images/{train,test}/<class>/ with classnames.txt. "
                          "Downloads nothing.")
    prep.add_argument("name", help="paper dataset: COVID, RSNA18, Kather, PanNuke or DigestPath")
    prep.add_argument("--source", required=True, metavar="RAW_DIR", help="folder holding the raw download")
    prep.add_argument("--out", required=True, metavar="ROOT", help="data root to write <folder>/ into")
    prep.add_argument("--recipe", default="paper", choices=["paper", "grouped"],
                      help="paper: the official split; grouped: patient/slide-level (RSNA18, DigestPath)")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing prepared folder")
    prep.set_defaults(func=cmd_prepare)

    inspect = sub.add_parser("inspect", help="show classes, counts, skipped files and duplicates",
                             description="Open a dataset and report its classes, counts per split and "
                             "class, skipped and ignored files, and duplicated content.")
    inspect.add_argument("target", metavar="CONFIG_OR_PATH",
                         help="a YAML/JSON config with a data: section, a folder, a CSV/TSV "
                         "manifest or an .npz file")
    inspect.add_argument("--name", help="dataset name (MedMNIST flag, paper dataset)")
    inspect.add_argument("--test-fraction", type=float, help="held-out test fraction for unsplit sources")
    inspect.add_argument("--skip-bad", action="store_true", help="skip unreadable images instead of failing")
    inspect.add_argument("--json", action="store_true", help="print JSON")
    inspect.set_defaults(func=cmd_inspect)
    data.set_defaults(func=lambda args: _usage(data))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def cmd_datasets(args: argparse.Namespace) -> int:
    from calibprompt.data import PAPER_DATASETS

    rows = [spec.to_dict() for spec in PAPER_DATASETS.values()]
    if args.json:
        emit_json(rows)
        return 0
    for spec in PAPER_DATASETS.values():
        print(f"{spec.name} ({spec.modality}; {', '.join(spec.backbones)})")
        print(f"  folder:   {spec.folder}/   template: {spec.template!r}")
        for label, (folder, text) in enumerate(spec.classes):
            print(f"  {label} {folder:<28} {text}")
        print(f"  download: {spec.download}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from calibprompt.data import prepare

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = prepare(args.name, args.source, args.out, recipe=args.recipe, overwrite=args.overwrite)
    if args.json:
        from dataclasses import asdict, is_dataclass

        data = asdict(report) if is_dataclass(report) else dict(vars(report))
        emit_json({**data, "warnings": [str(w.message) for w in caught]})
        return 0
    print(f"{report.name}: wrote {report.path} ({report.recipe} recipe)")
    for split, per_class in report.counts.items():
        counts = ", ".join(f"{c} {n}" for c, n in per_class.items())
        print(f"  {split}: {sum(per_class.values())} images ({counts})")
    print(f"  test images with identical content in train: {report.duplicate_content}")
    if report.shared_groups is not None:
        print(f"  {report.group_kind}s with images in both train and test: {report.shared_groups}")
    for note in report.notes:
        print(f"  note: {note}")
    for warning in caught:
        print(f"warning: {warning.message}")
    return 0


def _load_target(args: argparse.Namespace) -> dict[str, Any]:
    from calibprompt.data import DataError, config_for_path

    target = Path(args.target)
    if target.is_file() and target.suffix.lower() in (".yaml", ".yml", ".json"):
        import yaml

        try:
            loaded = yaml.safe_load(target.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise DataError(f"cannot parse {target}: {err}") from err
        if not isinstance(loaded, dict):
            raise DataError(f"{target}: expected a mapping with a data: section")
        cfg = loaded.get("data", loaded if "source" in loaded else None)
        if not isinstance(cfg, dict):
            raise DataError(f"{target} has no data: section")
        cfg = dict(cfg)
    else:
        cfg = config_for_path(target)
    for key, value in (("name", args.name), ("test_fraction", args.test_fraction)):
        if value is not None:
            cfg[key] = value
    if args.skip_bad:
        cfg["skip_bad"] = True
    return cfg


def cmd_inspect(args: argparse.Namespace) -> int:
    from calibprompt.data import holdout_test, open_dataset

    cfg = _load_target(args)
    from calibprompt.data.classes import wordless_classnames

    dataset = open_dataset(cfg)
    counts = dataset.counts()
    if not dataset.has_split and dataset.test_fraction is not None:
        pool, test = holdout_test(dataset, dataset.test_fraction)
        counts = {part: [sum(1 for s in group if s.label == k) for k in range(dataset.num_classes)]
                  for part, group in (("train", pool), ("test", test))}
    report = {
        "name": dataset.name, "source": dataset.source, "location": dataset.location,
        "template": dataset.template, "classes": dataset.classnames,
        "counts": {split or "all": dict(zip(dataset.classnames, row)) for split, row in counts.items()},
        "total": len(dataset), "skipped": [{"ref": r, "reason": why} for r, why in dataset.skipped],
        "ignored": dataset.ignored, "duplicates": dataset.duplicates(),
        "test_fraction": dataset.test_fraction,
        "wordless_classnames": wordless_classnames(dataset.classnames),
    }
    if args.json:
        emit_json(report)
        return 0
    print(f"dataset:  {dataset.name} ({dataset.source}, {dataset.location})")
    print(f"template: {dataset.template!r}")
    print(f"classes ({dataset.num_classes}):")
    for label, text in enumerate(dataset.classnames):
        print(f"  {label} {text}")
    width = max(8, *(len(t) for t in dataset.classnames))
    print("  ".join([f"{'split':<6}"] + [f"{t:>{width}}" for t in dataset.classnames] + [f"{'total':>6}"]))
    for split, row in report["counts"].items():
        values = list(row.values())
        print("  ".join([f"{split:<6}"] + [f"{n:>{width}}" for n in values] + [f"{sum(values):>6}"]))
    if dataset.test_fraction is not None:
        print(f"(no split in the source: test = {dataset.test_fraction:g} of each class, by content hash)")
    if report["wordless_classnames"]:
        print(f"warning: class names without words {report['wordless_classnames']}: prompts built from them say "
              "nothing to the text tower; give names with data.classnames (or classnames.txt)")
    print(f"skipped (unreadable): {len(dataset.skipped)}")
    for ref, why in dataset.skipped[:20]:
        print(f"  {ref}: {why}")
    print(f"ignored (not images / outside class folders): {len(dataset.ignored)}")
    for ref in dataset.ignored[:20]:
        print(f"  {ref}")
    dup = report["duplicates"]
    print(f"duplicate content: {dup['within']} image(s) repeat an earlier image; "
          f"{dup['cross_split']} test image(s) also occur in train/val")
    return 0
