"""retained_heap: freed training temporaries are reused instead of faulted in again."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import pyrovi.infer.heap as heap
import pyrovi.infer.training as training
from pyrovi.infer import fit

glibc_only = pytest.mark.skipif(not heap.glibc_available(), reason="tunes glibc's allocator")

# The allocator's state after hundreds of tests (a fragmented heap, earlier thresholds) is
# not known, so the page faults are measured in a fresh interpreter, from glibc's initial
# thresholds (128 KiB: each 8 MiB block gets its own mapping, given back when freed).
_MEASURE = """
import json, resource, torch
import pyrovi.infer.heap as heap

def faults_per_block(rounds=6, blocks=16):
    # Allocate, touch and free 16 blocks of 8 MiB per round, after a first round that has
    # to fault its pages in whatever the allocator does: a block whose pages went back to
    # the kernel faults 2,048 times (4 KiB pages), a reused one not at all.
    def one_round():
        kept = [torch.ones(2 * 2**20) for _ in range(blocks)]
        del kept
    one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        one_round()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (rounds * blocks)

def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()

out = {"outside": faults_per_block()}
with heap.retained_heap():
    out["inside"] = faults_per_block()
    out["retained"] = resident()
out["released"] = out.pop("retained") - resident()
with heap.retained_heap():
    with heap.retained_heap():
        pass
    out["inside_after_inner"] = faults_per_block()
heap.enabled = False
with heap.retained_heap():
    out["disabled"] = faults_per_block()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def faults():
    """Page faults per 8 MiB block in the situations of the tests below (fresh process)."""
    code = ("import pyrovi.infer.heap as heap\n"
            "heap._glibc().mallopt(heap._M_MMAP_THRESHOLD, 128 * 1024)\n"
            "heap._glibc().mallopt(heap._M_TRIM_THRESHOLD, 128 * 1024)\n" + _MEASURE)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


@glibc_only
def test_freed_blocks_are_reused_inside(faults):
    assert faults["outside"] >= 1  # every block is faulted in again by every round
    assert faults["inside"] < 0.1 * faults["outside"]  # the same pages are reused


@glibc_only
def test_retained_memory_is_released_on_exit(faults):
    assert faults["released"] > 0.75 * 16 * 8 * 2**20


@glibc_only
def test_nested_blocks_keep_the_heap_until_the_outermost_ends(faults):
    assert faults["inside_after_inner"] < 0.1 * faults["outside"]


@glibc_only
def test_disabled_leaves_the_allocator_alone(faults):
    assert faults["disabled"] >= 1


def test_settings_are_restored_when_training_fails():
    with pytest.raises(RuntimeError, match="boom"), heap.retained_heap():
        raise RuntimeError("boom")
    assert heap._depth == 0


def test_training_runs_inside_retained_heap(monkeypatch):
    depths = []
    real_loss_and_terms = training.loss_and_terms

    def recording(*args, **kwargs):
        depths.append(heap._depth)
        return real_loss_and_terms(*args, **kwargs)

    monkeypatch.setattr(training, "loss_and_terms", recording)
    from pyrovi.nn import FCLayers  # a tiny model/guide pair of our own

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = FCLayers(3, 2, n_layers=1, n_hidden=4, dropout_rate=0.0)

        def model(self, x):
            import pyro
            import pyro.distributions as dist

            from pyrovi.infer import cell_plate

            with cell_plate(x.shape[0]):
                pyro.sample("x", dist.Normal(self.net(x), 1.0).to_event(1), obs=x[:, :2])

        def guide(self, x):
            pass

    fit(Tiny(), {"x": np.random.default_rng(0).normal(size=(20, 3))}, max_epochs=1,
        batch_size=10, progress_bar=False, seed=0)
    assert depths and all(d == 1 for d in depths)
    assert heap._depth == 0
