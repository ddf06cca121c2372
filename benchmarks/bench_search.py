"""AQD search speed and memory: skquant ``kneighbors`` against faiss and sklearn.

Exhaustive part (always): N = 1,000,000 codes, M in {4, 8, 16}, K = 256,
k = 10, 2 threads. faiss ``IndexPQ`` is trained on a Gaussian mixture and
encodes the database; skquant searches the *same* codebooks and codes
(``ProductQuantizer.from_faiss``); sklearn ``NearestNeighbors(algorithm=
"brute")`` searches the float vectors (32x the memory of M = 8 codes).
Queries/s for one query at a time (median latency over ``--single`` queries)
and for a batch (median of ``--reps`` calls); the methods alternate inside
each repetition, so the machine's noise hits them alike and the ratios are
taken in the same run. Recall@10 against faiss counts ties: a returned item
also counts when its float64 AQD is within the largest AQD of faiss's 10.

Inverted-file part (``--ivf``, the setup of issue 15): a 64-d Gaussian
mixture, M = 8 x 256, nlist = 1024, k = 10; skquant ``ProductQuantizer(
n_lists, n_probe)`` (residual codes) and faiss ``IndexIVFPQ`` both trained on
the same 100,000 vectors and indexing the same 1,000,000 (``--n-items`` for a
smaller run); an n_probe sweep up to nlist; recall@10 against exact float
search, queries/s in batches and one at a time, build times, ratios in the
same run; skquant's exhaustive search on codes of the same size for
reference.

Peak extra memory: resident-set high-water mark during the timed call minus
the resident set before it (``/proc/self/clear_refs``), and for skquant the
numpy allocations traced by ``tracemalloc`` (the engine's scratch, bounded by
``sklearn.get_config()["working_memory"]`` per job).

Run::

    python benchmarks/bench_search.py              # exhaustive, ~3 min
    python benchmarks/bench_search.py --ivf --no-exhaustive   # inverted file, 1M
    python benchmarks/bench_search.py --quick      # small smoke run

Markdown tables are printed and written to ``benchmarks/results/search.md``
(``--out``).
"""

import argparse
import os
import platform
import time
import tracemalloc
from pathlib import Path

import numpy as np

N_THREADS_DEFAULT = 2
DIM = 64
N_CENTRES = 1000


def _read_status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # MiB
    return float("nan")


def peak_extra_mib(func):
    """(result, extra MiB): resident high-water mark during ``func`` minus the
    resident set before it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return func(), float("nan")
    before = _read_status("VmRSS")
    result = func()
    return result, _read_status("VmHWM") - before


def traced_peak_mib(func):
    tracemalloc.start()
    try:
        func()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / 2**20


class Mixture:
    """Gaussian mixture in D=64 (perf.md's synthetic set): 1000 centres N(0, 1),
    spread 0.6; rows generated in reproducible chunks."""

    def __init__(self, seed=0):
        self.centres = np.random.default_rng(seed).normal(size=(N_CENTRES, DIM))
        self.seed = seed

    def sample(self, n, stream):
        rng = np.random.default_rng([self.seed, stream])
        labels = rng.integers(0, N_CENTRES, size=n)
        x = self.centres[labels] + 0.6 * rng.normal(size=(n, DIM))
        return x.astype(np.float32)

    def chunks(self, n, chunk, first_stream):
        for i, start in enumerate(range(0, n, chunk)):
            yield self.sample(min(chunk, n - start), first_stream + i)


def median_time(func, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        func()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def alternate(funcs, reps):
    """Median seconds of each function, calls interleaved rep by rep."""
    times = {name: [] for name in funcs}
    for _ in range(reps):
        for name, func in funcs.items():
            t0 = time.perf_counter()
            func()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def alternate_single(funcs, queries):
    """Median per-query latency of each function over single-query calls.

    The order of the functions rotates from one query to the next: a call
    right after faiss's shares the CPU with its OpenMP threads, which keep
    spinning for a while after each search (on this 2-vCPU machine a fixed
    order cost the method after faiss ~25 % of its single-query speed)."""
    times = {name: [] for name in funcs}
    names = list(funcs)
    for i in range(len(queries)):
        q = queries[i : i + 1]
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            func = funcs[name]
            t0 = time.perf_counter()
            func(q)
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}


def aqd64(codebooks, codes, queries, ids):
    """float64 AQD of ``queries[q]`` to items ``ids[q]`` (any shape (n_q, r))."""
    M, K, ds = codebooks.shape
    q = queries.astype(np.float64).reshape(len(queries), 1, M, ds)
    decoded = codebooks.astype(np.float64)[np.arange(M), codes[ids]]  # (n_q, r, M, ds)
    return ((q - decoded) ** 2).sum(axis=(-1, -2))


def recall_with_ties(codebooks, codes, queries, ids, ref_ids):
    """Recall@k of ``ids`` against ``ref_ids`` where an item also counts when
    its AQD is no larger than the largest AQD of the reference list."""
    got = aqd64(codebooks, codes, queries, ids)
    ref = aqd64(codebooks, codes, queries, ref_ids)
    bound = ref.max(axis=1, keepdims=True) * (1 + 1e-5) + 1e-9
    tie_recall = np.mean(got <= bound)
    strict = np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, ref_ids, strict=True)])
    return tie_recall, strict


def recall_ids(ids, ref_ids):
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, ref_ids, strict=True)]))


def fmt(x, digits=0):
    if x != x:  # nan
        return "-"
    if digits == 0:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
def exhaustive(args, mixture, out):
    import faiss
    from sklearn.neighbors import NearestNeighbors
    from threadpoolctl import threadpool_limits

    from skquant import ProductQuantizer, _search

    threads = args.threads
    faiss.omp_set_num_threads(threads)
    xt = mixture.sample(args.n_train, 1)
    xb = np.concatenate(list(mixture.chunks(args.n, 1_000_000, 100)))
    xq = mixture.sample(args.queries, 2)
    single = xq[: args.single]

    rows, mem_rows = [], []
    sk_brute = None
    for M in args.m:
        index = faiss.IndexPQ(DIM, M, 8)
        index.train(xt)
        index.add(xb)
        pq = ProductQuantizer.from_faiss(index).set_params(n_jobs=threads)
        codebooks, codes = pq.codebooks_, np.ascontiguousarray(pq.codes_)

        def sk_search(q, pq=pq):
            return pq.kneighbors(q, n_neighbors=args.k)

        def faiss_search(q, index=index):
            return index.search(q, args.k)

        funcs = {"faiss": faiss_search, "skquant": sk_search}
        if M == 8:
            # numpy-only batch kernel, as used when torch is not installed
            def sk_numpy(q, pq=pq):
                saved = _search._torch_embedding_bag
                _search._torch_embedding_bag = lambda: None
                try:
                    return pq.kneighbors(q, n_neighbors=args.k)
                finally:
                    _search._torch_embedding_bag = saved

            funcs["skquant (numpy, no torch)"] = sk_numpy
            if sk_brute is None:
                sk_brute = NearestNeighbors(n_neighbors=args.k, algorithm="brute",
                                            n_jobs=threads).fit(xb)

            def sklearn_search(q, brute=sk_brute):
                with threadpool_limits(threads):
                    return brute.kneighbors(q)

            funcs["sklearn brute (float32 vectors)"] = sklearn_search

        # Warm-up: caches (pair codes), lazy torch import, faiss/BLAS pools.
        for f in funcs.values():
            f(xq[:2])
            f(xq[:64])
        mem = {}
        for name, f in funcs.items():
            _, mem[name] = peak_extra_mib(lambda f=f: f(xq))
        traced = traced_peak_mib(lambda: sk_search(xq))
        _, single_rss = peak_extra_mib(lambda: sk_search(single[:1]))

        t_single = alternate_single(funcs, single)
        t_batch = alternate({n: (lambda f=f: f(xq)) for n, f in funcs.items()}, args.reps)

        faiss_ids = faiss_search(xq)[1]
        sk_ids = sk_search(xq)[1]
        ties, strict = recall_with_ties(codebooks, codes, xq, sk_ids, faiss_ids)
        faiss_single_ids = np.vstack([faiss_search(q[None])[1] for q in single])
        sk_single_ids = np.vstack([sk_search(q[None])[1] for q in single])
        ties1, _ = recall_with_ties(codebooks, codes, single, sk_single_ids, faiss_single_ids)

        qps1 = {n: 1 / t for n, t in t_single.items()}
        qpsb = {n: args.queries / t for n, t in t_batch.items()}
        for name in funcs:
            recall = "1.000 (ref)" if name == "faiss" else "-"
            if name == "skquant":
                recall = f"{ties:.3f} / {ties1:.3f} ({strict:.3f})"
            elif name.startswith("skquant"):
                recall = "same kernel family"
            if name.startswith("sklearn"):
                recall = "exact float search"
            rows.append([
                M, name, fmt(qps1[name]), f"{qps1[name] / qps1['faiss']:.2f}x",
                fmt(qpsb[name]), f"{qpsb[name] / qpsb['faiss']:.2f}x", recall,
            ])
        mem_rows.append([M, fmt(mem["faiss"], 1), fmt(mem["skquant"], 1), fmt(traced, 1),
                         fmt(single_rss, 1)]
                        + ([fmt(mem["sklearn brute (float32 vectors)"], 1)] if M == 8 else ["-"]))
        print(f"M={M}: " + ", ".join(f"{n}: {qps1[n]:.0f} / {qpsb[n]:.0f} qps" for n in funcs),
              flush=True)
        del index, pq

    text = [
        f"### Exhaustive search: N = {args.n:,}, K = 256, k = {args.k}, {threads} threads",
        "",
        f"queries/s: single = median latency over {args.single} one-query calls; "
        f"batch = {args.queries} queries, median of {args.reps} calls; methods interleaved. "
        "Ratios are to faiss `IndexPQ` in the same run. Recall@10 against faiss "
        "(batch / single; with ties, plain id overlap in parentheses).",
        "",
        table(["M", "method", "qps single", "vs faiss", f"qps batch {args.queries}",
               "vs faiss", "recall@10 vs faiss"], rows),
        "",
        f"Peak extra memory during a {args.queries}-query search (MiB): resident-set "
        "high-water mark minus the resident set before the call; for skquant also the "
        "numpy allocations traced by tracemalloc (working_memory = "
        "1024 MiB per job, the scikit-learn default; actual scratch is bounded by "
        "cache-sized blocks).",
        "",
        table(["M", "faiss RSS", "skquant RSS", "skquant traced", "skquant RSS, 1 query",
               "sklearn brute RSS"], mem_rows),
    ]
    out.append("\n".join(text))
    print("\n".join(text), flush=True)


# ---------------------------------------------------------------------------
def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def non_exhaustive(args, mixture, out):
    """skquant ProductQuantizer(n_lists, n_probe) against faiss IndexIVFPQ.

    Both are trained on the same ``--ivf-train`` vectors and index the same
    ``--n-items`` vectors of the mixture; recall@k against exact float
    search (faiss IndexFlatL2); queries/s in batches and one at a time, the
    two libraries interleaved; build = training + indexing.
    """
    import faiss
    from threadpoolctl import threadpool_limits

    from skquant import ProductQuantizer

    threads, M, n, k, n_lists = args.threads, 8, args.n_items, args.k, args.n_lists
    faiss.omp_set_num_threads(threads)
    xt = mixture.sample(args.ivf_train, 3)
    xb = np.concatenate(list(mixture.chunks(n, 1_000_000, 1000)))
    xq = mixture.sample(args.ivf_queries, 4)
    single = xq[: args.single]
    flat = faiss.IndexFlatL2(DIM)
    flat.add(xb)
    _, exact = flat.search(xq, k)
    del flat

    def recall(ids):
        return recall_ids(ids, exact)

    build = {}
    with threadpool_limits(threads):
        t0 = time.perf_counter()
        ivf = faiss.IndexIVFPQ(faiss.IndexFlatL2(DIM), DIM, n_lists, M, 8)
        ivf.train(xt)
        build["faiss train"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ivf.add(xb)
        build["faiss add"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pq = ProductQuantizer(n_codebooks=M, n_lists=n_lists, n_jobs=threads,
                              random_state=0).fit(xt)
        build["skquant fit"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        pq.index(xb)
        pq.kneighbors(xq[:1])  # scan layouts built once, on first search
        build["skquant index"] = time.perf_counter() - t0
        # Coarse quantizer alone (k-means on the training set), both libraries.
        t0 = time.perf_counter()
        km = faiss.Kmeans(DIM, n_lists, niter=ivf.cp.niter, seed=1234)
        km.train(xt)
        build["faiss coarse k-means"] = time.perf_counter() - t0
        from skquant._index import RESIDUAL_POINTS_PER_LIST, train_coarse_quantizer

        t0 = time.perf_counter()
        train_coarse_quantizer(xt, n_lists, random_state=0,
                               max_points_per_list=RESIDUAL_POINTS_PER_LIST)
        build["skquant coarse k-means"] = time.perf_counter() - t0
        # Cell assignment of the database alone (nearest centroid), both.
        from skquant._ivf import assign_lists

        t0 = time.perf_counter()
        km.index.search(xb, 1)
        build["faiss assignment"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        assign_lists(xb, pq.index_._coarse_centroids)
        build["skquant assignment"] = time.perf_counter() - t0
        # Exhaustive skquant on codes of the same size (faiss IndexPQ codebooks).
        flat_pq = faiss.IndexPQ(DIM, M, 8)
        flat_pq.train(xt)
        flat_pq.add(xb)
        exhaustive = ProductQuantizer.from_faiss(flat_pq).set_params(n_jobs=threads)
        del flat_pq
    print("build (s): " + ", ".join(f"{n}: {t:.1f}" for n, t in build.items()), flush=True)

    def sk_ex(q):
        return exhaustive.kneighbors(q, n_neighbors=k)

    with threadpool_limits(threads):
        sk_ex(xq[:64])
        t_ex = alternate({"b": lambda: sk_ex(xq)}, args.reps)["b"]
        t_ex1 = alternate_single({"s": sk_ex}, single)["s"]
        rec_ex = recall(sk_ex(xq)[1])
    qps_ex, qps_ex1 = len(xq) / t_ex, 1 / t_ex1
    rows = [["skquant exhaustive (direct codes)", "-", fmt(qps_ex), "-", fmt(qps_ex1), "-",
             f"{rec_ex:.3f}", "-"]]
    curve = []
    probes = [p for p in args.n_probe if p <= n_lists]
    if n_lists not in probes:
        probes.append(n_lists)
    for n_probe in probes:
        pq.set_params(n_probe=n_probe)
        ivf.nprobe = n_probe

        def sk_ivf(q):
            return pq.kneighbors(q, n_neighbors=k)

        def faiss_ivf(q):
            return ivf.search(q, k)

        with threadpool_limits(threads):
            sk_ivf(xq[:64])
            faiss_ivf(xq[:64])
            tb = alternate({"sk": lambda: sk_ivf(xq), "faiss": lambda: faiss_ivf(xq)},
                           args.reps)
            t1 = alternate_single({"sk": sk_ivf, "faiss": faiss_ivf}, single)
            r_sk, r_f = recall(sk_ivf(xq)[1]), recall(faiss_ivf(xq)[1])
        qb = {key: len(xq) / t for key, t in tb.items()}
        q1 = {key: 1 / t for key, t in t1.items()}
        curve.append((n_probe, r_sk, r_f, qb["sk"], qb["faiss"], q1["sk"], q1["faiss"]))
        rows.append(["faiss IndexIVFPQ", n_probe, fmt(qb["faiss"]), "1.00x", fmt(q1["faiss"]),
                     "1.00x", f"{r_f:.3f}", "-"])
        rows.append(["skquant ProductQuantizer", n_probe, fmt(qb["sk"]),
                     f"{qb['sk'] / qb['faiss']:.2f}x", fmt(q1["sk"]),
                     f"{q1['sk'] / q1['faiss']:.2f}x", f"{r_sk:.3f}", f"{r_sk - r_f:+.3f}"])
        print(f"n_probe={n_probe}: skquant {qb['sk']:.0f} / {q1['sk']:.0f} q/s, recall "
              f"{r_sk:.3f}; faiss {qb['faiss']:.0f} / {q1['faiss']:.0f} q/s, recall {r_f:.3f} "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)

    sk_build = build["skquant fit"] + build["skquant index"]
    f_build = build["faiss train"] + build["faiss add"]
    text = [
        f"### Inverted file: N = {n:,} (Gaussian mixture, {N_CENTRES} centres, D = {DIM}), "
        f"M = {M} x 256 (8 bytes), n_lists = {n_lists}, k = {k}, {threads} threads",
        "",
        f"Both trained on the same {len(xt):,} vectors, both index the same {n:,}. "
        f"skquant `ProductQuantizer(n_codebooks={M}, n_lists={n_lists}, n_probe=...)` "
        "(residual codes, the default) against faiss `IndexIVFPQ` (residual codes, "
        f"precomputed tables) at the same nlist/nprobe. Batch = {len(xq)} queries "
        f"(median of {args.reps} calls); single = median latency over {len(single)} "
        "one-query calls; the two libraries interleaved. Recall@10 against exact float "
        f"search (faiss `IndexFlatL2`) over the {len(xq)} queries. Ratios are skquant / "
        "faiss in the same run.",
        "",
        table(["method", "n_probe", "q/s batch", "vs faiss", "q/s single", "vs faiss",
               "recall@10 vs exact", "recall - faiss's"], rows),
        "",
        "Build (seconds, same run): "
        + ", ".join(f"{name} {t:.1f}" for name, t in build.items())
        + f". Training + indexing: skquant {sk_build:.1f} s, faiss {f_build:.1f} s "
        f"({sk_build / f_build:.2f}x). skquant's fit trains its sub-space codebooks with "
        "scikit-learn `KMeans` (k-means++, up to 100 Lloyd iterations), faiss its own "
        "(25 iterations); the coarse k-means alone: skquant "
        f"{build['skquant coarse k-means']:.1f} s, faiss {build['faiss coarse k-means']:.1f} s "
        f"({build['skquant coarse k-means'] / build['faiss coarse k-means']:.2f}x); "
        f"cell assignment of the {n:,} items alone: skquant "
        f"{build['skquant assignment']:.1f} s, faiss {build['faiss assignment']:.1f} s; "
        f"coarse training + assignment (issue 15's build target, at most 2x): skquant "
        f"{build['skquant coarse k-means'] + build['skquant assignment']:.1f} s, faiss "
        f"{build['faiss coarse k-means'] + build['faiss assignment']:.1f} s ("
        f"{(build['skquant coarse k-means'] + build['skquant assignment']) / (build['faiss coarse k-means'] + build['faiss assignment']):.2f}x); "
        f"indexing (cell assignment + encoding): skquant {build['skquant index']:.1f} s, "
        f"faiss {build['faiss add']:.1f} s "
        f"({build['skquant index'] / build['faiss add']:.2f}x).",
    ]
    out.append("\n".join(text))
    print("\n".join(text), flush=True)
    if args.curve:
        Path(args.curve).write_text(
            "n_probe,recall_skquant,recall_faiss,qps_batch_skquant,qps_batch_faiss,"
            "qps_single_skquant,qps_single_faiss\n"
            + "".join(",".join(f"{v:.4g}" for v in row) + "\n" for row in curve)
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--m", type=int, nargs="+", default=[8, 4, 16])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=30)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=N_THREADS_DEFAULT)
    parser.add_argument("--n-train", type=int, default=50_000)
    parser.add_argument("--ivf", action="store_true", help="run the inverted-file part")
    parser.add_argument("--no-exhaustive", action="store_true")
    parser.add_argument("--n-items", type=int, default=1_000_000,
                        help="indexed items of the inverted-file part")
    parser.add_argument("--ivf-train", type=int, default=100_000,
                        help="training vectors of the inverted-file part")
    parser.add_argument("--ivf-queries", type=int, default=1000)
    parser.add_argument("--n-lists", type=int, default=1024)
    parser.add_argument("--n-probe", type=int, nargs="+",
                        default=[1, 2, 4, 8, 16, 32, 64, 128, 256, 1024])
    parser.add_argument("--curve", default=None,
                        help="also write the recall/speed curve of the inverted file as CSV")
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "search.md"))
    args = parser.parse_args()
    if args.quick:
        args.n, args.m, args.queries, args.single, args.reps = 100_000, [8], 200, 10, 2
        args.n_items, args.n_lists, args.n_probe, args.ivf_queries = 100_000, 128, [4, 16], 200
        args.ivf_train = 20_000

    import faiss
    import sklearn
    import torch

    mixture = Mixture(seed=0)
    out = [
        "## Search benchmark (`benchmarks/bench_search.py`)",
        "",
        f"Machine: {_cpu_model()}, {os.cpu_count()} CPUs visible, {args.threads} threads "
        f"used; numpy {np.__version__}, scikit-learn {sklearn.__version__}, "
        f"faiss {faiss.__version__}, torch {torch.__version__} (torch is used lazily by "
        "the batch kernel). Load average at start: "
        + ", ".join(f"{x:.1f}" for x in os.getloadavg()) + ".",
        "",
    ]
    if not args.no_exhaustive:
        exhaustive(args, mixture, out)
    if args.ivf:
        non_exhaustive(args, mixture, out)
    out.append("Load average at end: " + ", ".join(f"{x:.1f}" for x in os.getloadavg()) + ".")
    if not args.quick:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n\n".join(out) + "\n")
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
