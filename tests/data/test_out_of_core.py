"""Out-of-core training: counts left on disk, read in block-shuffled, bounded buffers.

Checked here: block shuffling visits every training cell once per epoch in the minibatch sizes
of in-memory shuffling, in an order that changes with the epoch and the seed; the file is
read in contiguous chunks and never more than a buffer of rows at a time (asserted on the
reads themselves, not on timings or RSS); SCVI trains from a backed h5ad and from a zarr
store as well as in memory, and gives the same posterior outputs (latent, ELBO, differential
expression) for the same weights; bad counts in a file give the in-memory error and change
nothing. With annbatch installed and asked for (``loader_kwargs={"loader": "annbatch"}``),
the same contract holds when annbatch reads a zarr store (every training cell once per
epoch in in-memory minibatch sizes, seeded order, in-order outputs) and SCVI trains from it
as well as in memory; a file annbatch cannot read, or annbatch missing, gives a clear error.
"""

from __future__ import annotations

import hashlib
import sys
import warnings

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import pyrovi
from pyrovi.data import (
    CountDataError,
    OnDiskCellData,
    OnDiskMatrix,
    build_cell_tensors,
    get_registry,
    is_on_disk,
    read_ondisk,
)
from pyrovi.data.annbatch_loader import AnnbatchCellData, annbatch_available
from pyrovi.data.streaming import planned_batch_sizes
from pyrovi.data.tensors import shuffled_minibatches
from pyrovi.datasets import simulate_counts


def backed_copy(adata, path, fmt: str = "h5ad"):
    """Write ``adata`` to ``path`` and open it with the counts left on disk."""
    if fmt == "h5ad":
        adata.write_h5ad(path)
        return anndata.read_h5ad(path, backed="r")
    # zarr v3, the format anndata moves to; its notices about that move are not ours.
    with warnings.catch_warnings(), anndata.settings.override(zarr_write_format=3):
        warnings.filterwarnings("ignore", "zarr v3 autosharding", UserWarning)
        warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)
        adata.write_zarr(path)
    return read_ondisk(path)


def file_digest(path) -> str:
    """SHA-1 of a file, or of every file of a zarr directory."""
    digest = hashlib.sha1()
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    for file in files:
        if file.is_file():
            digest.update(str(file.relative_to(path.parent)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


class ReadLog:
    """Wraps :meth:`OnDiskMatrix.read` of one matrix, recording every ``(start, stop)``."""

    def __init__(self, matrix: OnDiskMatrix):
        self.reads: list[tuple[int, int]] = []
        original = matrix.read

        def read(start, stop):
            self.reads.append((start, stop))
            return original(start, stop)

        matrix.read = read

    def rows(self) -> int:
        return sum(stop - start for start, stop in self.reads)


class SliceLog:
    """Stands in for an h5py/zarr array, recording the keys it is indexed with."""

    def __init__(self, array):
        self.array, self.keys = array, []
        self.dtype = array.dtype

    def __getitem__(self, key):
        self.keys.append(key)
        return self.array[key]


@pytest.fixture(scope="module")
def clustered():
    """2,000 cells in 6 close clusters, the file sorted by cluster: the hard case for
    block shuffling (a chunk of the file holds one cell type)."""
    adata = simulate_counts(n_cells=2000, n_genes=100, n_clusters=6, n_batches=2,
                            cluster_separation=1.0, seed=0)
    order = np.argsort(adata.obs["cluster"].to_numpy(), kind="stable")
    return adata[order].copy()


@pytest.fixture
def on_disk(small_adata, tmp_path):
    """The small data set up for SCVI, in memory and backed from an h5ad (CSR)."""
    pyrovi.SCVI.setup_anndata(small_adata, batch_key="batch")
    backed = backed_copy(small_adata, tmp_path / "small.h5ad")
    return small_adata, backed


def loader(backed, chunk_size=16, n_chunks_in_buffer=3) -> OnDiskCellData:
    data = build_cell_tensors(backed, get_registry(backed), "cpu",
                              loader_kwargs={"chunk_size": chunk_size,
                                             "n_chunks_in_buffer": n_chunks_in_buffer})
    assert isinstance(data, OnDiskCellData)
    return data


@pytest.mark.parametrize("batch_size", [32, 53])  # 270 cells: 53 leaves a last cell alone
def test_block_shuffling_visits_every_training_cell_once_in_in_memory_batch_sizes(
        on_disk, batch_size):
    adata, backed = on_disk
    data = loader(backed)
    memory = build_cell_tensors(adata, get_registry(adata), "cpu")
    train = np.sort(np.random.default_rng(0).choice(adata.n_obs, 270, replace=False))
    seen, sizes = [], []
    for index, batch in data.training_batches(torch.as_tensor(train), batch_size):
        seen.append(index.numpy())
        sizes.append(index.numel())
        # Each minibatch holds exactly the rows (and per-cell fields) of its cells.
        expected = memory.minibatch(index)
        for key in ("x", "batch_index", "labels"):
            torch.testing.assert_close(batch[key], expected[key], rtol=0, atol=0)
    seen = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(seen), train)
    in_memory = [b.numel() for b in shuffled_minibatches(torch.as_tensor(train), batch_size)]
    assert sizes == in_memory == planned_batch_sizes(train.size, batch_size)
    assert min(sizes) >= 2


@pytest.mark.parametrize("n_cells", [1, 2, 127, 128, 129, 257, 385])
def test_one_minibatch_rule_for_every_loader(n_cells):
    """In-memory and on-disk loaders cut an epoch by the same sizes, the merged one last."""
    sizes = planned_batch_sizes(n_cells, 128)
    in_memory = [b.numel() for b in shuffled_minibatches(torch.arange(n_cells), 128)]
    assert sizes == in_memory
    assert sum(sizes) == n_cells
    assert n_cells < 2 or min(sizes) >= 2
    assert sizes[:-1] == [128] * (len(sizes) - 1)


def test_block_shuffled_order_changes_with_epoch_and_seed_and_is_reproducible(on_disk):
    _, backed = on_disk
    assert_seeded_block_shuffling(loader(backed))


def assert_seeded_block_shuffling(data) -> None:
    """An on-disk loader's epochs: shuffled, new each epoch, seeded, chunks mixed."""
    train = np.arange(0, 300)

    def epoch(generator=None):
        return np.concatenate([i.numpy() for i, _ in
                               data.training_batches(train, 40, generator=generator)])

    torch.manual_seed(0)
    first, second = epoch(), epoch()
    torch.manual_seed(0)
    again = epoch()
    other_seed = epoch(torch.Generator().manual_seed(1))
    assert not np.array_equal(first, train)  # shuffled, not the file order
    assert not np.array_equal(first, second)  # a new order every epoch
    assert not np.array_equal(first, other_seed)
    np.testing.assert_array_equal(first, again)  # seeded: reproducible
    # Cells of a chunk do not stay together: the first minibatch mixes several chunks.
    assert np.unique(first[:40] // data.chunk_size).size > 1


@pytest.mark.parametrize("chunk_size,n_chunks", [(16, 3), (25, 1), (64, 2)])
def test_epoch_reads_contiguous_chunks_and_never_more_than_a_buffer(
        on_disk, chunk_size, n_chunks):
    adata, backed = on_disk
    data = loader(backed, chunk_size, n_chunks)
    log = ReadLog(data.counts)
    # The CSR arrays themselves are only ever sliced, one contiguous range per read.
    data.counts._data = SliceLog(data.counts._data)
    data.counts._indices = SliceLog(data.counts._indices)
    train = np.sort(np.random.default_rng(1).choice(adata.n_obs, 270, replace=False))
    batch_size = 20
    rows_between_minibatches = []
    for _ in data.training_batches(train, batch_size):
        rows_between_minibatches.append(log.rows())
        log.reads.clear()
    assert not log.reads  # nothing is read after the last minibatch
    # A buffer is read all at once between two minibatches, and is at most
    # chunk_size * n_chunks_in_buffer rows; what is held adds one partial minibatch.
    assert max(rows_between_minibatches) <= data.buffer_rows
    assert data.peak_rows_held <= data.buffer_rows + batch_size
    # Every read lies inside one chunk of the file, and each chunk is read once per epoch
    # (the validation cells between training cells are read through, not skipped).
    reads = []
    log.reads.clear()
    for _ in data.training_batches(train, batch_size):
        reads += log.reads
        log.reads.clear()
    chunks = [start // chunk_size for start, _ in reads]
    assert all(start // chunk_size == (stop - 1) // chunk_size for start, stop in reads)
    assert sorted(chunks) == sorted(set(train // chunk_size))
    for array in (data.counts._data, data.counts._indices):
        assert all(isinstance(k, slice) and k.step is None for k in array.keys)
    assert len(data.counts._data.keys) == 2 * len(reads)  # two epochs, one slice per read


def test_in_order_outputs_read_each_minibatch_as_one_range_and_random_cells_exactly(
        on_disk):
    adata, backed = on_disk
    data = loader(backed)
    log = ReadLog(data.counts)
    X = adata.X.toarray()
    batches = list(data.iter_minibatches(None, batch_size=64))
    assert [i.numel() for i, _ in batches] == [64] * 4 + [44]
    assert log.reads == [(s, min(s + 64, 300)) for s in range(0, 300, 64)]
    np.testing.assert_array_equal(torch.cat([b["x"] for _, b in batches]).numpy(), X)
    # Unsorted and repeated cells come back in the requested order.
    index = torch.tensor([250, 3, 3, 120, 0, 299])
    np.testing.assert_array_equal(data.minibatch(index)["x"].numpy(), X[index.numpy()])
    # A subset of cells (posterior outputs with indices=) maps positions to file rows.
    subset = build_cell_tensors(backed, get_registry(backed), "cpu", indices=[299, 5, 7])
    assert subset.n_obs == 3
    np.testing.assert_array_equal(subset.minibatch(torch.tensor([0, 2]))["x"].numpy(),
                                  X[[299, 7]])
    np.testing.assert_array_equal(subset.informative, np.ones(3, dtype=bool))


def knn_accuracy(latent: np.ndarray, labels: np.ndarray) -> float:
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    return float(cross_val_score(KNeighborsClassifier(15), latent, labels, cv=5).mean())


def train_scvi(adata, **loader_kwargs):
    pyrovi.SCVI.setup_anndata(adata, batch_key="batch")
    torch.manual_seed(0)
    model = pyrovi.SCVI(adata, n_latent=5, n_hidden=64)
    model.train(max_epochs=30, batch_size=128, seed=0, device="cpu", progress_bar=False,
                loader_kwargs=loader_kwargs or None)
    return model


@pytest.fixture(scope="module")
def in_memory_accuracy(clustered):
    model = train_scvi(clustered.copy())
    return knn_accuracy(model.get_latent_representation(), clustered.obs["cluster"].to_numpy())


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_scvi_trains_from_disk_as_well_as_in_memory_without_loading_the_matrix(
        clustered, in_memory_accuracy, tmp_path, monkeypatch, fmt):
    pytest.importorskip("sklearn")
    source = clustered.copy()
    if fmt == "zarr":
        source.X = source.X.toarray()  # the dense on-disk path
    backed = backed_copy(source, tmp_path / f"clustered.{fmt}", fmt)
    assert is_on_disk(backed.X)
    n_cells = backed.n_obs
    # No step reads more than a small part of the file at once: a buffer of 4 chunks of 32
    # rows in training, a minibatch in the outputs, blocks of 4,000 values in validation.
    # Gaps between wanted rows are read through up to a size fit for this small file
    # (the default, 64 KiB, is the whole of it).
    from pyrovi.data import ondisk

    monkeypatch.setattr(ondisk, "PASS_BLOCK_VALUES", 4000)
    monkeypatch.setattr(ondisk, "READ_THROUGH_BYTES", 2048)
    largest = []
    original_read = OnDiskMatrix.read

    def read(self, start, stop):
        largest.append(stop - start)
        return original_read(self, start, stop)

    def densify_guard(original):
        def densify(self, *args, **kwargs):
            assert self.shape[0] < n_cells, "the whole count matrix was densified"
            return original(self, *args, **kwargs)
        return densify

    monkeypatch.setattr(OnDiskMatrix, "read", read)
    for cls in (sp.csr_matrix, sp.csr_array, sp.csc_matrix, sp.csc_array):
        monkeypatch.setattr(cls, "toarray", densify_guard(cls.toarray))
        monkeypatch.setattr(cls, "todense", densify_guard(cls.todense))

    model = train_scvi(backed, chunk_size=32, n_chunks_in_buffer=4)
    latent = model.get_latent_representation(batch_size=256)
    assert max(largest) <= 256 < n_cells / 4
    accuracy = knn_accuracy(latent, clustered.obs["cluster"].to_numpy())
    # Measured (30 epochs, seed 0): in memory 0.910; from disk 0.901 (h5ad CSR and zarr
    # dense alike: the loader gives both the same minibatches); untrained 0.49. Block
    # shuffling of a file sorted by cluster costs no accuracy.
    assert in_memory_accuracy > 0.85 and accuracy > 0.85
    assert abs(accuracy - in_memory_accuracy) < 0.05
    assert model.history["elbo_validation"].iloc[-1] < model.history["elbo_validation"].iloc[0]

    # Same weights, same outputs: the on-disk loader hands the model the same minibatches.
    monkeypatch.undo()
    in_memory = clustered.copy()
    np.testing.assert_allclose(model.get_latent_representation(in_memory), latent,
                               rtol=1e-5, atol=1e-6)
    cells = np.arange(0, n_cells, 7)
    torch.manual_seed(3)
    elbo_disk = model.get_elbo(indices=cells, return_mean=False)
    torch.manual_seed(3)
    elbo_memory = model.get_elbo(in_memory, indices=cells, return_mean=False)
    np.testing.assert_allclose(elbo_disk, elbo_memory, rtol=1e-5)


def test_seeded_backed_training_is_reproducible(on_disk):
    _, backed = on_disk
    histories = [train_scvi(backed, chunk_size=16, n_chunks_in_buffer=2).history
                 for _ in range(2)]
    np.testing.assert_array_equal(histories[0].to_numpy(), histories[1].to_numpy())


@pytest.mark.parametrize("value", [np.nan, -1.0, 2.5])
@pytest.mark.parametrize("storage", ["csr", "dense"])
def test_bad_counts_in_a_file_give_the_in_memory_error_and_change_nothing(
        small_adata, tmp_path, monkeypatch, value, storage):
    from pyrovi.data import ondisk, validation

    # Blocks of 7 values: the bad value sits in the last block of the pass.
    monkeypatch.setattr(validation, "_SPARSE_CHUNK_VALUES", 7)
    monkeypatch.setattr(ondisk, "PASS_BLOCK_VALUES", 7)
    X = sp.csr_matrix(small_adata.X, dtype=np.float32)
    X.data[-1] = value
    if value != 2.5:  # and a non-integer earlier: the worse problem is still the one reported
        X.data[0] = 0.5
    small_adata.X = X if storage == "csr" else X.toarray()
    path = tmp_path / "bad.h5ad"
    small_adata.write_h5ad(path)
    before = file_digest(path)
    with pytest.raises(CountDataError) as in_memory:
        pyrovi.SCVI.setup_anndata(anndata.read_h5ad(path), batch_key="batch")
    backed = anndata.read_h5ad(path, backed="r")
    uns_before = dict(backed.uns)
    with pytest.raises(CountDataError) as from_disk:
        pyrovi.SCVI.setup_anndata(backed, batch_key="batch")
    assert str(from_disk.value) == str(in_memory.value)
    assert "_pyrovi" not in backed.uns and dict(backed.uns) == uns_before
    backed.file.close()
    assert file_digest(path) == before


def test_empty_cells_on_disk_are_reported_or_left_out_like_in_memory(small_adata, tmp_path):
    X = small_adata.X.toarray()
    X[[4, 9]] = 0
    small_adata.X = sp.csr_matrix(X)
    backed = backed_copy(small_adata, tmp_path / "empty.h5ad")
    with pytest.raises(CountDataError, match="2 cell\\(s\\) with zero total counts"):
        pyrovi.SCVI.setup_anndata(backed)
    pyrovi.SCVI.setup_anndata(backed, drop_empty_cells=True)
    model = pyrovi.SCVI(backed, n_latent=3, n_hidden=16)
    model.train(max_epochs=1, batch_size=64, progress_bar=False,
                loader_kwargs={"chunk_size": 50})
    used = np.concatenate([model.train_indices, model.validation_indices])
    assert not set(used) & {4, 9} and used.size == small_adata.n_obs - 2


def test_read_ondisk_leaves_x_and_layers_on_disk_and_trains_from_a_layer(small_adata,
                                                                          tmp_path):
    small_adata.layers["counts"] = small_adata.X.copy()
    small_adata.X = sp.csr_matrix(np.log1p(small_adata.X.toarray()))
    small_adata.write_h5ad(tmp_path / "layers.h5ad")
    adata = read_ondisk(tmp_path / "layers.h5ad")
    assert is_on_disk(adata.X) and is_on_disk(adata.layers["counts"])
    assert list(adata.obs.columns) == list(small_adata.obs.columns)
    np.testing.assert_array_equal(adata.obsm["z_true"], small_adata.obsm["z_true"])
    pyrovi.SCVI.setup_anndata(adata, layer="counts", batch_key="batch")
    model = pyrovi.SCVI(adata, n_latent=3, n_hidden=16)
    model.train(max_epochs=1, batch_size=64, progress_bar=False)
    assert model.get_latent_representation().shape == (small_adata.n_obs, 3)
    with pytest.raises(TypeError, match="Unknown loader_kwargs"):
        model.train(max_epochs=1, loader_kwargs={"buffer": 3})
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        model.train(max_epochs=1, progress_bar=False, loader_kwargs={"chunk_size": 0})


def test_csc_on_disk_is_refused_with_the_fix(small_adata, tmp_path):
    small_adata.X = sp.csc_matrix(small_adata.X)
    backed = backed_copy(small_adata, tmp_path / "csc.h5ad")
    with pytest.raises(ValueError, match="stored on disk as CSC.*Rewrite it as CSR"):
        pyrovi.SCVI.setup_anndata(backed)


def test_differential_expression_from_disk_matches_in_memory(on_disk):
    adata, backed = on_disk
    torch.manual_seed(0)
    model = pyrovi.SCVI(backed, n_latent=3, n_hidden=16)
    model.train(max_epochs=2, batch_size=64, progress_bar=False, seed=0)
    frames = []
    for data in (None, adata):  # the model's own (backed) data, then the same in memory
        torch.manual_seed(1)
        frames.append(model.differential_expression(data, groupby="cluster", mode="change",
                                                    pseudocounts=None, n_samples=200,
                                                    seed=0, silent=True))
    disk, memory = (f.reset_index().sort_values(["comparison", "index"]) for f in frames)
    numeric = disk.select_dtypes("number").columns
    assert {"raw_mean1", "non_zeros_proportion2", "raw_normalized_mean1"} <= set(numeric)
    np.testing.assert_allclose(disk[numeric].to_numpy(), memory[numeric].to_numpy(),
                               rtol=1e-5, atol=1e-8)


# -- annbatch as the reader of zarr stores (optional dependency) ---------------------------

ANNBATCH_MISSING = ("annbatch is not installed (`pip install annbatch`, Python >= 3.12): "
                     "the annbatch loader is optional")
needs_annbatch = pytest.mark.skipif(not annbatch_available(), reason=ANNBATCH_MISSING)


def zarr_copy(adata, path, layout: str):
    """``adata`` written as a zarr store (anndata's layout, CSR or dense, or annbatch's
    sharded one), opened with the counts on disk."""
    if layout.startswith("anndata"):
        if layout == "anndata-dense":
            adata = adata.copy()
            adata.X = adata.X.toarray()
        return backed_copy(adata, path, "zarr")
    import annbatch
    import zarr

    with warnings.catch_warnings():  # anndata's notices about its move to zarr v3
        warnings.simplefilter("ignore")
        annbatch.write_sharded(zarr.open_group(path, mode="w"), adata, n_obs_per_chunk=16)
    return read_ondisk(path)


def annbatch_loader(store, chunk_size=16, n_chunks_in_buffer=3) -> AnnbatchCellData:
    data = build_cell_tensors(store, get_registry(store), "cpu", loader_kwargs={
        "loader": "annbatch", "chunk_size": chunk_size, "n_chunks_in_buffer": n_chunks_in_buffer})
    assert isinstance(data, AnnbatchCellData)
    return data


@pytest.fixture(params=["anndata", "anndata-dense", "annbatch"])
def in_zarr(request, small_adata, tmp_path):
    """The small data set up for SCVI, in memory and in a zarr store: CSR and dense
    counts in anndata's layout, CSR in annbatch's (sharded, column indices as uint16)."""
    if not annbatch_available():
        pytest.skip(ANNBATCH_MISSING)
    pyrovi.SCVI.setup_anndata(small_adata, batch_key="batch")
    store = zarr_copy(small_adata, tmp_path / "small.zarr", request.param)
    pyrovi.SCVI.setup_anndata(store, batch_key="batch")
    return small_adata, store


def forbid_pyrovi_reads(monkeypatch):
    """Fail any read of pyrovi's own reader: what is read must come through annbatch."""
    def read(self, start, stop):
        raise AssertionError("pyrovi's reader was used")

    monkeypatch.setattr(OnDiskMatrix, "read", read)


@pytest.mark.parametrize("batch_size", [32, 53])  # 270 cells: 53 leaves a last cell alone
def test_annbatch_loader_gives_every_training_cell_once_in_in_memory_batch_sizes(
        in_zarr, batch_size, monkeypatch):
    adata, store = in_zarr
    data = annbatch_loader(store)
    memory = build_cell_tensors(adata, get_registry(adata), "cpu")
    forbid_pyrovi_reads(monkeypatch)
    train = np.sort(np.random.default_rng(0).choice(adata.n_obs, 270, replace=False))
    seen, sizes, chunks = [], [], []
    for index, batch in data.training_batches(torch.as_tensor(train), batch_size):
        seen.append(index.numpy())
        sizes.append(index.numel())
        chunks.append(np.unique(index.numpy() // data.chunk_size).size)
        # Each minibatch holds exactly the rows (and per-cell fields) of its cells.
        expected = memory.minibatch(index)
        for key in ("x", "batch_index", "labels"):
            torch.testing.assert_close(batch[key], expected[key], rtol=0, atol=0)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), train)
    assert sizes == planned_batch_sizes(train.size, batch_size)
    assert min(sizes) >= 2
    # Both batch sizes exceed the buffer's 48 rows, so each minibatch is a buffer of its
    # own; it reads within the chunks of its cells only (the validation cells between
    # them read through, nothing across a chunk border).
    assert max(sizes) <= data.peak_rows_held <= max(chunks) * data.chunk_size


def test_annbatch_loader_order_is_seeded_and_mixes_chunks(in_zarr):
    _, store = in_zarr
    assert_seeded_block_shuffling(annbatch_loader(store))


def test_annbatch_loader_reads_cells_in_order_and_subsets(in_zarr, monkeypatch):
    adata, store = in_zarr
    data = annbatch_loader(store)
    forbid_pyrovi_reads(monkeypatch)
    X = adata.X.toarray()
    batches = list(data.iter_minibatches(None, batch_size=64))
    assert [i.numel() for i, _ in batches] == [64] * 4 + [44]
    np.testing.assert_array_equal(torch.cat([b["x"] for _, b in batches]).numpy(), X)
    # Unsorted and repeated cells come back in the requested order.
    cells = np.array([250, 3, 3, 120, 0, 299])
    got = torch.cat([b["x"] for _, b in data.iter_minibatches(cells, batch_size=4)])
    np.testing.assert_array_equal(got.numpy(), X[cells])
    # A subset of cells (posterior outputs with indices=) maps positions to file rows.
    subset = build_cell_tensors(store, get_registry(store), "cpu", indices=[299, 5, 7],
                                loader_kwargs={"loader": "annbatch"})
    assert isinstance(subset, AnnbatchCellData) and subset.n_obs == 3
    [(index, batch)] = subset.training_batches([0, 2], 2)
    np.testing.assert_array_equal(batch["x"].numpy(), X[np.array([299, 5, 7])[index]])


@needs_annbatch
def test_scvi_trains_with_the_annbatch_loader_like_in_memory_and_reproducibly(
        small_adata, tmp_path):
    pyrovi.SCVI.setup_anndata(small_adata, batch_key="batch")
    store = zarr_copy(small_adata, tmp_path / "train.zarr", "annbatch")
    pyrovi.SCVI.setup_anndata(store, batch_key="batch")

    def train(adata, epochs, **loader_kwargs):
        torch.manual_seed(0)
        model = pyrovi.SCVI(adata, n_latent=3, n_hidden=32)
        model.train(max_epochs=epochs, batch_size=32, seed=0, progress_bar=False,
                    loader_kwargs=loader_kwargs or None)
        return model

    options = {"loader": "annbatch", "chunk_size": 16, "n_chunks_in_buffer": 4}
    memory = train(small_adata, 10).history["elbo_validation"]
    model = train(store, 10, **options)
    disk = model.history["elbo_validation"]
    assert disk.iloc[-1] < 0.9 * disk.iloc[0]  # it learns
    # Measured (10 epochs, seed 0): in memory 257.4, annbatch loader 258.5 (pyrovi's
    # on-disk loader 258.0); the minibatch order is all that differs.
    assert abs(disk.iloc[-1] - memory.iloc[-1]) < 0.02 * abs(memory.iloc[-1])
    # The outputs read the store through annbatch too, and match the in-memory data's.
    np.testing.assert_allclose(model.get_latent_representation(),
                               model.get_latent_representation(small_adata),
                               rtol=1e-5, atol=1e-6)
    histories = [train(store, 2, **options).history for _ in range(2)]
    np.testing.assert_array_equal(histories[0].to_numpy(), histories[1].to_numpy())


def test_a_file_annbatch_cannot_read_gets_a_clear_error_or_pyrovis_reader(on_disk):
    _, backed = on_disk  # an h5ad file: annbatch reads zarr stores only
    registry = get_registry(backed)
    assert type(build_cell_tensors(backed, registry, "cpu")) is OnDiskCellData
    assert type(build_cell_tensors(backed, registry, "cpu",
                                   loader_kwargs={"loader": "pyrovi"})) is OnDiskCellData
    if annbatch_available():
        with pytest.raises(TypeError, match="annbatch reads zarr stores only.*write_zarr"):
            build_cell_tensors(backed, registry, "cpu", loader_kwargs={"loader": "annbatch"})
    with pytest.raises(ValueError, match="loader must be one of"):
        build_cell_tensors(backed, registry, "cpu", loader_kwargs={"loader": "dask"})


@needs_annbatch
def test_zarr_stores_are_read_by_pyrovi_unless_annbatch_is_asked_for(small_adata, tmp_path):
    pyrovi.SCVI.setup_anndata(small_adata, batch_key="batch")

    def loader_class(store, **loader_kwargs):
        return type(build_cell_tensors(store, get_registry(store), "cpu",
                                       loader_kwargs=loader_kwargs or None))

    for layout in ("anndata", "annbatch", "anndata-dense"):
        store = zarr_copy(small_adata, tmp_path / f"{layout}.zarr", layout)
        assert loader_class(store) is OnDiskCellData
        assert loader_class(store, loader="pyrovi") is OnDiskCellData
        assert loader_class(store, loader="annbatch") is AnnbatchCellData


def test_the_annbatch_loader_without_annbatch_names_the_install(on_disk, tmp_path,
                                                               monkeypatch):
    adata, backed = on_disk
    store = backed_copy(adata, tmp_path / "store.zarr", "zarr")
    monkeypatch.setitem(sys.modules, "annbatch", None)  # as if it were not installed
    assert not annbatch_available()
    for data in (backed, store):
        with pytest.raises(ImportError, match="pip install annbatch"):
            build_cell_tensors(data, get_registry(data), "cpu",
                               loader_kwargs={"loader": "annbatch"})
    # pyrovi's own reader, the default, needs no annbatch.
    assert type(build_cell_tensors(store, get_registry(store), "cpu")) is OnDiskCellData
