"""Memory at scale: encode and search 10,000,000 codes (M = 8) in bounded memory.

Claim (issue 8): searching ``N`` codes with 1000 queries needs, on top of the
codes themselves, at most ``sklearn.get_config()["working_memory"]`` of extra
memory, whatever ``N``; encoding ``N`` vectors streams them in chunks, so its
extra memory is the output codes plus at most ``working_memory``.

Protocol
--------
1. ``ProductQuantizer(n_codebooks=8, n_codewords=256)`` is fitted on 20,000
   vectors of dimension 32 (a Gaussian mixture, float32).
2. The 10M x 32 float32 database (1.28 GB) is generated chunk by chunk into a
   ``np.memmap`` file in ``/tmp`` (never held in memory), then encoded with
   ``pq.index(X_memmap)`` -> ``codes_`` of 10M x 8 bytes (80 MB).
3. 1000 queries search the 10M codes, ``kneighbors(Q, n_neighbors=10)``,
   ``n_jobs=1``, under each ``working_memory`` budget.

Measurements (Linux): before each phase, ``5`` is written to
``/proc/self/clear_refs``, which resets the peak resident set size
``VmHWM`` to the current ``VmRSS``; "peak extra" is ``VmHWM`` after the phase
minus ``VmRSS`` before it, so it counts every allocation (numpy, torch,
the allocator's slack) that was resident at the peak. For encoding, the
mapped input pages also count in ``VmRSS`` (they are page cache, reclaimable,
not allocations), so that phase also reports the peak of ``RssAnon``
(anonymous memory only, sampled every 2 ms by a thread) and the exact peak of
numpy allocations from :mod:`tracemalloc`.

Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py            # ~6 min
    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py --n-items 1000000

and the Markdown table is written to ``benchmarks/results/memory.md``
(``--output``).
"""

import argparse
import ctypes
import gc
import json
import os
import platform
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import sklearn
from sklearn import config_context

import skquant._search
from skquant import ProductQuantizer
from skquant._search import aqd_search

MB = 2**20
_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _status():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PeakMeter:
    """Context manager: peak extra VmHWM, sampled peak extra RssAnon and the
    tracemalloc peak of the enclosed block."""

    def __init__(self, trace=False, interval=0.002):
        self.trace = trace
        self.interval = interval

    def __enter__(self):
        gc.collect()
        self._stop = threading.Event()
        _reset_peak()
        start = _status()
        self.rss0, self.anon0 = start["VmRSS"], start["RssAnon"]
        self.anon_peak = self.anon0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        if self.trace:
            tracemalloc.start()
        self.tic = time.perf_counter()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.anon_peak = max(self.anon_peak, _status()["RssAnon"])
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.tic
        self.traced_peak = None
        if self.trace:
            self.traced_peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        self._stop.set()
        self._thread.join()
        end = _status()
        self.anon_peak = max(self.anon_peak, end["RssAnon"])
        self.hwm_extra = end["VmHWM"] - self.rss0
        self.anon_extra = self.anon_peak - self.anon0
        return False


def _mixture(rng, n, centers):
    labels = rng.integers(0, len(centers), n)
    noise = rng.standard_normal((n, centers.shape[1]), dtype=np.float32)
    return centers[labels] + 0.5 * noise


def _write_memmap(path, n_items, centers, seed, chunk=200_000):
    X = np.lib.format.open_memmap(
        path, mode="w+", dtype=np.float32, shape=(n_items, centers.shape[1])
    )
    rng = np.random.default_rng(seed)
    for start in range(0, n_items, chunk):
        stop = min(start + chunk, n_items)
        X[start:stop] = _mixture(rng, stop - start, centers)
    X.flush()
    del X
    return np.load(path, mmap_mode="r")


def _search_in_child(pq, Q, n_neighbors, budget, kernel):
    """One search in a forked child, so that heap space freed by earlier
    phases cannot hide (or inflate) this one's peak."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read_fd)
            if kernel.endswith("+mallopt"):
                # A fixed glibc mmap threshold (1 MiB): large blocks are
                # returned to the OS when freed instead of growing the heap.
                ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 2**20)
                kernel = kernel[: -len("+mallopt")]
            if kernel != "auto":
                # Benchmark-only switch: kneighbors does not expose the kernel.
                skquant._search._choose_kernel = lambda *a, **k: kernel
            with config_context(working_memory=budget):
                with PeakMeter(trace=True) as meter:
                    _, ind = pq.kneighbors(Q, n_neighbors=n_neighbors)
            result = {
                "seconds": meter.seconds,
                "hwm_extra": meter.hwm_extra,
                "anon_extra": meter.anon_extra,
                "traced_peak": meter.traced_peak,
                "retained": _status()["VmRSS"] - meter.rss0,
                "checksum": int(np.asarray(ind, dtype=np.int64).sum() * 7
                                + (ind[:, 0] * np.arange(len(ind))).sum()),
            }
            os.write(write_fd, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-items", type=int, default=10_000_000)
    parser.add_argument("--n-queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--n-neighbors", type=int, default=10)
    parser.add_argument(
        "--searches", default="auto:16,auto:128,auto+mallopt:16,numpy:16",
        help="comma-separated kernel:working_memory (MiB) search runs; kernel "
        "auto (torch embedding_bag when importable) or numpy, '+mallopt' fixes "
        "glibc's mmap threshold at 1 MiB in that run",
    )
    parser.add_argument(
        "--encode-working-memory", type=float, default=64,
        help="budget in MiB for the encoding phase",
    )
    parser.add_argument(
        "--n-lists", type=int, default=None,
        help="inverted file: ProductQuantizer(n_lists=..., n_probe=--n-probe) with "
        "residual codes, fitted on --n-train vectors; also reports the index's "
        "resident bytes per item once its scan layout is built",
    )
    parser.add_argument("--n-probe", type=int, default=16)
    parser.add_argument("--n-train", type=int, default=20_000)
    parser.add_argument("--tmpdir", default="/tmp")
    parser.add_argument(
        "--output", default=str(Path(__file__).parent / "results" / "memory.md")
    )
    args = parser.parse_args()
    searches = [
        (run.split(":")[0], float(run.split(":")[1])) for run in args.searches.split(",")
    ]
    M, K, D = 8, 256, args.dim
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((64, D), dtype=np.float32) * 2

    tic = time.perf_counter()
    pq = ProductQuantizer(M, K, max_iter=20, n_lists=args.n_lists, n_probe=args.n_probe,
                          random_state=0).fit(_mixture(rng, args.n_train, centers))
    fit_seconds = time.perf_counter() - tic
    # Warm up the search path (torch import, first embedding_bag call) so that
    # one-time initialisation is not counted as per-search memory.
    pq.kneighbors(_mixture(rng, 50, centers), n_neighbors=3)
    aqd_search(np.zeros((20, M, K), np.float32), np.zeros((100, M), np.uint8), 3)

    path = os.path.join(args.tmpdir, f"skquant_bench_memory_{os.getpid()}.npy")
    try:
        tic = time.perf_counter()
        X = _write_memmap(path, args.n_items, centers, seed=1)
        gen_seconds = time.perf_counter() - tic
        input_mb = X.nbytes / MB
        print(f"input: {args.n_items} x {D} float32 memmap ({input_mb:.0f} MiB), "
              f"written in {gen_seconds:.1f} s", flush=True)

        with config_context(working_memory=args.encode_working_memory):
            with PeakMeter(trace=True) as enc:
                pq.index(X)
        del X
    finally:
        if os.path.exists(path):
            os.remove(path)
    codes_mb = pq.codes_.nbytes / MB
    print(f"encode: {enc.seconds:.1f} s, codes {codes_mb:.1f} MiB, peak extra VmHWM "
          f"{enc.hwm_extra / MB:.1f} MiB (incl. mapped input), RssAnon "
          f"{enc.anon_extra / MB:.1f} MiB, tracemalloc {enc.traced_peak / MB:.1f} MiB",
          flush=True)

    Q = _mixture(np.random.default_rng(2), args.n_queries, centers)
    layout_line = ""
    if args.n_lists is not None:
        # The inverted file's scan layout (codes by cell, per-item terms) is
        # built on the first search and kept: measure what it adds for good.
        # (Counted by tracemalloc: numpy arrays still allocated after the
        # call. The resident set would miss heap space reused from the
        # encoding phase.)
        gc.collect()
        tracemalloc.start()
        pq.kneighbors(Q[:1], n_neighbors=args.n_neighbors)
        gc.collect()
        layout_mb = tracemalloc.get_traced_memory()[0] / MB
        tracemalloc.stop()
        layout_line = (
            f"Inverted file (`n_lists={args.n_lists}`, `n_probe={args.n_probe}`, residual "
            f"codes): the scan layout built by the first search stays resident: "
            f"+{layout_mb:.1f} MiB ({layout_mb * MB / args.n_items:.1f} bytes per item) on "
            f"top of the {codes_mb:.1f} MiB of codes ({M} bytes per item) and the cells "
            f"({pq.cells_.nbytes / MB:.1f} MiB)."
        )
        print(layout_line, flush=True)
    rows = []
    reference = None
    for kernel, budget in searches:
        search = _search_in_child(pq, Q, args.n_neighbors, budget, kernel)
        if reference is None:
            reference = search["checksum"]
        same = search["checksum"] == reference
        rows.append((kernel, budget, search))
        print(f"search ({kernel} kernel, working_memory={budget:g} MiB): "
              f"{search['seconds']:.1f} s, peak extra VmHWM "
              f"{search['hwm_extra'] / MB:.1f} MiB, RssAnon "
              f"{search['anon_extra'] / MB:.1f} MiB, tracemalloc "
              f"{search['traced_peak'] / MB:.1f} MiB, retained after "
              f"{search['retained'] / MB:.1f} MiB, same result as the first: {same}",
              flush=True)
        assert same

    enc_bound = args.encode_working_memory + codes_mb
    lines = [
        "# Memory at scale",
        "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/bench_memory.py "
        f"--n-items {args.n_items} --n-queries {args.n_queries} --searches "
        f"{args.searches} --encode-working-memory {args.encode_working_memory:g}"
        + (f" --n-lists {args.n_lists} --n-probe {args.n_probe} --n-train {args.n_train}"
           if args.n_lists is not None else "") + "`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared), Python "
        f"{platform.python_version()}, numpy {np.__version__}, scikit-learn "
        f"{sklearn.__version__}. ProductQuantizer(n_codebooks={M}, n_codewords={K}"
        + (f", n_lists={args.n_lists}, n_probe={args.n_probe}" if args.n_lists else "")
        + f") fitted on {args.n_train:,} x {D} vectors in {fit_seconds:.1f} s.",
        "",
        *([layout_line, ""] if layout_line else []),
        "Peak extra = `VmHWM` after the phase minus `VmRSS` before it (the peak is "
        "reset by writing 5 to `/proc/self/clear_refs`); RssAnon = sampled peak of "
        "anonymous memory (2 ms) minus its value before; tracemalloc = exact peak "
        "of numpy allocations.",
        "",
        f"## Encoding {args.n_items:,} vectors (`pq.index(X_memmap)`)",
        "",
        f"Input: {args.n_items:,} x {D} float32 `np.memmap` in /tmp ({input_mb:.0f} "
        f"MiB, written chunk by chunk in {gen_seconds:.0f} s, never loaded whole). "
        f"Output: `codes_` {args.n_items:,} x {M} uint8 = {codes_mb:.1f} MiB.",
        "",
        "| working_memory (MiB) | time (s) | peak extra VmHWM (MiB, incl. mapped input pages) "
        "| peak extra RssAnon (MiB) | tracemalloc peak (MiB) | bound: working_memory + codes (MiB) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| {args.encode_working_memory:g} | {enc.seconds:.1f} | {enc.hwm_extra / MB:.1f} "
        f"| {enc.anon_extra / MB:.1f} | {enc.traced_peak / MB:.1f} | {enc_bound:.1f} |",
        "",
        f"## Searching {args.n_items:,} codes with {args.n_queries} queries "
        f"(`kneighbors(Q, n_neighbors={args.n_neighbors})`, n_jobs=1)",
        "",
        "Each search runs in a fresh forked child (the codes are shared, not "
        "copied, and already resident: the baseline includes them, so the search's "
        "extra memory is compared with working_memory alone). \"retained\" = "
        "`VmRSS` after the search minus before: memory the allocator kept. All runs "
        "return the same neighbors.",
        "",
        "| kernel | working_memory (MiB) | time (s) | peak extra VmHWM (MiB) | peak extra "
        "RssAnon (MiB) | tracemalloc peak (MiB) | retained (MiB) | within working_memory "
        "(VmHWM) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: |",
    ]
    for kernel, budget, search in rows:
        # The codes are resident before the search (in the baseline), so the
        # extra memory of the search itself is compared with working_memory.
        ok = "yes" if search["hwm_extra"] / MB <= budget else "**no**"
        lines.append(
            f"| {kernel} | {budget:g} | {search['seconds']:.1f} | "
            f"{search['hwm_extra'] / MB:.1f} | {search['anon_extra'] / MB:.1f} | "
            f"{search['traced_peak'] / MB:.1f} | {search['retained'] / MB:.1f} | "
            f"{ok} |"
        )
    lines.append("")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text("\n".join(lines))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
