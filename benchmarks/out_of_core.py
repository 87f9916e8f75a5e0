"""Out-of-core training and loading: pyrovi's on-disk reader vs annbatch vs in memory (CPU).

For each size, writes the data once as an h5ad file whose CSR count matrix is larger than a
memory budget, a piece at a time (cells resampled from the PBMC 10k data in
``../shared/data``, its 2,000 genes of highest variance, as ``benchmarks/scaling.py`` does;
simulated clustered counts when the shared data are absent), then copies the same matrix
and ``obs`` into two zarr stores, which annbatch can read (it cannot read h5ad): one in
annbatch's own layout (``annbatch.write_sharded``: zarr v3, chunks of 64 cells' worth of
values, LZ4-compressed, sharded) and one as anndata writes it (``AnnData.write_zarr``,
zarr v3). The copies are written from the matrix in memory by a separate process (the
writer is not measured).

Then, each in its own process so that its peak resident memory is its own:

* **loading**: one epoch of shuffled training minibatches (batch 128, the 90% training
  cells of the split, no model), cells/s of wall-clock time and per CPU-second of the
  process (the machine is shared; CPU time counts the loader's threads too), for
  pyrovi's ``OnDiskCellData`` (from the h5ad file and from each zarr store), pyrovi's
  ``AnnbatchCellData`` (annbatch reading, pyrovi's block-shuffling plan) and annbatch's own
  ``Loader`` with its ``RandomSampler`` over all cells (the same chunk and buffer sizes,
  minibatches densified as training needs them), the reference for annbatch as it comes;
* **training**: the default SCVI (batch 128, 90/10 split, validation every epoch) from the
  h5ad file loaded into memory, with ``OnDiskCellData`` from the h5ad file, and with
  ``OnDiskCellData`` and ``AnnbatchCellData`` from each zarr store.

Results go to the "Out-of-core training" section of ``benchmarks/RESULTS.md`` and to
``RESULTS.out_of_core.json``.

Command: ``python benchmarks/out_of_core.py --cells 100000 300000 --threads 1``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path

from _common import SHARED, cpu_name, write_section

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Out-of-core training (pyrovi SCVI, CPU)"
SOURCE = "pbmc10k_5k_rna_2batch.h5ad"
N_GENES = 2000
PIECE = 20_000  # cells generated and appended at a time
BATCH_SIZE = 128

#: Where each loader reads from: the file's suffix in ``--path``'s stem.
FILES = {"h5ad": ".h5ad", "zarr-annbatch": ".annbatch.zarr", "zarr-anndata": ".anndata.zarr"}
#: (loader, file) pairs of the loading measurements and of the training runs.
LOADING = [("pyrovi", "h5ad"), ("pyrovi", "zarr-annbatch"), ("annbatch", "zarr-annbatch"),
           ("annbatch-native", "zarr-annbatch"), ("pyrovi", "zarr-anndata"),
           ("annbatch", "zarr-anndata"), ("annbatch-native", "zarr-anndata")]
TRAINING = [("memory", "h5ad"), ("pyrovi", "h5ad"), ("pyrovi", "zarr-annbatch"),
            ("annbatch", "zarr-annbatch"), ("pyrovi", "zarr-anndata"),
            ("annbatch", "zarr-anndata")]
LABELS = {"memory": "in memory", "pyrovi": "pyrovi OnDiskCellData",
          "annbatch": "pyrovi AnnbatchCellData (annbatch reads)",
          "annbatch-native": "annbatch Loader + RandomSampler"}

logger = logging.getLogger("out_of_core")


def source_counts():
    """The small source to resample from: CSR counts (2,000 genes) and a batch per cell."""
    import anndata
    import numpy as np

    path = SHARED / SOURCE
    if not path.exists():
        from pyrovi.datasets import simulate_counts

        logger.info("%s not found: resampling simulated counts instead.", path)
        source = simulate_counts(n_cells=10_000, n_genes=N_GENES, n_clusters=8,
                                 mean_library=1500.0, seed=0)
        return source.X.tocsr().astype(np.float32), source.obs["batch"].astype(str).to_numpy()
    source = anndata.read_h5ad(path)
    x = source.X.tocsr().astype(np.float32)
    mean = np.asarray(x.mean(0)).ravel()
    variance = np.asarray(x.multiply(x).mean(0)).ravel() - mean**2
    x = x[:, np.sort(np.argsort(-variance)[:N_GENES])]
    keep = np.flatnonzero(np.diff(x.indptr) > 0)
    return x[keep], source.obs["batch"].astype(str).to_numpy()[keep]


def write_dataset(path: Path, n_cells: int, seed: int = 0) -> dict:
    """Write ``n_cells`` resampled cells to an h5ad file, ``PIECE`` cells at a time."""
    import anndata
    import h5py
    import numpy as np
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    x, batch = source_counts()
    rng = np.random.default_rng(seed)
    rows = rng.choice(x.shape[0], n_cells, replace=True)
    obs = pd.DataFrame({"batch": pd.Categorical(batch[rows])},
                       index=[f"cell{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=[f"gene{g}" for g in range(x.shape[1])])
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        for start in range(0, n_cells, PIECE):
            piece = x[rows[start : start + PIECE]]
            if start == 0:
                write_elem(f, "X", piece)
            else:
                sparse_dataset(f["X"]).append(piece)
        nnz = int(f["X"]["indptr"][-1])
    check = anndata.read_h5ad(path, backed="r")
    assert check.shape == (n_cells, x.shape[1]), check.shape
    return {"cells": n_cells, "genes": int(x.shape[1]), "nonzero": nnz,
            "csr_mb": (nnz * 8 + (n_cells + 1) * 8) / 1e6,
            "file_mb": {"h5ad": path.stat().st_size / 1e6}}


def write_zarr_copies(h5ad: Path) -> dict:
    """Copy the h5ad file's matrix and tables into the two zarr layouts; their sizes in MB."""
    import annbatch
    import anndata
    import numpy as np
    import zarr

    adata = anndata.read_h5ad(h5ad)
    sizes = {}
    for name in ("zarr-annbatch", "zarr-anndata"):
        path = data_path(h5ad, name)
        shutil.rmtree(path, ignore_errors=True)
        with warnings.catch_warnings():  # anndata's notices about its move to zarr v3
            warnings.simplefilter("ignore")
            if name == "zarr-annbatch":
                annbatch.write_sharded(zarr.open_group(path, mode="w"), adata)
            else:
                with anndata.settings.override(zarr_write_format=3):
                    adata.write_zarr(path)
        copy = anndata.read_zarr(path)
        assert (copy.X != adata.X).nnz == 0 and np.array_equal(copy.obs["batch"],
                                                               adata.obs["batch"])
        sizes[name] = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6
    return sizes


def data_path(path: Path, file: str) -> Path:
    """The copy of the data set at ``path`` (the h5ad file) in ``file``'s format."""
    return path.with_name(path.name.removesuffix(".h5ad") + FILES[file])


def memory_mb() -> tuple[float, float]:
    """Current and peak resident memory of this process (Linux ``/proc``), in MB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text()
                  .splitlines() if ":" in line)
    return (int(status["VmRSS"].split()[0]) / 1e3, int(status["VmHWM"].split()[0]) / 1e3)


def reset_peak_rss() -> None:
    """Start a new peak of resident memory (Linux >= 4.0), to measure one phase on its own."""
    Path("/proc/self/clear_refs").write_text("5")


def count_reading(reading: dict) -> None:
    """Add the time spent inside file reads, by either loader, to ``reading["seconds"]``."""
    from pyrovi.data import OnDiskMatrix

    original = OnDiskMatrix.read

    def timed_read(self, start, stop):
        began = time.perf_counter()
        block = original(self, start, stop)
        reading["seconds"] += time.perf_counter() - began
        reading["reads"] += 1
        return block

    OnDiskMatrix.read = timed_read
    try:
        from annbatch import Loader
    except ImportError:
        return
    # annbatch reads a whole buffer in one coroutine, run on zarr's event loop.
    index_datasets = Loader._index_datasets

    async def timed_index(self, *args, **kwargs):
        began = time.perf_counter()
        out = await index_datasets(self, *args, **kwargs)
        reading["seconds"] += time.perf_counter() - began
        reading["reads"] += 1
        return out

    Loader._index_datasets = timed_index


def open_data(path: Path, loader: str, file: str):
    """The data set opened as ``loader`` reads it, set up for SCVI."""
    import anndata

    import pyrovi

    location = data_path(path, file)
    if loader == "memory":
        adata = anndata.read_h5ad(location)
    elif file == "h5ad":
        adata = anndata.read_h5ad(location, backed="r")
    else:
        adata = pyrovi.data.read_ondisk(location)
    pyrovi.SCVI.setup_anndata(adata, batch_key="batch")
    return adata


def loader_kwargs(loader: str, args) -> dict:
    options = {"chunk_size": args.chunk_size, "n_chunks_in_buffer": args.n_chunks}
    if loader in ("pyrovi", "annbatch"):
        options["loader"] = loader
    return options


def run_training(path: Path, loader: str, file: str, args) -> dict:
    """Train SCVI from ``file`` with ``loader``; time per epoch, peak RSS, reading time."""
    import torch

    import pyrovi

    torch.set_num_threads(args.threads)
    if loader == "annbatch":
        import annbatch  # noqa: F401 - its import is setup, not an epoch's time
    rss_imports, _ = memory_mb()
    reading = {"seconds": 0.0, "reads": 0}
    count_reading(reading)
    began = time.perf_counter()
    adata = open_data(path, loader, file)
    torch.manual_seed(0)
    model = pyrovi.SCVI(adata)
    setup_s = time.perf_counter() - began
    rss_with_data, peak_setup = memory_mb()
    reset_peak_rss()
    reading.update(seconds=0.0, reads=0)
    load = os.getloadavg()[0]
    began, cpu = time.perf_counter(), time.process_time()
    model.train(max_epochs=args.epochs, batch_size=BATCH_SIZE, device="cpu",
                progress_bar=False, seed=0, loader_kwargs=loader_kwargs(loader, args))
    seconds = (time.perf_counter() - began) / args.epochs
    cpu_seconds = (time.process_time() - cpu) / args.epochs
    _, peak = memory_mb()
    return {
        "kind": "training", "loader": loader, "file": file, "epochs": args.epochs,
        "setup_s": setup_s, "s_per_epoch": seconds, "cpu_s_per_epoch": cpu_seconds,
        "cells_per_s": adata.n_obs / seconds,
        "read_s_per_epoch": reading["seconds"] / args.epochs,
        "reads_per_epoch": reading["reads"] / args.epochs,
        "rss_imports_mb": rss_imports, "rss_with_data_mb": rss_with_data,
        "peak_setup_rss_mb": peak_setup, "peak_train_rss_mb": peak,
        "elbo_validation": float(model.history["elbo_validation"].iloc[-1]),
        "load_average": load,
    }


def run_loading(path: Path, loader: str, file: str, args) -> dict:
    """One epoch of shuffled training minibatches from ``file`` with ``loader``, no model."""
    import numpy as np
    import torch

    from pyrovi.data import build_cell_tensors, get_registry
    from pyrovi.data.streaming import dense_rows

    torch.set_num_threads(args.threads)
    adata = open_data(path, loader, file)
    n_train = int(np.ceil(0.9 * adata.n_obs))
    train = np.sort(np.random.default_rng(0).permutation(adata.n_obs)[:n_train])
    rss_with_data, _ = memory_mb()
    reset_peak_rss()
    load = os.getloadavg()[0]
    if loader == "annbatch-native":
        import annbatch

        reader = annbatch.Loader(chunk_size=args.chunk_size, preload_nchunks=args.n_chunks,
                                 batch_size=BATCH_SIZE, shuffle=True, preload_to_gpu=False,
                                 rng=np.random.default_rng(0)).add_dataset(adata.X)
        device = torch.device("cpu")
        began, cpu = time.perf_counter(), time.process_time()
        # Its sampler reads every cell of a contiguous range (no split); the minibatches are
        # densified as the training loop needs them.
        cells = sum(dense_rows(out["X"], device).shape[0] for out in reader)
    else:
        if loader == "annbatch":
            import annbatch  # noqa: F401 - setup, not loading time
        data = build_cell_tensors(adata, get_registry(adata), "cpu",
                                  loader_kwargs=loader_kwargs(loader, args))
        torch.manual_seed(0)
        began, cpu = time.perf_counter(), time.process_time()
        cells = sum(index.numel() for index, _ in
                    data.training_batches(torch.as_tensor(train), BATCH_SIZE))
    seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - cpu
    _, peak = memory_mb()
    return {"kind": "loading", "loader": loader, "file": file, "cells": cells,
            "seconds": seconds, "cpu_seconds": cpu_seconds, "cells_per_s": cells / seconds,
            "cells_per_cpu_s": cells / cpu_seconds, "rss_with_data_mb": rss_with_data,
            "peak_rss_mb": peak, "load_average": load}


def in_child(kind: str, path: Path, loader: str, file: str, args) -> dict:
    """Run one measurement in a fresh process and return its result."""
    command = [sys.executable, __file__, "--child", kind, loader, file, "--path", str(path),
               "--epochs", str(args.epochs), "--threads", str(args.threads),
               "--chunk-size", str(args.chunk_size), "--n-chunks", str(args.n_chunks)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for attempt in (1, 2):
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode == 0:
            return json.loads(done.stdout.strip().splitlines()[-1])
        # Once more: on a shared machine a working tree being edited can fail one import.
        logger.warning("%s %s %s failed (attempt %d):\n%s", kind, loader, file, attempt,
                       done.stderr[-3000:])
    raise RuntimeError(f"{kind} {loader} {file} failed twice; see the log above.")


def median_of(runs: list[dict]) -> dict:
    """The runs' median of every number, the other fields of the first, and the runs."""
    summary = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, float):
            summary[key] = statistics.median(r[key] for r in runs)
    summary["repeats"] = len(runs)
    summary["runs"] = runs
    return summary


def measure(path: Path, kind: str, pairs: list[tuple[str, str]], repeats: int,
            args) -> list[dict]:
    """Every (loader, file) of ``pairs`` ``repeats`` times, alternating their order."""
    runs = {pair: [] for pair in pairs}
    for r in range(repeats):
        for pair in pairs if r % 2 == 0 else pairs[::-1]:
            runs[pair].append(in_child(kind, path, *pair, args))
            logger.info("%s %s: %s", kind, pair, {k: v for k, v in runs[pair][-1].items()
                                                   if isinstance(v, float)})
    return [median_of(runs[pair]) for pair in pairs]


def versions() -> str:
    import pyro
    import torch

    import pyrovi

    packages = ", ".join(f"{name} {version(name)}"
                         for name in ("annbatch", "anndata", "zarr", "numba", "h5py"))
    return (f"pyrovi {pyrovi.__version__}, pyro-ppl {pyro.__version__}, torch "
            f"{torch.__version__}, {packages}, Python {platform.python_version()}")


def markdown(results: list[dict], args) -> str:
    data = results[0]["data"]
    loads = [run["load_average"] for d in results for kind in ("loading", "training")
             for r in d[kind] for run in r["runs"]]
    lines = [
        SECTION,
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores shared with other jobs (1-minute "
        f"load average at the runs' starts {min(loads):.1f} to {max(loads):.1f}), "
        f"{args.threads} torch thread(s), {platform.platform()}. Versions: {versions()}. "
        f"Date: {time.strftime('%Y-%m-%d')}.",
        "",
        f"Cells resampled from `{SOURCE}` ({data['genes']:,} genes, "
        f"{100 * data['nonzero'] / (data['cells'] * data['genes']):.0f}% non-zero), written "
        "once per size as a CSR h5ad file and copied into two zarr stores that annbatch can "
        "read (it cannot read h5ad): `annbatch.write_sharded` (annbatch's layout: zarr v3, "
        "chunks of 64 cells' worth of values, LZ4, sharded) and `AnnData.write_zarr` (zarr "
        "v3, anndata's chunks, Zstandard). Every measurement runs in its own process; the "
        f"numbers are medians of {args.repeats} (loading) and {args.train_repeats} "
        "(training) runs, alternating the order of the loaders. Both pyrovi loaders use "
        f"`chunk_size={args.chunk_size}`, `n_chunks_in_buffer={args.n_chunks}` (buffer "
        f"{args.chunk_size * args.n_chunks:,} rows), annbatch's own loader "
        f"`chunk_size={args.chunk_size}`, `preload_nchunks={args.n_chunks}`. The files are "
        "in the page cache (local disk, just written).",
        "",
        "Loaders: *pyrovi OnDiskCellData* (pyrovi's reader: one synchronous read per chunk of "
        "the file); *pyrovi AnnbatchCellData* (`loader_kwargs={\"loader\": \"annbatch\"}`: "
        "the same block-shuffling plan, each buffer read by `annbatch.Loader` as one "
        "concurrent zarr selection); *annbatch Loader + RandomSampler* (annbatch as it comes: "
        "its own chunk sampler over all cells, no train/validation split, numpy generator; "
        "the minibatches densified as training needs them).",
        "",
        f"### Loading: one epoch of training minibatches (batch {BATCH_SIZE}, no model)",
        "",
        "Cells/s of wall-clock time and per CPU-second of the process (all its threads: "
        "zarr decodes on a thread pool); peak RSS during the epoch (`VmHWM`, reset after "
        "opening the data) and what the epoch added to the RSS of the opened data (the "
        "loader's buffers).",
        "",
        "| cells | file | loader | cells/s | cells/CPU-s | peak RSS MB | epoch adds MB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for d in results:
        for r in d["loading"]:
            lines.append(
                f"| {d['data']['cells']:,} | {r['file']} ({d['data']['file_mb'][r['file']]:.0f}"
                f" MB) | {LABELS[r['loader']]} | {r['cells_per_s']:,.0f} | "
                f"{r['cells_per_cpu_s']:,.0f} | {r['peak_rss_mb']:.0f} | "
                f"{r['peak_rss_mb'] - r['rss_with_data_mb']:.0f} |")
    lines += [
        "",
        f"### Training: default SCVI, batch {BATCH_SIZE}, 90/10 split, validation every epoch, "
        f"{args.epochs} epoch(s) a run",
        "",
        "Setup: reading (in memory) or opening and the count validation pass (on disk), "
        "`setup_anndata` and the model. s/epoch and cells/s: wall clock of `train()` (with "
        "validation); CPU s: the process's CPU time per epoch. Reading: time inside file "
        "reads during `train()` (pyrovi: `OnDiskMatrix.read`; annbatch: its buffer fetch). "
        "Peak training RSS: `VmHWM` during `train()`; training adds: that peak less the RSS "
        "before `train()`.",
        "",
        "| cells | CSR MB | counts | loader | setup s | s/epoch | cells/s | CPU s/epoch | "
        "reading s | peak training RSS MB | training adds MB | validation ELBO |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for d in results:
        for r in d["training"]:
            counts = "in memory" if r["loader"] == "memory" else f"on disk, {r['file']}"
            lines.append(
                f"| {d['data']['cells']:,} | {d['data']['csr_mb']:.0f} | {counts} | "
                f"{LABELS[r['loader']] if r['loader'] != 'memory' else '-'} | "
                f"{r['setup_s']:.1f} | {r['s_per_epoch']:.1f} | {r['cells_per_s']:,.0f} | "
                f"{r['cpu_s_per_epoch']:.1f} | {r['read_s_per_epoch']:.2f} | "
                f"**{r['peak_train_rss_mb']:.0f}** | "
                f"{r['peak_train_rss_mb'] - r['rss_with_data_mb']:.0f} | "
                f"{r['elbo_validation']:.2f} |")
    cells = " ".join(str(d["data"]["cells"]) for d in results)
    lines += ["", f"Command: `python benchmarks/out_of_core.py --cells {cells} --budget-mb "
              f"{args.budget_mb} --threads {args.threads} --epochs {args.epochs} --repeats "
              f"{args.repeats} --train-repeats {args.train_repeats}`", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[100_000, 300_000])
    parser.add_argument("--budget-mb", type=int, default=256,
                        help="each dataset's in-memory CSR size must exceed this")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="runs per loading measurement")
    parser.add_argument("--train-repeats", type=int, default=3, help="runs per training one")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--n-chunks", type=int, default=16)
    parser.add_argument("--path", type=Path,
                        default=Path(os.environ.get("TMPDIR", "/tmp")) / "pyrovi_ooc.h5ad")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "LOADER", "FILE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.child:
        kind, loader, file = args.child
        if kind == "write":
            result = write_zarr_copies(args.path)
        else:
            run = run_training if kind == "training" else run_loading
            result = run(args.path, loader, file, args)
        print(json.dumps(result))
        return
    results = []
    for n_cells in args.cells:
        path = args.path.with_name(f"{args.path.stem}_{n_cells}.h5ad")
        data = write_dataset(path, n_cells)
        if data["csr_mb"] <= args.budget_mb:
            raise SystemExit(f"{data['csr_mb']:.0f} MB of counts is not over the "
                             f"{args.budget_mb} MB budget; ask for more --cells.")
        data["file_mb"].update(in_child("write", path, "-", "-", args))
        logger.info("wrote %s and its zarr copies: %s", path, data)
        results.append({
            "data": data,
            "loading": measure(path, "loading", LOADING, args.repeats, args),
            "training": measure(path, "training", TRAINING, args.train_repeats, args),
        })
        for file in FILES:
            location = data_path(path, file)
            shutil.rmtree(location) if location.is_dir() else location.unlink()
    text = markdown(results, args)
    write_section(RESULTS, text, SECTION)
    RESULTS.with_suffix(".out_of_core.json").write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
