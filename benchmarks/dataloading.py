"""Data-loading throughput: scvi-tools' default loader against cellvi's data path.

Same data, same settings, same process, one torch thread. For each size it prints

* loader epochs per second: one shuffled pass over the training cells, minibatches of 128,
  every minibatch materialised as scvi's dense dict of tensors (nothing else timed);
* the same pass over a backed (on-disk) h5ad, scvi's loader (scattered row reads per minibatch)
  against cellvi's chunked reader (``--backed first``, the default: at the first size only;
  ``all``; ``none``), one round each;
* with ``--train``: seconds per training epoch of ``scvi.model.SCVI`` with each data path
  (the model's compute is the same, so the difference is the data path).

Peak memory is the resident-set growth during one pass (first round; :func:`_common.measure`).
``--json PATH`` writes the figures as a :class:`_common.Report` (ratios scvi / cellvi of the best
wall time of a pass, for ``run_all.py``).

Usage::

    flock /tmp/cellvi-bench.lock .venv/bin/python benchmarks/dataloading.py   # 20k and 100k cells x 2k genes
    .venv/bin/python benchmarks/dataloading.py --sizes 20000 --train # plus one SCVI epoch each
    .venv/bin/python benchmarks/dataloading.py --sizes 20000 --backed none --json out.json

On a machine with CUDA the loader figures are also taken with the data on the GPU
(``data_path="device"``) and streamed from the CPU (``"stream"``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import anndata
import numpy as np
import scvi
import torch
from scipy import sparse
from scvi.dataloaders import AnnDataLoader

from cellvi.dataloaders import BackedDataLoader, DataPathMixin, DeviceDataLoader

sys.path.insert(0, str(Path(__file__).parent))
from _common import Report, add_json_argument, measure


def sparse_counts(n_cells: int, n_genes: int, density: float, seed: int = 0) -> anndata.AnnData:
    """Poisson-like sparse counts (CSR float32) with a per-cell depth and per-gene rate."""
    rng = np.random.default_rng(seed)
    nnz_per_cell = rng.binomial(n_genes, density, n_cells)
    indptr = np.concatenate([[0], np.cumsum(nnz_per_cell)])
    # sorted distinct genes per cell: sample with replacement then keep the canonical format
    gene_p = rng.gamma(0.5, 1.0, n_genes)
    gene_p /= gene_p.sum()
    indices = rng.choice(n_genes, indptr[-1], p=gene_p).astype(np.int32)
    data = (1 + rng.poisson(2.0, indptr[-1])).astype(np.float32)
    X = sparse.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes))
    X.sum_duplicates()
    adata = anndata.AnnData(X=X)
    adata.obs["batch"] = rng.choice(["a", "b"], n_cells)
    return adata


def epoch_seconds(make_loader) -> float:
    loader = make_loader()
    start = time.perf_counter()
    for batch in loader:
        batch["X"].sum()  # touch the minibatch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _to_cuda(make_loader):
    for batch in make_loader():
        yield {k: v.to("cuda") for k, v in batch.items()}


def interleaved_best(cases: dict, repeats: int, peaks: dict | None = None) -> dict[str, float]:
    """Best time of each case over ``repeats`` rounds, the cases alternating within each round
    (so that a load change on a shared machine hits all of them alike). With ``peaks``, the peak
    memory growth (MiB) of each case's first pass is stored there."""
    best = dict.fromkeys(cases, np.inf)
    for i in range(repeats):
        for name, make in cases.items():
            if i == 0 and peaks is not None:
                m = measure(partial(epoch_seconds, make))
                seconds, peaks[name] = m.result, m.peak_mb
            else:
                seconds = epoch_seconds(make)
            best[name] = min(best[name], seconds)
    return best


class FastSCVI(DataPathMixin, scvi.model.SCVI):
    pass


def train_epoch_seconds(adata, data_path: str, accelerator: str) -> float:
    scvi.settings.seed = 0
    model = FastSCVI(adata)
    start = time.perf_counter()
    model.train(
        max_epochs=1,
        data_path=data_path,
        train_size=0.9,
        batch_size=128,
        accelerator=accelerator,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train", action="store_true", help="also time one SCVI training epoch per path")
    parser.add_argument(
        "--backed",
        choices=["none", "first", "all"],
        default="first",
        help="time a backed (on-disk h5ad) AnnData, scvi's loader vs chunks, at no / the first / every size",
    )
    add_json_argument(parser)
    args = parser.parse_args(argv)
    report = Report(
        "dataloading",
        settings={
            "sizes": args.sizes, "genes": args.genes, "density": args.density, "batch_size": 128,
            "repeats": args.repeats, "backed": args.backed, "train": args.train, "threads": 1,
        },
    )  # fmt: skip
    rows = []

    torch.set_num_threads(1)
    scvi.settings.dl_num_workers = 0
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, scvi-tools {scvi.__version__}, 1 torch thread, cuda={cuda}")
    print(f"{args.genes} genes, density {args.density}, minibatch 128, shuffled, best of {args.repeats}")
    header = f"{'cells':>8} {'loader':<28} {'s/epoch':>9} {'epochs/s':>9} {'vs scvi':>8}"
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        adata = sparse_counts(n, args.genes, args.density)
        FastSCVI.setup_anndata(adata, batch_key="batch")
        manager = FastSCVI(adata).adata_manager
        idx = np.random.default_rng(0).permutation(n)[: int(0.9 * n)]
        kw = {"indices": idx, "batch_size": 128, "shuffle": True}
        cases = {
            "scvi AnnDataLoader": partial(AnnDataLoader, manager, **kw),
            "cellvi device (cpu)": partial(DeviceDataLoader, manager, **kw),
        }
        if cuda:
            cases["cellvi device (cuda)"] = partial(DeviceDataLoader, manager, device="cuda", **kw)
            cases["cellvi stream (cpu -> cuda)"] = partial(
                DeviceDataLoader, manager, device="cuda", stream=True, **kw
            )
            # scvi's loader plus the copy to the GPU that a training step makes
            cases["scvi AnnDataLoader -> cuda"] = partial(_to_cuda, partial(AnnDataLoader, manager, **kw))
        peaks = {}
        times = interleaved_best(cases, args.repeats, peaks)
        reference = times["scvi AnnDataLoader"]
        for name, seconds in times.items():
            print(f"{n:>8} {name:<28} {seconds:>9.3f} {1 / seconds:>9.2f} {reference / seconds:>7.2f}x")
            rows.append([n, name, seconds, 1 / seconds, round(reference / seconds, 2), round(peaks[name])])
        report.speed(
            f"loader epoch, {n} cells, in memory (cpu)", times["cellvi device (cpu)"], reference, "wall"
        )
        report.memory(
            f"loader epoch, {n} cells, in memory", peaks["cellvi device (cpu)"], peaks["scvi AnnDataLoader"]
        )
        if cuda:
            report.speed(
                f"loader epoch, {n} cells, data on cuda",
                times["cellvi device (cuda)"],
                times["scvi AnnDataLoader -> cuda"],
                "wall",
            )
        if args.backed == "all" or (args.backed == "first" and n == args.sizes[0]):
            with tempfile.TemporaryDirectory() as tmp:
                path = f"{tmp}/data.h5ad"
                adata.write_h5ad(path)
                backed = anndata.read_h5ad(path, backed="r")
                FastSCVI.setup_anndata(backed, batch_key="batch")
                bmanager = FastSCVI(backed).adata_manager
                cases = {
                    "scvi AnnDataLoader, backed": partial(AnnDataLoader, bmanager, **kw),
                    "cellvi backed (chunks)": partial(BackedDataLoader, bmanager, **kw),
                }
                peaks = {}
                times = interleaved_best(cases, 1, peaks)
                backed.file.close()
            reference = times["scvi AnnDataLoader, backed"]
            for name, seconds in times.items():
                print(f"{n:>8} {name:<28} {seconds:>9.3f} {1 / seconds:>9.2f} {reference / seconds:>7.2f}x")
                rows.append(
                    [n, name, seconds, 1 / seconds, round(reference / seconds, 2), round(peaks[name])]
                )
            report.speed(
                f"loader epoch, {n} cells, backed h5ad", times["cellvi backed (chunks)"], reference, "wall"
            )
            report.memory(
                f"loader epoch, {n} cells, backed h5ad",
                peaks["cellvi backed (chunks)"],
                peaks["scvi AnnDataLoader, backed"],
            )
        if args.train:
            accelerator = "gpu" if cuda else "cpu"
            times = {path: train_epoch_seconds(adata, path, accelerator) for path in ("scvi", "device")}
            for path, seconds in times.items():
                print(
                    f"{n:>8} {'SCVI train, ' + path:<28} {seconds:>9.3f} {1 / seconds:>9.2f} "
                    f"{times['scvi'] / seconds:>7.2f}x"
                )
                rows.append(
                    [n, f"SCVI train, {path}", seconds, 1 / seconds, round(times["scvi"] / seconds, 2), None]
                )
            report.speed(f"SCVI training epoch, {n} cells", times["device"], times["scvi"], "wall")
    report.table(
        "Loader passes (one shuffled epoch of 90% of the cells, minibatch 128, best wall time)",
        ["cells", "loader", "s/epoch", "epochs/s", "vs scvi", "peak MiB"],
        rows,
    )
    report.note(
        "original = scvi-tools' AnnDataLoader; cellvi = cellvi.dataloaders on the same AnnData manager"
    )
    report.write(args.json)


if __name__ == "__main__":
    main()
