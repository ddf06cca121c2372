"""A database on a dask cluster (``DaskIndex``): encoding, client memory, query latency.

Measures, on a ``LocalCluster`` of worker processes (one thread each), with a
``ProductQuantizer`` (M = 8 codebooks of K = 256 codewords, D = 16; fitted
in memory on 20,000 items) and synthetic Gaussian data generated *on the
workers* (``dask.array.random``: the raw vectors never pass through the
client):

1. encode throughput with 1 and 2 workers: ``encode(X).persist()`` of
   ``--n-encode`` items already held by the workers (median of ``--reps``);
2. the client's memory while indexing ``--n-index`` items (2 workers):
   resident set sampled every 20 ms during ``index(X)``, against the size of
   the codes; and the workers' resident sets after;
3. query latency on that index for 1 and 16 queries (k = 10): wall time
   (median of ``--reps``), split with the scheduler's task stream into the
   per-chunk scan tasks and the merge tasks (the rest: scheduling, the
   lookup tables and the final float64 re-sum on the client); the same codes
   searched in memory (one thread) for comparison;
4. a projection to one billion items on N workers, computed from (2) and (3).

``--pause`` seconds of idle between the phases give a shared machine's cores
back to its other users.

Run::

    python benchmarks/bench_dask.py            # 1M encode, 10M index: ~3 min
    python benchmarks/bench_dask.py --quick    # 200k / 1M, under a minute

The report (markdown) is printed and written to ``--out``
(``benchmarks/results/dask.md`` by default).
"""

import argparse
import math
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import numpy as np
from bench_search import _cpu_model  # benchmarks/ is on sys.path when run as a script

M, K, DIM, K_NEIGHBORS = 8, 256, 16, 10
# One query (per-query kernel) and a batch (the batch kernel starts at 12).
QUERY_BATCHES = (1, 16)


def load():
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def rss_mib(pid=None):
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


class RssSampler:
    """Peak resident set of this process while the ``with`` block runs."""

    def __enter__(self):
        self.before = rss_mib()
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())


def synthetic(n, chunk, seed):
    """Lazy Gaussian-mixture-like rows, generated on the workers."""
    import dask.array as da

    rng = da.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((64, DIM)).astype(np.float32) * 3
    labels = rng.integers(0, len(centres), size=n, chunks=chunk)
    noise = rng.standard_normal((n, DIM), chunks=(chunk, DIM), dtype=np.float32)
    return labels.map_blocks(lambda b: centres[b], dtype=np.float32,
                             new_axis=1, chunks=(labels.chunks[0], (DIM,))) + noise


def fit_model():
    from skquant import ProductQuantizer

    rng = np.random.default_rng(1)
    centres = np.random.default_rng(0).standard_normal((64, DIM)).astype(np.float32) * 3
    X = centres[rng.integers(0, 64, 20_000)] + rng.standard_normal((20_000, DIM)).astype(
        np.float32)
    return ProductQuantizer(n_codebooks=M, n_codewords=K, max_iter=10, random_state=0).fit(X)


def cluster(n_workers):
    import distributed

    c = distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                 dashboard_address=None, silence_logs=50)
    return c, distributed.Client(c)


def trim_memory():
    """Return freed heap pages to the OS (glibc), so resident sets measure
    what is held, not what was once touched."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    return os.getpid()


def cpu_seconds():
    """CPU time (user + system) of this process so far."""
    t = os.times()
    return t.user + t.system


def workers_cpu(client):
    return sum(client.run(cpu_seconds).values())


def encode_throughput(model, n, chunk, reps):
    import distributed
    from threadpoolctl import threadpool_limits

    # The single-machine path, one thread, on a fifth of the items.
    X = synthetic(n // 5, chunk, seed=2).compute(scheduler="synchronous")
    with threadpool_limits(1):
        model.encode(X[:1000])
        times = []
        cpu0 = cpu_seconds()
        for _ in range(reps):
            t0 = time.perf_counter()
            model.encode(X)
            times.append(time.perf_counter() - t0)
        cpu = (cpu_seconds() - cpu0) / reps * 5
    rows = [(0, statistics.median(times) * 5, load(), cpu)]
    del X
    for n_workers in (1, 2):
        c, client = cluster(n_workers)
        try:
            X = synthetic(n, chunk, seed=2).persist()
            distributed.wait(X)
            distributed.wait(model.encode(X[:chunk]).persist())  # warm-up
            times = []
            cpu0 = workers_cpu(client)
            for _ in range(reps):
                t0 = time.perf_counter()
                codes = model.encode(X).persist()
                distributed.wait(codes)
                times.append(time.perf_counter() - t0)
                del codes
            cpu = (workers_cpu(client) - cpu0) / reps
            rows.append((n_workers, statistics.median(times), load(), cpu))
        finally:
            client.close()
            c.close()
    return rows


def index_and_query(model, n, chunk, reps, pause=0.0):
    import distributed

    c, client = cluster(2)
    out = {}
    try:
        # Warm-up (imports, first allocations), then the workers' baseline.
        queries = synthetic(100, 100, seed=5).compute()
        model.index(synthetic(4 * chunk // 10, chunk // 10, seed=6))
        model.kneighbors(queries[:3])
        model.index(synthetic(10, 10, seed=6))
        worker_pids = client.run(trim_memory)
        workers_before = {w: rss_mib(p) for w, p in worker_pids.items()}
        X = synthetic(n, chunk, seed=3)
        out["load_index"] = load()
        with RssSampler() as rss:
            t0 = time.perf_counter()
            model.index(X)
            out["index_s"] = time.perf_counter() - t0
        out["client_before"], out["client_peak"] = rss.before, rss.peak
        out["codes_mib"] = n * M / 2**20
        client.run(trim_memory)
        out["workers_codes"] = {w: rss_mib(p) for w, p in worker_pids.items()}
        out["n_chunks"] = len(model.codes_.chunks[0])
        time.sleep(pause)
        model.kneighbors(queries[:1])  # builds the per-chunk scan objects (pair codes)
        client.run(trim_memory)
        out["workers"] = {
            w: (workers_before[w], rss_mib(p)) for w, p in worker_pids.items()
        }
        out["load_query"] = load()
        lat = {}
        for n_queries in QUERY_BATCHES:
            Q = queries[:n_queries]
            model.kneighbors(Q, n_neighbors=K_NEIGHBORS)  # warm-up (pair codes)
            walls, scans, scan_paths, merges = [], [], [], []
            cpu0 = workers_cpu(client)
            for _ in range(reps):
                with distributed.get_task_stream(client) as stream:
                    t0 = time.perf_counter()
                    model.kneighbors(Q, n_neighbors=K_NEIGHBORS)
                    walls.append(time.perf_counter() - t0)
                per_worker = {}
                merge = 0.0
                for task in stream.data:
                    dur = sum(s["stop"] - s["start"] for s in task["startstops"]
                              if s["action"] == "compute")
                    key = str(task["key"])
                    if "skquant-scan" in key:
                        scans.append(dur)
                        per_worker[task["worker"]] = per_worker.get(task["worker"], 0) + dur
                    elif "skquant-merge" in key:
                        merge += dur
                scan_paths.append(max(per_worker.values()))
                merges.append(merge)
            lat[n_queries] = {
                "workers_cpu": (workers_cpu(client) - cpu0) / reps,
                "wall": statistics.median(walls),
                "scan_task": statistics.median(scans),
                "scan_path": statistics.median(scan_paths),
                "merge": statistics.median(merges),
            }
        out["latency"] = lat
        # The same codes in memory, one thread: the single-machine path.
        in_memory = model._worker_model()
        in_memory.index_ = model.index_.gather("the in-memory comparison")
        mem = {}
        # One thread, as each worker (the nanny sets OMP_NUM_THREADS=1).
        import sys

        from threadpoolctl import threadpool_limits

        limits = threadpool_limits(1)
        torch = sys.modules.get("torch")
        torch_threads = torch.get_num_threads() if torch else None
        if torch:
            torch.set_num_threads(1)
        # The scan kernel on one chunk, in this process: what a worker's
        # task computes, without the cluster's messaging or a shared core.
        from skquant._dask_index import _Chunk, _scan_chunk

        chunk0 = _Chunk(model.codes_.blocks[0].compute())
        for n_queries in QUERY_BATCHES:
            tables = np.asarray(model.quantizer_.lookup_tables(queries[:n_queries]),
                                dtype=np.float32)
            _scan_chunk(chunk0, tables, K_NEIGHBORS, 0)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                _scan_chunk(chunk0, tables, K_NEIGHBORS, 0)
                times.append(time.perf_counter() - t0)
            lat[n_queries]["kernel_chunk"] = statistics.median(times)
        for n_queries in QUERY_BATCHES:
            Q = queries[:n_queries]
            in_memory.kneighbors(Q, n_neighbors=K_NEIGHBORS)
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                result = in_memory.kneighbors(Q, n_neighbors=K_NEIGHBORS)
                times.append(time.perf_counter() - t0)
            mem[n_queries] = statistics.median(times)
            for a, b in zip(result, model.kneighbors(Q, n_neighbors=K_NEIGHBORS),
                            strict=True):
                assert np.array_equal(a, b), "dask and in-memory results differ"
        out["in_memory"] = mem
        out["per_task"], out["noop"] = scheduler_overhead(client, reps)
        limits.restore_original_limits()
        if torch:
            torch.set_num_threads(torch_threads)
    finally:
        client.close()
        c.close()
    return out


def n_tasks(n_chunks):
    """Scan and merge tasks of one search over ``n_chunks`` chunks (8-ary tree)."""
    tasks, level = n_chunks, n_chunks
    while True:
        level = math.ceil(level / 8)
        tasks += level
        if level == 1:
            return tasks


def scheduler_overhead(client, reps):
    """Seconds the cluster adds per task: wall time of graphs of 40 and 400
    no-op tasks (reduced by one task), difference over the 360 extra tasks."""
    import uuid

    import dask

    def noop(i):
        return i

    def total(parts):
        return len(parts)

    times = {}
    for n in (40, 400):
        walls = []
        for _ in range(reps):
            token = uuid.uuid4().hex
            parts = [dask.delayed(noop)(i, dask_key_name=f"noop-{token}-{i}") for i in range(n)]
            t0 = time.perf_counter()
            dask.compute(dask.delayed(total)(parts, dask_key_name=f"total-{token}"))
            walls.append(time.perf_counter() - t0)
        times[n] = statistics.median(walls)
    return (times[400] - times[40]) / 360, times


def projection(res, chunk, big_chunk, n_items=10**9, workers=(10, 100, 1000)):
    """Memory per worker and latency for ``n_items`` on N workers (1 thread
    each, chunks of about ``big_chunk`` items), from the measured costs."""
    n = res["n"]
    # Worker memory per item, measured: resident growth of the workers
    # (codes, and the per-chunk scan objects built by the first query).
    grown = sum(after - before for before, after in res["workers"].values())
    bytes_per_item = grown * 2**20 / n
    measured_tasks = n_tasks(res["n_chunks"])
    rows = []
    for n_queries, lat in res["latency"].items():
        # Scan seconds per item on one thread: from the tasks' times (which
        # include waiting for a core of this shared machine, and the worker's
        # messaging), and from the kernel on one chunk in process (a core of
        # its own).
        scan_per_item = lat["scan_task"] / chunk
        kernel_per_item = lat["kernel_chunk"] / chunk
        merge_per_list = lat["merge"] / max(1, res["n_chunks"])
        rest = max(0.0, lat["wall"] - lat["scan_path"] - lat["merge"])
        for n_workers in workers:
            per_worker = n_items / n_workers
            # Whole chunks per worker: at least one each.
            n_chunks = n_workers * math.ceil(math.ceil(n_items / big_chunk) / n_workers)
            depth = math.ceil(math.log(n_chunks, 8))
            # Each level of the tree merges lists of k entries, 8 at a time;
            # the levels run one after the other.
            merge = merge_per_list * 8 * depth
            # The measured rest, plus the scheduler's cost of the extra tasks.
            other = rest + (n_tasks(n_chunks) - measured_tasks) * res["per_task"]
            rows.append((n_queries, n_workers, n_chunks, per_worker * bytes_per_item / 2**30,
                         per_worker * M / 2**30, scan_per_item * per_worker,
                         kernel_per_item * per_worker, merge, other,
                         scan_per_item * per_worker + merge + other,
                         kernel_per_item * per_worker + merge + other))
    return bytes_per_item, rows


def report(args, enc, res, proj):
    bytes_per_item, rows = proj
    lines = [
        "# DaskIndex: a database on a dask cluster",
        "",
        f"CPU: {_cpu_model()}; {os.cpu_count()} logical CPUs, "
        f"{len(os.sched_getaffinity(0))} usable; workers: 1 thread each (processes); "
        f"python {platform.python_version()}.",
        f"Command: `python benchmarks/bench_dask.py {' '.join(args.argv)}`".rstrip() + ".",
        f"Model: ProductQuantizer M={M}, K={K}, D={DIM}; data: Gaussian mixture "
        "generated on the workers.",
        "",
        f"## Encode throughput ({args.n_encode:,} items, chunks of {args.chunk:,}, "
        f"median of {args.reps})",
        "",
        "| workers | seconds | items/s | speed-up | CPU s (all workers) | "
        "items per CPU s | load |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = enc[1][1]
    for n_workers, seconds, ld, cpu in enc:
        name = "in process, 1 thread" if n_workers == 0 else n_workers
        lines.append(f"| {name} | {seconds:.2f} | {args.n_encode / seconds:,.0f} | "
                     f"{base / seconds:.2f}x | {cpu:.2f} | {args.n_encode / cpu:,.0f} | "
                     f"{ld} |")
    lines.append("")
    lines.append("(in process: a fifth of the items, times scaled by 5; speed-up "
                 "relative to 1 worker. Items per CPU second: the throughput a "
                 "worker reaches on a core of its own; the wall-clock speed-up is "
                 "bounded by the cores the machine's other jobs leave free.)")
    grown = {w: after - before for w, (before, after) in res["workers"].items()}
    codes_only = {w: res["workers_codes"][w] - before
                  for w, (before, _) in res["workers"].items()}
    lines += [
        "",
        f"## Indexing {res['n']:,} items on 2 workers ({res['n_chunks']} chunks)",
        "",
        f"- {res['load_index']}; `index(X)` took {res['index_s']:.1f} s "
        f"({res['n'] / res['index_s']:,.0f} items/s, data generation included).",
        f"- Codes: {res['codes_mib']:.1f} MiB (n x M bytes); raw vectors: "
        f"{res['n'] * DIM * 4 / 2**20:,.0f} MiB (float32), never in the client.",
        f"- Client resident set: {res['client_before']:.0f} MiB before, "
        f"{res['client_peak']:.0f} MiB peak during `index` "
        f"(+{res['client_peak'] - res['client_before']:.1f} MiB, "
        f"{(res['client_peak'] - res['client_before']) / res['codes_mib']:.2f}x the codes).",
        "- Workers' resident growth (after `malloc_trim`): after indexing "
        + ", ".join(f"{g:.0f} MiB" for g in codes_only.values())
        + "; after the first query (per-chunk scan objects: pair codes) "
        + ", ".join(f"{g:.0f} MiB" for g in grown.values())
        + f"; {bytes_per_item:.1f} bytes per item in all (codes: {M}).",
        "",
        f"## Query latency on that index (k = {K_NEIGHBORS}, median of {args.reps}; "
        f"{res['load_query']})",
        "",
        "| queries | wall ms | scan task ms (one chunk) | scan, slowest worker ms | "
        "merge ms (all tasks) | rest ms | workers' CPU ms | kernel on one chunk, "
        "in process ms | in memory, whole index, 1 thread ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n_queries, lat in res["latency"].items():
        rest = lat["wall"] - lat["scan_path"] - lat["merge"]
        lines.append(
            f"| {n_queries} | {lat['wall'] * 1e3:.1f} | {lat['scan_task'] * 1e3:.1f} | "
            f"{lat['scan_path'] * 1e3:.1f} | {lat['merge'] * 1e3:.2f} | {rest * 1e3:.1f} | "
            f"{lat['workers_cpu'] * 1e3:.1f} | {lat['kernel_chunk'] * 1e3:.2f} | "
            f"{res['in_memory'][n_queries] * 1e3:.1f} |")
    lines += [
        "",
        "Results were checked equal (indices and distances) to the in-memory search.",
        "",
        "## Projection: one billion items on N workers (1 thread each)",
        "",
        f"Per worker: 10^9 / N items, in chunks of about {args.projection_chunk:,} "
        "items (at least one per worker). Memory: the measured bytes per item "
        "above. Scan: the measured seconds per item on one thread times the items "
        "per worker, from the scan tasks' times on this loaded machine "
        "('tasks') or from the kernel on one chunk in process ('kernel', "
        "a core of its own). Merge: the measured merge time per chunk list, "
        "times 8 per level of the 8-ary tree. Rest: the measured rest plus the "
        f"cluster's measured cost per extra task ({res['per_task'] * 1e3:.2f} ms: "
        f"{res['noop'][40] * 1e3:.0f} ms for 40 no-op tasks, "
        f"{res['noop'][400] * 1e3:.0f} ms for 400) times the extra scan and merge "
        "tasks.",
        "",
        "| queries | workers | chunks | memory / worker GiB (codes only) | scan s (tasks) | "
        "scan s (kernel) | merge s | rest s | latency s (tasks) | latency s (kernel) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (n_queries, n_workers, n_chunks, mem, codes, scan, scan_kernel, merge, other,
         latency, latency_kernel) in rows:
        lines.append(f"| {n_queries} | {n_workers} | {n_chunks} | {mem:.2f} ({codes:.2f}) | "
                     f"{scan:.3f} | {scan_kernel:.3f} | {merge:.4f} | {other:.3f} | "
                     f"{latency:.3f} | {latency_kernel:.3f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-encode", type=int, default=1_000_000)
    parser.add_argument("--n-index", type=int, default=10_000_000)
    parser.add_argument("--chunk", type=int, default=250_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--pause", type=float, default=0.0)
    parser.add_argument("--projection-chunk", type=int, default=2_500_000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "dask.md"))
    import sys

    args = parser.parse_args()
    args.argv = sys.argv[1:]
    if args.quick:
        args.n_encode, args.n_index, args.chunk = 200_000, 1_000_000, 100_000
    print(f"CPU: {_cpu_model()}; threads: {os.cpu_count()}; {load()}", flush=True)
    model = fit_model()
    enc = encode_throughput(model, args.n_encode, args.chunk, args.reps)
    print("encode:", enc, flush=True)
    time.sleep(args.pause)
    res = index_and_query(model, args.n_index, args.chunk, args.reps, args.pause)
    res["n"] = args.n_index
    proj = projection(res, args.chunk, args.projection_chunk)
    text = report(args, enc, res, proj)
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
