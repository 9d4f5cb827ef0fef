#!/usr/bin/env python
"""Feature store benchmark (issue 18): write and read N synthetic 512-d features through the sharded store.

For each size N the store is written in the cache's flush units (2,048 rows per segment, as a long encoding
run appends them) by one fresh process, then read back, every key, by another fresh process with the
operating system's page cache warm (what a second run on the same machine sees). Printed per size:
write and read seconds, files in the store folder, peak resident memory of each process (and its growth
over the process before the phase, which already holds torch, the keys and the reference rows), and
whether every row came back bit for bit. ``--legacy`` also times the per-image layout of earlier versions (one
file per feature) at the smallest size, for comparison.

    python benchmarks/bench_cache.py --quick --json bench_cache.json    # 10k and 100k features
    python benchmarks/bench_cache.py --sizes 10000 100000 1000000       # any sizes
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "be" * 32
FLUSH = 2048


def _keys(n: int) -> list[str]:
    return [hashlib.sha256(b"image %d" % i).hexdigest() for i in range(n)]


def _rows(n: int, dim: int):
    import torch

    return torch.randn(n, dim, generator=torch.Generator().manual_seed(n))


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def one(phase: str, folder: str, n: int, dim: int) -> dict:
    """One phase in this (fresh) process; the caller runs each phase in its own process."""
    import torch

    from calibprompt.features.store import FeatureStore

    keys, rows = _keys(n), _rows(n, dim)
    before = _peak_mb()
    start = time.perf_counter()
    if phase == "write":
        store = FeatureStore(folder, WEIGHTS, dim)
        for i in range(0, n, FLUSH):
            store.put(keys[i : i + FLUSH], rows[i : i + FLUSH])
        out = {"files_written": store.files_written}
    elif phase == "read":
        got, missing = FeatureStore(folder, WEIGHTS, dim).get(keys)
        out = {"missing": len(missing), "identical": bool(torch.equal(got, rows))}
    elif phase == "legacy-write":
        from calibprompt.features.legacy import digest
        from safetensors.torch import save_file

        for key, row in zip(keys, rows):
            path = Path(folder) / key[:2] / f"{key}.safetensors"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"feature": row.clone()}, str(path), metadata={"key": key, "sha256": digest(row)})
        out = {}
    else:  # legacy-read
        from safetensors.torch import load_file

        got = torch.stack([load_file(str(Path(folder) / k[:2] / f"{k}.safetensors"))["feature"] for k in keys])
        out = {"missing": 0, "identical": bool(torch.equal(got, rows))}
    out.update(seconds=time.perf_counter() - start, peak_rss_mb=_peak_mb(), rss_before_mb=before)
    return out


def _phase(phase: str, folder: Path, n: int, dim: int) -> dict:
    cmd = [sys.executable, __file__, "--one", phase, str(folder), str(n), str(dim)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    if done.returncode:
        raise SystemExit(f"bench_cache: {phase} of {n} rows failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench(n: int, dim: int, work: Path, legacy: bool) -> dict:
    folder = work / f"store-{n}"
    write, read = _phase("write", folder, n, dim), _phase("read", folder, n, dim)
    files = [p for p in folder.iterdir() if p.is_file()]
    row = {"rows": n, "dim": dim, "write_s": write["seconds"], "read_s": read["seconds"],
           "files": len(files), "bytes": sum(p.stat().st_size for p in files),
           "segments_written": write["files_written"], "peak_rss_write_mb": write["peak_rss_mb"],
           "peak_rss_read_mb": read["peak_rss_mb"], "rss_before_write_mb": write["rss_before_mb"],
           "rss_before_read_mb": read["rss_before_mb"], "missing": read["missing"], "identical": read["identical"]}
    if legacy:
        old = work / f"legacy-{n}"
        lw, lr = _phase("legacy-write", old, n, dim), _phase("legacy-read", old, n, dim)
        row.update(legacy_write_s=lw["seconds"], legacy_read_s=lr["seconds"],
                   legacy_files=sum(1 for p in old.rglob("*.safetensors")), legacy_identical=lr["identical"])
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="10,000 and 100,000 features, per-image layout at 10,000")
    p.add_argument("--sizes", type=int, nargs="+", help="numbers of features (default 10000 100000 1000000)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--legacy", action="store_true", help="also time the per-image layout at the smallest size")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        phase, folder, n, dim = args.one
        print(json.dumps(one(phase, folder, int(n), int(dim))))
        return 0
    sizes = args.sizes or ([10_000, 100_000] if args.quick else [10_000, 100_000, 1_000_000])
    legacy = args.legacy or args.quick
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        for n in sorted(sizes):
            r = bench(n, args.dim, Path(tmp), legacy and n == min(sizes))
            rows.append(r)
            line = (f"{n:>9,} x {args.dim}-d: write {r['write_s']:.2f} s, warm read {r['read_s']:.2f} s, "
                    f"{r['files']} files ({r['bytes'] / 2**20:.0f} MiB; {r['segments_written']} segments written), "
                    f"peak RSS write {r['peak_rss_write_mb']:.0f} MB (+{r['peak_rss_write_mb'] - r['rss_before_write_mb']:.0f}) "
                    f"/ read {r['peak_rss_read_mb']:.0f} MB (+{r['peak_rss_read_mb'] - r['rss_before_read_mb']:.0f}), "
                    f"identical {r['identical']}")
            if "legacy_files" in r:
                line += (f"; per-image layout: write {r['legacy_write_s']:.2f} s, read {r['legacy_read_s']:.2f} s, "
                         f"{r['legacy_files']} files")
            print(line, flush=True)
    result = {"rows": rows, "warm_read_100k_s": next((r["read_s"] for r in rows if r["rows"] == 100_000), None)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(r["identical"] and not r["missing"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
