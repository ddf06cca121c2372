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

Non-exhaustive part (``--ivf``): N = 10,000,000 codes of the same mixture
(generated and encoded in chunks: only codes are kept), M = 8. skquant's
inverted file (``n_lists``, ``n_probe``; direct codes) against exhaustive
skquant (recall@10 against exhaustive AQD, with ties; speed-up) and faiss
``IndexIVFPQ`` (residual codes) at the same ``nlist``/``nprobe``; recall@10
against exact float search for all of them.

Peak extra memory: resident-set high-water mark during the timed call minus
the resident set before it (``/proc/self/clear_refs``), and for skquant the
numpy allocations traced by ``tracemalloc`` (the engine's scratch, bounded by
``sklearn.get_config()["working_memory"]`` per job).

Run::

    python benchmarks/bench_search.py              # exhaustive, ~3 min
    python benchmarks/bench_search.py --ivf        # + the 10M inverted file
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
    """Median per-query latency of each function over single-query calls."""
    times = {name: [] for name in funcs}
    for i in range(len(queries)):
        q = queries[i : i + 1]
        for name, func in funcs.items():
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
def non_exhaustive(args, mixture, out):
    import faiss

    from skquant import ProductQuantizer
    from skquant._codebooks import ProductCodebooks
    from skquant._index import train_coarse_quantizer

    threads, M, n, k = args.threads, 8, args.ivf_n, args.k
    faiss.omp_set_num_threads(threads)
    chunk = 500_000
    xt = mixture.sample(max(args.n_train, 64 * args.n_lists), 3)
    xq = mixture.sample(args.ivf_queries, 4)
    single = xq[: args.single]

    t0 = time.perf_counter()
    pq_index = faiss.IndexPQ(DIM, M, 8)
    pq_index.train(xt[: args.n_train])
    ivf_index = faiss.IndexIVFPQ(faiss.IndexFlatL2(DIM), DIM, args.n_lists, M, 8)
    ivf_index.train(xt)
    codes = np.empty((n, M), dtype=np.uint8)
    # Exact neighbours of the queries, merged chunk by chunk.
    exact_d = np.full((args.exact_queries, k), np.inf, dtype=np.float32)
    exact_i = np.zeros((args.exact_queries, k), dtype=np.int64)
    for i, x in enumerate(mixture.chunks(n, chunk, 1000)):
        start = i * chunk
        codes[start : start + len(x)] = pq_index.sa_encode(x).reshape(-1, M)
        ivf_index.add(x)
        flat = faiss.IndexFlatL2(DIM)
        flat.add(x)
        d, j = flat.search(xq[: args.exact_queries], k)
        d = np.hstack([exact_d, d])
        j = np.hstack([exact_i, j + start])
        order = np.argsort(d, axis=1, kind="stable")[:, :k]
        exact_d = np.take_along_axis(d, order, 1)
        exact_i = np.take_along_axis(j, order, 1)
    t_data = time.perf_counter() - t0
    print(f"10M data, codes, faiss IVFPQ and ground truth in {t_data:.0f} s", flush=True)

    pq = ProductQuantizer(n_codebooks=M, n_jobs=threads, n_lists=args.n_lists)
    from faiss.contrib.inspect_tools import get_pq_centroids

    pq.quantizer_ = ProductCodebooks(
        np.ascontiguousarray(get_pq_centroids(pq_index.pq), dtype=np.float32)
    )
    pq.n_features_in_ = DIM
    pq._set_index(codes, None)
    exhaustive = ProductQuantizer(n_codebooks=M, n_jobs=threads)
    exhaustive.set_params()
    exhaustive.quantizer_ = pq.quantizer_
    exhaustive.n_features_in_ = DIM
    exhaustive._set_index(codes, None)
    del codes

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(n, min(n, 64 * args.n_lists), replace=False))
    pq.coarse_centroids_ = train_coarse_quantizer(
        pq.decode(pq.codes_[sample]), args.n_lists, random_state=0
    )
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    pq.kneighbors(xq[:1])  # builds the cells (assigns the 10M reconstructions)
    t_cells = time.perf_counter() - t0
    print(f"coarse k-means {t_train:.1f} s, cells {t_cells:.1f} s", flush=True)

    def ex_search(q):
        return exhaustive.kneighbors(q, n_neighbors=k)

    exhaustive.kneighbors(xq[:64])  # warm-up
    t_ex = alternate({"batch": lambda: ex_search(xq)}, args.reps)["batch"]
    t_ex1 = alternate_single({"single": ex_search}, single)["single"]
    ex_ids = ex_search(xq)[1]
    qps_ex, qps_ex1 = len(xq) / t_ex, 1 / t_ex1
    codebooks, codes_c = pq.codebooks_, np.ascontiguousarray(pq.codes_)
    rows = [["exhaustive AQD (skquant)", "-", fmt(qps_ex1), "1.0x", fmt(qps_ex), "1.0x",
             "1.000", f"{recall_ids(ex_ids[: args.exact_queries], exact_i):.3f}"]]
    print(f"exhaustive: {qps_ex1:.1f} / {qps_ex:.1f} qps", flush=True)
    # faiss's own exhaustive reference: every cell probed.
    ivf_index.nprobe = args.n_lists
    faiss_ex_d, faiss_ex_i = ivf_index.search(xq, k)
    for n_probe in args.n_probe:
        pq.set_params(n_probe=n_probe)
        ivf_index.nprobe = n_probe

        def sk_ivf(q):
            return pq.kneighbors(q, n_neighbors=k)

        def faiss_ivf(q):
            return ivf_index.search(q, k)

        sk_ivf(xq[:64])
        faiss_ivf(xq[:64])
        tb = alternate({"sk": lambda: sk_ivf(xq), "faiss": lambda: faiss_ivf(xq)}, args.reps)
        t1 = alternate_single({"sk": sk_ivf, "faiss": faiss_ivf}, single)
        sk_ids = sk_ivf(xq)[1]
        faiss_ids = faiss_ivf(xq)[1]
        ties, _ = recall_with_ties(codebooks, codes_c, xq, sk_ids, ex_ids)
        # faiss against its own exhaustive search (residual codes), ties by
        # its own distances.
        faiss_d = faiss_ivf(xq)[0]
        bound = faiss_ex_d.max(axis=1, keepdims=True) * (1 + 1e-5) + 1e-9
        ties_f = float(np.mean(faiss_d <= bound))
        for name, key, rec in [("skquant IVF (direct codes)", "sk", ties),
                               ("faiss IndexIVFPQ (residual codes)", "faiss", ties_f)]:
            ids = sk_ids if key == "sk" else faiss_ids
            qb, q1 = len(xq) / tb[key], 1 / t1[key]
            rows.append([name, n_probe, fmt(q1), f"{q1 / qps_ex1:.1f}x", fmt(qb),
                         f"{qb / qps_ex:.1f}x", f"{rec:.3f}", f"{recall_ids(ids[: args.exact_queries], exact_i):.3f}"])
        print(f"n_probe={n_probe}: " + " | ".join(" ".join(r[2:]) for r in rows[-2:]),
              flush=True)

    text = [
        f"### Non-exhaustive search: N = {n:,} (Gaussian mixture, {N_CENTRES} centres), "
        f"M = {M}, K = 256, n_lists = {args.n_lists}, k = {k}, {threads} threads",
        "",
        f"Batch = {len(xq)} queries (median of {args.reps}); single = median over "
        f"{args.single} one-query calls. Speed-ups are to exhaustive skquant search "
        "in the same run. Recall against exhaustive search counts ties (an item also counts "
        "when its distance is within the largest distance of the exhaustive top-10): skquant "
        "against its exhaustive AQD (= faiss `IndexPQ`), faiss `IndexIVFPQ` against itself "
        "with every cell probed (its residual codes are other codes of the same size, so "
        "its recall against exact search is the cross-method comparison). "
        f"Build: coarse k-means {t_train:.1f} s (on {len(sample):,} reconstructions), "
        f"cell assignment of {n:,} codes {t_cells:.1f} s.",
        "",
        table(["method", "n_probe", "qps single", "speed-up", f"qps batch {len(xq)}",
               "speed-up", "recall@10 vs own exhaustive",
               f"recall@10 vs exact ({args.exact_queries} queries)"], rows),
    ]
    out.append("\n".join(text))
    print("\n".join(text), flush=True)


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
    parser.add_argument("--ivf", action="store_true", help="run the 10M inverted-file part")
    parser.add_argument("--no-exhaustive", action="store_true")
    parser.add_argument("--ivf-n", type=int, default=10_000_000)
    parser.add_argument("--ivf-queries", type=int, default=1000)
    parser.add_argument("--n-lists", type=int, default=2048)
    parser.add_argument("--exact-queries", type=int, default=200,
                        help="queries with exact (float) ground truth, the first ones")
    parser.add_argument("--n-probe", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "search.md"))
    args = parser.parse_args()
    if args.quick:
        args.n, args.m, args.queries, args.single, args.reps = 100_000, [8], 200, 10, 2
        args.ivf_n, args.n_lists, args.n_probe, args.ivf_queries = 200_000, 256, [4, 16], 200
        args.exact_queries = 100

    import faiss
    import sklearn
    import torch

    mixture = Mixture(seed=0)
    out = [
        "## Search benchmark (`benchmarks/bench_search.py`)",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"visible; numpy {np.__version__}, scikit-learn {sklearn.__version__}, "
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
