"""Out-of-core training: peak memory and time per epoch, counts on disk vs in memory (CPU).

Writes an h5ad file whose CSR count matrix is larger than a memory budget, a piece at a
time (cells resampled from the PBMC 10k data in ``../shared/data``, its 2,000 genes of
highest variance, as ``benchmarks/scaling.py`` does; simulated clustered counts when the
shared data are absent), so that not even the writer holds the whole matrix. Then, each in
its own process so that its peak resident memory is its own, trains the default SCVI
(batch 128, 90/10 split, validation every epoch) from the file loaded into memory
(``anndata.read_h5ad(path)``) and from the file left on disk
(``anndata.read_h5ad(path, backed="r")``, block-shuffled buffers of
``chunk_size * n_chunks_in_buffer`` rows). Results go to the "Out-of-core training" section
of ``benchmarks/RESULTS.md`` and to ``RESULTS.out_of_core.json``.

Command: ``python benchmarks/out_of_core.py --cells 100000 300000 --budget-mb 256 --threads 1``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from _common import SHARED, cpu_name, write_section

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION = "## Out-of-core training (pyrovi SCVI, CPU)"
SOURCE = "pbmc10k_5k_rna_2batch.h5ad"
N_GENES = 2000
PIECE = 20_000  # cells generated and appended at a time

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
            "file_mb": path.stat().st_size / 1e6}


def memory_mb() -> tuple[float, float]:
    """Current and peak resident memory of this process (Linux ``/proc``), in MB."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text()
                  .splitlines() if ":" in line)
    return (int(status["VmRSS"].split()[0]) / 1e3, int(status["VmHWM"].split()[0]) / 1e3)


def run_one(path: Path, mode: str, epochs: int, threads: int, chunk_size: int,
            n_chunks: int) -> dict:
    """Train from ``path`` loaded (``memory``) or left on disk (``ondisk``); time and RSS."""
    import anndata
    import torch

    import pyrovi
    from pyrovi.data import OnDiskMatrix

    torch.set_num_threads(threads)
    rss_imports, _ = memory_mb()
    reading = {"seconds": 0.0, "reads": 0, "rows": 0}
    original = OnDiskMatrix.read

    def timed_read(self, start, stop):  # how much of an epoch is spent reading the file
        began = time.perf_counter()
        block = original(self, start, stop)
        reading["seconds"] += time.perf_counter() - began
        reading["reads"] += 1
        reading["rows"] += stop - start
        return block

    OnDiskMatrix.read = timed_read
    began = time.perf_counter()
    adata = (anndata.read_h5ad(path) if mode == "memory"
             else anndata.read_h5ad(path, backed="r"))
    pyrovi.SCVI.setup_anndata(adata, batch_key="batch")
    torch.manual_seed(0)
    model = pyrovi.SCVI(adata)
    setup_s = time.perf_counter() - began
    rss_with_data, peak_setup = memory_mb()
    # Reset the peak (Linux >= 4.0), so that the training peak is measured on its own.
    Path("/proc/self/clear_refs").write_text("5")
    reading.update(seconds=0.0, reads=0, rows=0)
    began = time.perf_counter()
    model.train(max_epochs=epochs, batch_size=128, device="cpu", progress_bar=False, seed=0,
                loader_kwargs={"chunk_size": chunk_size, "n_chunks_in_buffer": n_chunks})
    seconds = (time.perf_counter() - began) / epochs
    _, peak = memory_mb()
    return {
        "mode": mode, "epochs": epochs, "setup_s": setup_s, "s_per_epoch": seconds,
        "read_s_per_epoch": reading["seconds"] / epochs, "reads_per_epoch":
        reading["reads"] / epochs, "rows_read_per_epoch": reading["rows"] / epochs,
        "rss_imports_mb": rss_imports, "rss_with_data_mb": rss_with_data,
        "peak_setup_rss_mb": peak_setup, "peak_train_rss_mb": peak,
        "peak_rss_mb": max(peak, peak_setup),
        "elbo_validation": float(model.history["elbo_validation"].iloc[-1]),
    }


def markdown(runs: list[tuple[dict, dict]], args) -> str:
    import pyro
    import torch

    import pyrovi

    data = runs[0][0]
    lines = [
        SECTION,
        "",
        f"Machine: {cpu_name()}, {args.threads} torch thread(s), {platform.platform()}. "
        f"Versions: pyrovi {pyrovi.__version__}, pyro-ppl {pyro.__version__}, torch "
        f"{torch.__version__}, Python {platform.python_version()}. "
        f"Date: {time.strftime('%Y-%m-%d')}.",
        "",
        f"Cells resampled from `{SOURCE}` ({data['genes']:,} genes, "
        f"{100 * data['nonzero'] / (data['cells'] * data['genes']):.0f}% non-zero), written "
        f"as CSR h5ad files whose in-memory CSR matrix exceeds the {args.budget_mb} MB "
        f"budget. Default SCVI, batch 128, 90/10 split, validation every epoch, "
        f"{args.epochs} epoch(s) per run, each run in its own process. On disk: "
        "`anndata.read_h5ad(path, backed=\"r\")` and "
        f"`loader_kwargs={{\"chunk_size\": {args.chunk_size}, \"n_chunks_in_buffer\": "
        f"{args.n_chunks}}}` (buffer {args.chunk_size * args.n_chunks:,} rows). Setup: "
        "reading (in memory) or the count validation pass (on disk), `setup_anndata` and the "
        "model. RSS: after imports; after setup (\"with data\"); the peak of the whole "
        "process during setup and during `train()` (`VmHWM`, reset between the two). "
        "Reading: time inside file reads during `train()` (training buffers, validation, "
        "the pass that finds empty cells).",
        "",
        "| cells | CSR MB | counts | setup s | s/epoch | reading s | RSS imports MB | "
        "RSS with data MB | peak setup MB | peak training MB | validation ELBO |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for data, r in runs:
        lines.append(
            f"| {data['cells']:,} | {data['csr_mb']:.0f} | "
            f"{'in memory' if r['mode'] == 'memory' else 'on disk'} | {r['setup_s']:.1f} | "
            f"{r['s_per_epoch']:.1f} | {r['read_s_per_epoch']:.2f} | "
            f"{r['rss_imports_mb']:.0f} | {r['rss_with_data_mb']:.0f} | "
            f"{r['peak_setup_rss_mb']:.0f} | **{r['peak_train_rss_mb']:.0f}** | "
            f"{r['elbo_validation']:.2f} |"
        )
    cells = " ".join(str(d["cells"]) for d, r in runs if r["mode"] == "memory")
    lines += ["", f"Command: `python benchmarks/out_of_core.py --cells {cells} "
              f"--budget-mb {args.budget_mb} --threads {args.threads} --epochs {args.epochs}`",
              ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cells", type=int, nargs="+", default=[100_000, 300_000])
    parser.add_argument("--budget-mb", type=int, default=256,
                        help="each dataset's in-memory CSR size must exceed this")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--n-chunks", type=int, default=16)
    parser.add_argument("--path", type=Path,
                        default=Path(os.environ.get("TMPDIR", "/tmp")) / "pyrovi_ooc.h5ad")
    parser.add_argument("--mode", choices=["memory", "ondisk"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.mode:  # child process
        print(json.dumps(run_one(args.path, args.mode, args.epochs, args.threads,
                                 args.chunk_size, args.n_chunks)))
        return
    runs = []
    for n_cells in args.cells:
        data = write_dataset(args.path, n_cells)
        logger.info("wrote %s: %s", args.path, data)
        if data["csr_mb"] <= args.budget_mb:
            raise SystemExit(f"{data['csr_mb']:.0f} MB of counts is not over the "
                             f"{args.budget_mb} MB budget; ask for more --cells.")
        for mode in ("ondisk", "memory"):
            out = subprocess.run(
                [sys.executable, __file__, "--mode", mode, "--path", str(args.path),
                 "--epochs", str(args.epochs), "--threads", str(args.threads),
                 "--chunk-size", str(args.chunk_size), "--n-chunks", str(args.n_chunks)],
                check=True, capture_output=True, text=True,
                env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
            ).stdout
            runs.append((data, json.loads(out.strip().splitlines()[-1])))
            logger.info("%s", runs[-1][1])
        args.path.unlink()
    text = markdown(runs, args)
    write_section(RESULTS, text, SECTION)
    RESULTS.with_suffix(".out_of_core.json").write_text(
        json.dumps([{"data": d, "run": r} for d, r in runs], indent=1))
    print(text)


if __name__ == "__main__":
    main()
