"""Decoding and preprocessing beside the image encoder.

The feature cache encodes images in fixed-size batches. Building a batch (read the file, decode, crop,
resize, normalise) is CPU work that, done in the encoder's own thread, leaves the encoder idle; here
it runs ahead of the encoder in ``workers`` worker processes (``kind="process"``, a
``torch.utils.data.DataLoader`` over whole batches) or threads (``kind="thread"``; PIL and torch release
the GIL in decoding, resizing and normalising). ``workers=0`` builds each batch in the calling thread.

Every batch is the same whatever the worker count: the items of a batch, their order, the zero rows
that pad it to ``batch_size`` and the augmentation draws (seeded per image and view by the caller)
do not depend on which worker built it. Batches come back in order, already in the encoder's dtype
(no cast in the encoder loop) and, for a CUDA encoder, in pinned memory for a non-blocking copy.

``workers="auto"`` builds the first batch in the calling thread, times it and its encoding, and lets
:func:`auto_workers` choose for the rest (measured: docs/performance.md)."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

KINDS = ("process", "thread")


@dataclass(frozen=True)
class Item:
    """One image of a batch: the dataset sample, whether it is a training view, the view's seed, and
    Gaussian pixel noise ``(sigma, seed)`` to add (None: a clean image)."""

    sample: object
    train: bool
    seed: int | None
    noise: tuple[float, int] | None = None


def add_pixel_noise(pixels: torch.Tensor, sigma: float, seed: int, mean, std) -> torch.Tensor:
    """``normalise(denormalise(x) + sigma * eps)``, eps ~ N(0, I) from a generator seeded with ``seed``: noise
    of standard deviation ``sigma`` on the [0, 1]-scaled image after resizing and cropping, not clamped
    (PromptSmooth's and Cohen et al.'s noise model; the certified radius is an l2 radius in that space)."""
    gen = torch.Generator().manual_seed(int(seed))
    eps = torch.randn(pixels.shape, generator=gen, dtype=torch.float32)
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return ((pixels.float() * s + m) + float(sigma) * eps - m) / s


def auto_workers(n_batches: int, device: torch.device | str = "cpu", build_s: float | None = None,
                 encode_s: float | None = None) -> int:
    """Workers for ``workers="auto"``, given the first batch's build (decode + preprocess) and encode times.

    None for fewer than 3 batches (starting workers costs more than it can hide). On CUDA one per core,
    at most 4: the CPU is otherwise idle while the GPU encodes. On a CPU the workers share the cores
    with the encoder, so they pay only where a batch takes long to encode (>= 0.25 s, which amortises
    handing batches between processes) and building it is a noticeable share of that (>= 5%); then one
    per spare core, at most 4. Measured on 2 cores (docs/performance.md): ViT-B/32 gains with one worker,
    the 28-pixel micro model (10 ms per batch) loses 15% with any."""
    if n_batches < 3:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if str(device).startswith("cuda"):
        return max(1, min(4, cores))
    if build_s is None or encode_s is None or encode_s < 0.25 or build_s < 0.05 * encode_s:
        return 0
    return max(1, min(4, cores - 1))


def check_workers(workers: int | str, kind: str = "process") -> None:
    """``workers`` is a count >= 0 or "auto"; ``kind`` is "process" or "thread"."""
    if workers != "auto" and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 0):
        raise ValueError(f"workers must be a whole number >= 0 or 'auto', got {workers!r}")
    if kind not in KINDS:
        raise ValueError(f"loader kind must be one of {KINDS}, got {kind!r}")


class BatchBuilder(torch.utils.data.Dataset):
    """Batch ``c`` of ``batches``: the preprocessed images stacked, zero-padded to ``batch_size`` rows
    and cast to ``dtype``. An image that cannot be read comes back as its exception (re-raised by the
    caller as is, not wrapped in a worker traceback)."""

    def __init__(self, dataset, preprocess, batches: Sequence[Sequence[Item]], batch_size: int,
                 dtype: torch.dtype = torch.float32):
        self.dataset, self.preprocess, self.batches = dataset, preprocess, list(batches)
        self.batch_size, self.dtype = int(batch_size), dtype

    def __len__(self) -> int:
        return len(self.batches)

    def tail(self, start: int) -> "BatchBuilder":
        """The same builder without its first ``start`` batches."""
        return BatchBuilder(self.dataset, self.preprocess, self.batches[start:], self.batch_size, self.dtype)

    def _row(self, it: Item) -> torch.Tensor:
        pixels = self.preprocess.apply(self.dataset.load(it.sample), it.train, it.seed)
        if it.noise is not None:
            pixels = add_pixel_noise(pixels, it.noise[0], it.noise[1], self.preprocess.mean, self.preprocess.std)
        return pixels

    def __getitem__(self, c: int):
        try:
            items = self.batches[c]
            rows = [self._row(it) for it in items]
            pixels = torch.stack(rows)
            if len(rows) < self.batch_size:
                pixels = torch.cat([pixels, pixels.new_zeros((self.batch_size - len(rows), *pixels.shape[1:]))])
            return pixels.to(self.dtype)
        except Exception as err:  # noqa: BLE001 - handed to the caller, who raises it
            return err


def pixel_batches(builder: BatchBuilder, workers: int = 0, kind: str = "process",
                  pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """The batches of ``builder`` in order, built by ``workers`` processes or threads ahead of use."""
    check_workers(workers, kind)
    n = len(builder)
    workers = min(int(workers), n)
    if workers == 0:
        stream: Iterator = (builder[c] for c in range(n))
    elif kind == "thread":
        stream = _threaded(builder, workers)
    else:
        stream = _processes(builder, workers, pin_memory)
    for batch in stream:
        if isinstance(batch, Exception):
            raise batch
        yield batch.pin_memory() if pin_memory and kind == "thread" and not batch.is_pinned() else batch


def auto_batches(builder: BatchBuilder, device: torch.device, kind: str = "process",
                 pin_memory: bool = False) -> Iterator[torch.Tensor]:
    """``pixel_batches`` with ``workers="auto"``: the first batch is built here and timed, and so is the
    caller's work on it (the time until it asks for the next batch: encoding and storing); then
    :func:`auto_workers` decides how the remaining batches are built."""
    if len(builder) < 3:
        yield from pixel_batches(builder, 0, kind, pin_memory)
        return
    start = time.perf_counter()
    first = builder[0]
    if isinstance(first, Exception):
        raise first
    built = time.perf_counter()
    if pin_memory:
        first = first.pin_memory()
    yield first
    encode_s = time.perf_counter() - built
    workers = auto_workers(len(builder) - 1, device, built - start, encode_s)
    yield from pixel_batches(builder.tail(1), workers, kind, pin_memory)


def _threaded(builder: BatchBuilder, workers: int) -> Iterator:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers, thread_name_prefix="calibprompt-loader") as pool:
        ahead: deque = deque()
        next_c = 0
        while next_c < len(builder) or ahead:
            while next_c < len(builder) and len(ahead) < 2 * workers:  # bounded read-ahead: memory stays flat
                ahead.append(pool.submit(builder.__getitem__, next_c))
                next_c += 1
            yield ahead.popleft().result()


def _processes(builder: BatchBuilder, workers: int, pin_memory: bool) -> Iterator:
    # fork where the platform has it: workers inherit the open dataset instead of unpickling it, and
    # start in milliseconds (spawn/forkserver would import torch again in each worker, seconds).
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    loader = torch.utils.data.DataLoader(builder, batch_size=None, shuffle=False, num_workers=workers,
                                         prefetch_factor=2, pin_memory=pin_memory,
                                         multiprocessing_context=context)
    yield from loader
