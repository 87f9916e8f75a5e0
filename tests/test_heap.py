"""retained_heap: freed training temporaries are reused instead of faulted in again."""

from __future__ import annotations

import resource

import numpy as np
import pytest
import torch

import pyrovi.infer.heap as heap
import pyrovi.infer.training as training
from pyrovi.infer import fit

glibc_only = pytest.mark.skipif(not heap.glibc_available(), reason="tunes glibc's allocator")

BLOCK_MB = 8
N_BLOCKS = 16  # 128 MiB freed at once: more than the 64 MiB glibc keeps after the block


def _faults_per_block(rounds: int = 6) -> float:
    """Minor page faults per 8 MiB block of rounds that allocate, touch and free 16 such
    blocks, after a first round (which has to fault its pages in whatever the allocator
    does). A block whose pages went back to the kernel faults 2,048 times (4 KiB pages;
    4 times with transparent huge pages), a reused one (nearly) not at all."""

    def one_round():
        blocks = [torch.ones(BLOCK_MB * 2**18) for _ in range(N_BLOCKS)]  # 8 MiB float32
        del blocks

    one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        one_round()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / (rounds * N_BLOCKS)


@pytest.fixture
def cold_glibc():
    """glibc's initial thresholds (128 KiB: each 8 MiB block gets its own mapping, given
    back when freed), so that a test starts from a known allocator state; afterwards the
    values retained_heap leaves behind."""
    libc = heap._glibc()
    libc.mallopt(heap._M_MMAP_THRESHOLD, 128 * 1024)
    libc.mallopt(heap._M_TRIM_THRESHOLD, 128 * 1024)
    yield
    heap._set_thresholds(heap._TRIM_THRESHOLD_AFTER)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


@glibc_only
def test_freed_blocks_are_reused_inside(cold_glibc):
    outside = _faults_per_block()
    with heap.retained_heap():
        inside = _faults_per_block()
    assert outside >= 1  # every block is faulted in again by every round
    # The rounds after the first reuse the same pages: 0-2% of them faulted in again in
    # a fresh process and after the whole test suite (a fragmented heap).
    assert inside < 0.1 * outside


@glibc_only
def test_retained_memory_is_released_on_exit():
    with heap.retained_heap():
        blocks = [torch.ones(BLOCK_MB * 2**18) for _ in range(N_BLOCKS)]
        del blocks
        retained = _resident_bytes()
    released = retained - _resident_bytes()
    assert released > 0.75 * N_BLOCKS * BLOCK_MB * 2**20


@glibc_only
def test_nested_blocks_keep_the_heap_until_the_outermost_ends(cold_glibc):
    outside = _faults_per_block()
    with heap.retained_heap():
        with heap.retained_heap():
            pass
        inside_after_inner = _faults_per_block()
    assert inside_after_inner < 0.1 * outside
    assert heap._depth == 0


@glibc_only
def test_disabled_leaves_the_allocator_alone(cold_glibc, monkeypatch):
    monkeypatch.setattr(heap, "enabled", False)
    with heap.retained_heap():
        faults = _faults_per_block()
    assert faults >= 1


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

        def model(self, x, n_obs=None, kl_weight=1.0):
            import pyro
            import pyro.distributions as dist

            from pyrovi.infer import cell_plate

            with cell_plate(x.shape[0], n_obs):
                pyro.sample("x", dist.Normal(self.net(x), 1.0).to_event(1), obs=x[:, :2])

        def guide(self, x, n_obs=None, kl_weight=1.0):
            pass

    fit(Tiny(), {"x": np.random.default_rng(0).normal(size=(20, 3))}, max_epochs=1,
        batch_size=10, progress_bar=False, seed=0)
    assert depths and all(d == 1 for d in depths)
    assert heap._depth == 0
