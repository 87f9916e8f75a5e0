"""Where one SVI training step of pyrovi's SCVI spends its time (CPU).

For each data set the script times, over many steps of the default architecture (ZINB,
1×128 hidden, 10 latent, batch 128), the phases of ``pyrovi.infer.train_svi``'s inner loop:

- ``gather``: the minibatch (index gather, CSR densified on the device);
- ``traces``: Pyro running the guide and the model under its tracing handlers;
- ``surrogate``: the ELBO surrogate from the traces (log-densities, scaling, sums), as
  training computes it (``trace_elbo_surrogate_loss``);
- ``cell terms``: the per-cell reconstruction/KL breakdown used for monitoring;
- ``backward`` and ``optimizer``;

and the same forward computation written without Pyro (encoder, reparameterised sample,
decoder, ZINB log-density, analytic-free KL by log-densities) with its backward, so that
the difference is Pyro's per-step overhead. Results go to the "Profile of a training step"
section of ``benchmarks/RESULTS.md``.

Command: ``python benchmarks/profile_step.py --threads 2``
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import anndata
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from _common import SHARED, cpu_name, write_section

import pyrovi
from pyrovi.data import build_cell_tensors
from pyrovi.data.tensors import shuffled_minibatches
from pyrovi.infer.objective import cell_terms, make_elbo, trace_elbo_surrogate_loss
from pyrovi.infer.training import make_adam

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
DATASETS = {
    "mouse_brain_10k": "mouse_brain_10k.h5ad",
    "cellbench_5batch": "cellbench_lung_celllines_5batch.h5ad",
    "pbmc_2batch_4k_genes": "pbmc10k_5k_rna_2batch.h5ad",
}
PHASES = ("gather", "traces", "surrogate", "cell terms", "backward", "optimizer")


def build(name: str):
    adata = anndata.read_h5ad(SHARED / DATASETS[name])
    adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()  # one empty cell in mouse_brain
    batch_key = "batch" if "batch" in adata.obs else None
    pyrovi.SCVI.setup_anndata(adata, batch_key=batch_key)
    torch.manual_seed(0)
    model = pyrovi.SCVI(adata)
    data = build_cell_tensors(adata, model.registry)
    return adata, model, data


def pyro_step_phases(model, data, steps: int, batch_size: int) -> dict[str, float]:
    """Median milliseconds of each phase of a pyrovi training step."""
    module = model.module
    module.train()
    elbo = make_elbo("trace")
    optimizer = make_adam(list(module.parameters()), lr=1e-3, eps=0.01)
    index = torch.arange(data.n_obs)
    times = {phase: [] for phase in PHASES}
    batches = []
    while len(batches) < steps:
        batches += shuffled_minibatches(index, batch_size)
    with pyro.validation_enabled(False):
        for i, cells in enumerate(batches[:steps]):
            t0 = time.perf_counter()
            batch = data.minibatch(cells)
            t1 = time.perf_counter()
            kwargs = dict(batch, n_obs=data.n_obs, kl_weight=0.5)
            [(model_trace, guide_trace)] = list(
                elbo._get_traces(module.model, module.guide, (), kwargs))
            t2 = time.perf_counter()
            surrogate = trace_elbo_surrogate_loss(model_trace, guide_trace)
            t3 = time.perf_counter()
            cell_terms(model_trace, guide_trace, cells.numel())
            t4 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            (surrogate / data.n_obs).backward()
            t5 = time.perf_counter()
            optimizer.step()
            t6 = time.perf_counter()
            if i >= 5:  # warm-up steps excluded
                for phase, (a, b) in zip(PHASES, [(t0, t1), (t1, t2), (t2, t3), (t3, t4),
                                                  (t4, t5), (t5, t6)], strict=True):
                    times[phase].append(1e3 * (b - a))
    return {phase: statistics.median(v) for phase, v in times.items()}


def plain_torch_step(model, data, steps: int, batch_size: int) -> dict[str, float]:
    """The same forward/backward/update without Pyro: median ms (forward, backward+step)."""
    module = model.module
    module.train()
    optimizer = make_adam(list(module.parameters()), lr=1e-3, eps=0.01)
    index = torch.arange(data.n_obs)
    forward, rest = [], []
    batches = []
    while len(batches) < steps:
        batches += shuffled_minibatches(index, batch_size)
    scale = data.n_obs / batch_size
    for i, cells in enumerate(batches[:steps]):
        batch = data.minibatch(cells)
        t0 = time.perf_counter()
        q = module.encode(batch["x"], batch["batch_index"])
        posterior = dist.Normal(q.z_loc, q.z_scale)
        z = posterior.rsample()
        log_library = module.observed_log_library(batch["x"])
        params = module.generative(z, log_library, batch["batch_index"])
        log_lik = module.likelihood(params).log_prob(batch["x"])
        kl = (posterior.log_prob(z) - dist.Normal(0.0, 1.0).log_prob(z)).sum(-1)
        loss = scale * (0.5 * kl - log_lik).sum()
        t1 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        (loss / data.n_obs).backward()
        optimizer.step()
        t2 = time.perf_counter()
        if i >= 5:
            forward.append(1e3 * (t1 - t0))
            rest.append(1e3 * (t2 - t1))
    return {"forward": statistics.median(forward), "backward+step": statistics.median(rest)}


def op_profile(model, data, steps: int, batch_size: int, top: int = 12) -> list[tuple]:
    """The ``top`` torch operators by self CPU time over ``steps`` full training steps."""
    from torch.profiler import ProfilerActivity, profile

    pyro_step_phases(model, data, 10, batch_size)  # warm up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        pyro_step_phases(model, data, steps, batch_size)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [(e.key, e.self_cpu_time_total / total, e.count) for e in events[:top]]


def likelihood_timing(data, n_cells: int = 128, repeats: int = 30) -> dict[str, float]:
    """ZINB log-density (with the softmax that feeds it) forward+backward: eager vs
    ``torch.compile``, mean ms over ``repeats`` calls after warm-up."""
    from pyrovi.distributions import ZeroInflatedNegativeBinomial

    x = data.minibatch(torch.arange(n_cells))["x"]
    library = x.sum(1, keepdim=True)
    generator = torch.Generator().manual_seed(0)
    logits_rho = torch.randn(x.shape, generator=generator).requires_grad_()
    log_theta = torch.zeros(x.shape[1], requires_grad=True)
    zi_logits = torch.randn(x.shape, generator=generator).requires_grad_()

    def loss(logits_rho, log_theta, zi_logits):
        mu = library * torch.softmax(logits_rho, -1)
        return -ZeroInflatedNegativeBinomial(mu=mu, theta=log_theta.exp(),
                                             zi_logits=zi_logits).log_prob(x).sum()

    def mean_ms(fn) -> float:
        for _ in range(3):
            fn(logits_rho, log_theta, zi_logits).backward()
        start = time.perf_counter()
        for _ in range(repeats):
            fn(logits_rho, log_theta, zi_logits).backward()
        return 1e3 * (time.perf_counter() - start) / repeats

    eager = mean_ms(loss)
    start = time.perf_counter()
    compiled_fn = torch.compile(loss)
    compiled_fn(logits_rho, log_theta, zi_logits).backward()
    compile_s = time.perf_counter() - start
    return {"eager": eager, "compiled": mean_ms(compiled_fn), "compile_s": compile_s}


def markdown(rows: list[dict], threads: int, steps: int) -> str:
    header = ("| data set | cells × genes | " + " | ".join(PHASES)
              + " | step total | plain torch fwd | plain torch bwd+step | plain total "
              "| Pyro overhead |")
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    for r in rows:
        total = sum(r["phases"][p] for p in PHASES)
        fwd_pyro = r["phases"]["traces"] + r["phases"]["surrogate"]
        plain_total = r["plain"]["forward"] + r["plain"]["backward+step"]
        lines.append(
            f"| {r['name']} | {r['shape']} | "
            + " | ".join(f"{r['phases'][p]:.2f}" for p in PHASES)
            + f" | **{total:.2f}** | {r['plain']['forward']:.2f} | "
            f"{r['plain']['backward+step']:.2f} | {plain_total:.2f} | "
            f"{fwd_pyro - r['plain']['forward']:.2f} ms ({(total - plain_total) / total:.0%}"
            " of the step) |"
        )
    ops, likelihood = [], []
    for r in rows:
        ops.append(f"\n{r['name']}: " + ", ".join(
            f"`{name}` {share:.0%}" for name, share, _ in r["ops"]))
        t = r["likelihood"]
        likelihood.append(
            f"| {r['name']} | {t['eager']:.2f} | {t['compiled']:.2f} | "
            f"{t['eager'] / t['compiled']:.2f} | {t['compile_s']:.0f} | "
            f"{t['eager'] / sum(r['phases'][p] for p in PHASES):.0%} |")
    return (
        "## Profile of a training step (pyrovi SCVI, CPU)\n\n"
        f"Machine: {cpu_name()}, {threads} torch threads; pyro-ppl {pyro.__version__}, torch "
        f"{torch.__version__}. Date: {time.strftime('%Y-%m-%d')}.\n\n"
        f"Median milliseconds per step over {steps} steps (after 5 warm-up steps) of the default "
        "architecture (ZINB, 1×128 hidden, 10 latent, batch 128). Phases of "
        "`train_svi`'s inner loop: `gather` (minibatch rows, CSR densified), `traces` "
        "(Pyro runs guide and model under its handlers: the networks' forward plus "
        "tracing), `surrogate` (the ELBO from the traces: log-densities, scaling, sums), "
        "`cell terms` (per-cell reconstruction/KL for the history), `backward`, "
        "`optimizer` (Adam, fused kernel). \"Plain torch\" is the same forward, loss, backward "
        "and update written without Pyro; \"Pyro overhead\" is traces + surrogate minus the "
        "plain forward, and the share of the step that the plain version does not spend.\n\n"
        + "\n".join(lines) + "\n\nTop torch operators by self CPU time (torch.profiler, "
        "whole steps including Pyro's bookkeeping):\n" + "\n".join(ops)
        + "\n\nThe ZINB log-density of one minibatch with the softmax that feeds it, forward "
        "and backward (128 cells, ms per call), as written (eager) and through "
        "`torch.compile` (inductor; the search for non-zero counts breaks the graph):\n\n"
        "| data set | eager | compiled | speed-up | compile s | eager share of a step |\n"
        "| --- | --- | --- | --- | --- | --- |\n"
        + "\n".join(likelihood)
        + "\n\nReading it: Pyro's tracing costs next to nothing per step (the plain-torch "
        "version of the same step is not faster); the time is the arithmetic, and on the "
        "wide CellBench data (11,533 genes, 47% non-zero) the matrix products (`mm`, "
        "`addmm`) are a third of it. History of the step on this machine type (same "
        "script, 2026-11-24): 8.90 ms (mouse brain) and 32.71 ms (PBMC, 4,000 genes) "
        "before the hand-written NB/ZINB gradients and the fused Adam; 7.77 and 24.19 ms "
        "after them. The code of this table adds CPU minibatches that carry their non-zero "
        "positions and per-gene tables for counts below 16; measured against the previous "
        "version in alternating runs of this script's step loop in one session (the fair "
        "comparison on this shared machine, where the same code's step drifts by ±20% over "
        "an hour: 6.4-8.9 ms for mouse brain today), a step went from 94 to 81 ms on "
        "CellBench, 23.1 to 21.7 ms on PBMC and stayed at 6.4-6.9 ms on mouse brain. "
        "`torch.compile` of the likelihood "
        "(inductor, CPU) is no faster than the hand-written eager version.\n"
        + "\nCommand: `python benchmarks/profile_step.py --threads "
        f"{threads}`\n"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--datasets", nargs="*", default=list(DATASETS))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.datasets:
        adata, model, data = build(name)
        phases = pyro_step_phases(model, data, args.steps, 128)
        plain = plain_torch_step(model, data, args.steps, 128)
        ops = op_profile(model, data, 40, 128)
        rows.append({"name": name, "shape": f"{adata.n_obs:,} × {adata.n_vars:,}",
                     "phases": phases, "plain": plain, "ops": ops,
                     "likelihood": likelihood_timing(data)})
        logging.info("%s: %s; plain torch %s", name,
                     {k: round(v, 2) for k, v in phases.items()},
                     {k: round(v, 2) for k, v in plain.items()})
    text = markdown(rows, args.threads, args.steps)
    print(text)
    if not args.no_write:
        write_section(RESULTS, text, "## Profile of a training step")


if __name__ == "__main__":
    main()
