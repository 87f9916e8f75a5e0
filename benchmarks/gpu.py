"""GPU benchmarks: pyrovi vs scvi-tools SCVI side by side, and the atlas configuration.

Two parts, both written to ``benchmarks/RESULTS.md`` (and ``RESULTS.gpu.json``):

``side-by-side``
    The CPU benchmark's data sets and architecture (``scvi_cpu.py``: ZINB, 1×128 hidden,
    10 latent, batch 128, same split and epochs, validation every epoch), both libraries on
    the GPU, alternating which goes first; cells per second = training cells × epochs /
    wall time of ``train()``; medians of ``--runs``.
``atlas``
    pyrovi at the configuration of atlas-scale models (8,000 genes, 2 layers of 512, 50
    latent, batch 1024, NB) on ``--atlas-cells`` cells (default 1,000,000) resampled from
    the Kang PBMC data (its 8,000 genes of highest variance; real counts, sparse on the
    GPU). Reported against the physical limits, both measured on the same GPU: the
    matrix-product FLOPs of a training step (forward and backward of every linear layer,
    counted from the layer shapes) per second, as a fraction of the measured float32
    matmul throughput; and a lower bound on the bytes a step moves (the elementwise passes
    over the ``cells × genes`` decoder outputs counted by the profiler's kernels that
    touch them) per second, as a fraction of the measured copy bandwidth.

Run through the ``device`` tool (needs the ``bench`` extra for scvi-tools)::

    python benchmarks/gpu.py --runs 3

``--device cpu --atlas-cells 20000 --runs 1 --epochs 1`` runs the same code on a CPU
(a smoke test; the numbers then mean little).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import anndata
import numpy as np
import torch
from _common import SHARED, configure, machine_line
from _common import write_section as write_results_section
from scvi_cpu import DATASETS
from scvi_cpu import run as run_side_by_side

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTION_SIDE = "## scVI on a GPU: pyrovi vs scvi-tools"
SECTION_ATLAS = "## Atlas configuration on a GPU (pyrovi SCVI, 1M cells)"
ATLAS_SOURCE = "kang_pbmc_ifnb_2k_harmony.h5ad"
ATLAS = dict(n_genes=8000, n_hidden=512, n_layers=2, n_latent=50, batch_size=1024)


def device_line(device: str) -> str:
    """GPU model, driver-side versions and memory (or the CPU)."""
    if device != "cuda":
        return "Device: CPU (smoke run)."
    props = torch.cuda.get_device_properties(0)
    return (
        f"GPU: {props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, "
        f"cuDNN {torch.backends.cudnn.version()}, TF32 matmul "
        f"{'on' if torch.backends.cuda.matmul.allow_tf32 else 'off'} (torch default)."
    )


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# -- part 1: side by side ------------------------------------------------------------------


def side_by_side(datasets, runs: int, epochs_override, device: str) -> list[dict]:
    """``scvi_cpu.py``'s runs on ``device``, with cells per second and the speed-up."""
    rows = run_side_by_side(datasets, runs, epochs_override, device=device)
    for r in rows:
        r["pyrovi_cells_per_s"] = r["train_cells"] / r["pyrovi_s_per_epoch"]
        r["scvi_cells_per_s"] = r["train_cells"] / r["scvi_s_per_epoch"]
        r["speedup"] = r["scvi_s_per_epoch"] / r["pyrovi_s_per_epoch"]
    return rows


def side_by_side_markdown(rows, device: str, runs: int) -> str:
    lines = [
        SECTION_SIDE, "", machine_line(torch.get_num_threads()), device_line(device), "",
        "Architecture, data, split and epochs of the CPU table (ZINB, 1×128 hidden, 10 "
        "latent, batch 128, validation every epoch), both libraries on the GPU. Cells/s = "
        "training cells per epoch / (wall time of `train()` / epochs), medians of runs.",
        "",
        "| dataset | cells × genes | epochs | pyrovi cells/s | scvi-tools cells/s | "
        "speed-up | pyrovi ELBO | scvi-tools ELBO |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['cells']:,} × {r['genes']:,} | {r['epochs']} | "
            f"{r['pyrovi_cells_per_s']:,.0f} | {r['scvi_cells_per_s']:,.0f} | "
            f"**{r['speedup']:.1f}×** | {r['pyrovi_elbo']:.2f} | {r['scvi_elbo']:.2f} |"
        )
    lines += ["", f"Command: `python benchmarks/gpu.py --part side-by-side --runs {runs}`", ""]
    return "\n".join(lines)


# -- part 2: atlas configuration ---------------------------------------------------------


def atlas_data(n_cells: int, n_genes: int, seed: int = 0) -> anndata.AnnData:
    """``n_cells`` cells resampled with replacement from the Kang PBMCs (sparse counts)."""
    source = anndata.read_h5ad(SHARED / ATLAS_SOURCE)
    x = source.X.tocsr().astype(np.float32)
    mean = np.asarray(x.mean(0)).ravel()
    variance = np.asarray(x.multiply(x).mean(0)).ravel() - mean**2
    genes = np.sort(np.argsort(-variance)[:n_genes])
    x = x[:, genes]
    rows = np.random.default_rng(seed).choice(x.shape[0], n_cells, replace=True)
    obs = source.obs.iloc[rows][["batch"]].reset_index(drop=True)
    obs.index = obs.index.astype(str)
    return anndata.AnnData(x[rows], obs=obs, var=source.var.iloc[genes].copy())


def linear_layers(module) -> list[tuple[int, int]]:
    """``(in, out)`` of every linear layer of the module."""
    return [(m.in_features, m.out_features) for m in module.modules()
            if isinstance(m, torch.nn.Linear)]


def matmul_flops_per_cell(module, n_genes: int) -> float:
    """FLOPs of the matrix products of one training step, per cell.

    Forward ``2 · in · out`` per layer; backward twice that (input and weight gradients),
    except the first encoder layer, whose input (the counts) needs no gradient.
    """
    total = 0.0
    for n_in, n_out in linear_layers(module):
        backward = 2 if n_in != n_genes else 1  # the layer reading the counts
        total += 2 * n_in * n_out * (1 + backward)
    return total


def measured_matmul_flops(device: str, n: int = 1024, k: int = 8000, m: int = 512) -> float:
    """Float32 FLOP/s of the step's largest product shape, best of several timings."""
    a = torch.randn(n, k, device=device)
    b = torch.randn(k, m, device=device)
    best = float("inf")
    for _ in range(20):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / 10)
    return 2 * n * k * m / best


def measured_bandwidth(device: str, n_bytes: int = 2**30) -> float:
    """Bytes/s of a large device-to-device copy (read + write), best of several."""
    src = torch.empty(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(10):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n_bytes / best


def elementwise_bytes_per_cell(model, adata, device: str) -> tuple[float, int]:
    """Bytes of the ``cells × genes`` elementwise kernels of one step per cell, and their count.

    Every kernel that is not a matrix product and whose launch takes a ``batch × genes``
    tensor is counted as reading and writing one such float32 tensor: a lower bound on the
    traffic of the likelihood, softmax and their gradients.
    """
    from torch.profiler import ProfilerActivity, profile

    from pyrovi.data import build_cell_tensors
    from pyrovi.infer.objective import loss_and_terms, make_elbo

    module = model.module.to(device)
    data = build_cell_tensors(adata, model.registry, device=device)
    batch = data.minibatch(torch.arange(ATLAS["batch_size"], device=device))
    elbo = make_elbo("trace")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        loss, _ = loss_and_terms(elbo, module.model, module.guide, **batch, n_obs=data.n_obs)
        loss.backward()
    wide = [ATLAS["batch_size"], adata.n_vars]
    passes = sum(
        e.count for e in prof.key_averages(group_by_input_shape=True)
        if "mm" not in e.key and any(list(s) == wide for s in e.input_shapes or [])
    )
    return passes * 2 * 4 * adata.n_vars, passes


def atlas(n_cells: int, epochs: int, device: str) -> dict:
    import pyrovi

    adata = atlas_data(n_cells, ATLAS["n_genes"])
    nonzero = adata.X.nnz / (adata.n_obs * adata.n_vars)
    pyrovi.SCVI.setup_anndata(adata, batch_key="batch")
    torch.manual_seed(0)
    model = pyrovi.SCVI(adata, n_hidden=ATLAS["n_hidden"], n_layers=ATLAS["n_layers"],
                        n_latent=ATLAS["n_latent"], gene_likelihood="nb")
    start = time.perf_counter()
    model.train(max_epochs=epochs, batch_size=ATLAS["batch_size"], device=device,
                progress_bar=False, seed=0)
    seconds = (time.perf_counter() - start) / epochs
    n_train = len(model.train_indices)
    cells_per_s = n_train / seconds  # validation time included in the epoch
    flops = matmul_flops_per_cell(model.module, adata.n_vars)
    bytes_per_cell, passes = elementwise_bytes_per_cell(model, adata[:ATLAS["batch_size"]],
                                                        device)
    peak_flops = measured_matmul_flops(device)
    bandwidth = measured_bandwidth(device)
    return {
        "cells": n_cells, "genes": adata.n_vars, "nonzero_fraction": nonzero,
        "epochs": epochs, "s_per_epoch": seconds, "cells_per_s": cells_per_s,
        "elbo_validation": float(model.history["elbo_validation"].iloc[-1]),
        "matmul_flops_per_cell": flops, "measured_matmul_flops": peak_flops,
        "flop_fraction": flops * cells_per_s / peak_flops,
        "elementwise_passes": passes, "elementwise_bytes_per_cell": bytes_per_cell,
        "measured_bandwidth": bandwidth,
        "bandwidth_fraction": bytes_per_cell * cells_per_s / bandwidth,
    }


def atlas_markdown(r: dict, device: str) -> str:
    return "\n".join([
        SECTION_ATLAS, "", machine_line(torch.get_num_threads()), device_line(device), "",
        f"{r['cells']:,} cells resampled from `{ATLAS_SOURCE}` ({r['genes']:,} genes of highest "
        f"variance, {100 * r['nonzero_fraction']:.1f}% non-zero, CSR on the GPU); SCVI with NB "
        "likelihood, 2×512 hidden, 50 latent, batch 1024, 90/10 split, validation every "
        "epoch (included in the time).",
        "",
        "| epochs | s/epoch | training cells/s | matmul GFLOP/cell | achieved TFLOP/s | "
        "measured fp32 matmul TFLOP/s | fraction | elementwise passes | MB/cell (lower "
        "bound) | achieved GB/s | measured copy GB/s | fraction |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {r['epochs']} | {r['s_per_epoch']:.1f} | **{r['cells_per_s']:,.0f}** | "
        f"{r['matmul_flops_per_cell'] / 1e9:.4f} | "
        f"{r['matmul_flops_per_cell'] * r['cells_per_s'] / 1e12:.1f} | "
        f"{r['measured_matmul_flops'] / 1e12:.1f} | {100 * r['flop_fraction']:.0f}% | "
        f"{r['elementwise_passes']} | {r['elementwise_bytes_per_cell'] / 1e6:.2f} | "
        f"{r['elementwise_bytes_per_cell'] * r['cells_per_s'] / 1e9:.0f} | "
        f"{r['measured_bandwidth'] / 1e9:.0f} | {100 * r['bandwidth_fraction']:.0f}% |",
        "",
        f"Command: `python benchmarks/gpu.py --part atlas --atlas-cells {r['cells']}`",
        "",
    ])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["side-by-side", "atlas", "both"], default="both")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="override per-dataset epochs")
    parser.add_argument("--atlas-cells", type=int, default=1_000_000)
    parser.add_argument("--atlas-epochs", type=int, default=1)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    configure(torch.get_num_threads())
    record = {}
    if args.part in ("side-by-side", "both"):
        rows = side_by_side(args.datasets, args.runs, args.epochs, args.device)
        record["side_by_side"] = rows
        text = side_by_side_markdown(rows, args.device, args.runs)
        write_results_section(args.out, text, SECTION_SIDE)
        print(text)
    if args.part in ("atlas", "both"):
        result = atlas(args.atlas_cells, args.atlas_epochs, args.device)
        record["atlas"] = result
        text = atlas_markdown(result, args.device)
        write_results_section(args.out, text, SECTION_ATLAS)
        print(text)
    args.out.with_suffix(".gpu.json").write_text(json.dumps(record, indent=1, default=float))


if __name__ == "__main__":
    main()
