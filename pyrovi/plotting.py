"""Pictures of a trained model: a UMAP of its latent space and its training curves.

These need the ``plot`` extra (matplotlib and umap-learn): ``pip install "pyrovi[plot]"``,
or ``pip install -e ".[plot]"`` in a source checkout. Figures are drawn on matplotlib's Agg
canvas without pyplot, so they work without a display and leave pyplot's state (and the
backend a notebook chose) alone.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

#: What to run to get the pictures when matplotlib or umap-learn is missing.
PLOT_INSTALL = ('pip install "pyrovi[plot]" (in a source checkout: pip install -e ".[plot]")')

_NO_CATEGORY = "NA"
_MISSING_COLOUR = "#d3d3d3"


def missing_plot_packages() -> list[str]:
    """The packages of the ``plot`` extra that cannot be imported.

    Returns
    -------
    list of str
        Distribution names (``"matplotlib"``, ``"umap-learn"``); empty when both import.
    """
    import importlib

    missing = []
    for module, package in (("matplotlib", "matplotlib"), ("umap", "umap-learn")):
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    return missing


def umap_coordinates(latent: np.ndarray, seed: int = 0, n_neighbors: int = 15) -> np.ndarray:
    """Two-dimensional UMAP of a latent space, the same for the same seed.

    Parameters
    ----------
    latent
        ``(n_cells, n_latent)`` coordinates, e.g. ``model.get_latent_representation()``.
    seed
        UMAP's random state. A seed makes umap-learn run single-threaded, which is what
        makes the layout reproducible.
    n_neighbors
        Neighbours of the k-NN graph (fewer when there are fewer cells).

    Returns
    -------
    numpy.ndarray
        ``(n_cells, 2)`` float32 coordinates.

    Raises
    ------
    ImportError
        If umap-learn is not installed.
    ValueError
        If there are fewer than 3 cells.
    """
    import torch
    import umap

    latent = np.asarray(latent, dtype=np.float32)
    if latent.shape[0] < 3:
        raise ValueError(f"A UMAP needs at least 3 cells, got {latent.shape[0]}.")
    reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, latent.shape[0] - 1),
                        random_state=seed, n_jobs=1)
    # umap-learn resets numba's thread count when it ends, and with numba's OpenMP layer
    # that count is the OpenMP one torch uses too: torch would then run on every core
    # whatever it was set to, many times slower for small models on a busy machine.
    torch_threads = torch.get_num_threads()
    try:
        return reducer.fit_transform(latent).astype(np.float32)
    finally:
        torch.set_num_threads(torch_threads)


def _category_colours(n: int) -> list:
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["turbo"](x) for x in np.linspace(0.0, 1.0, n)]


def _as_categories(values: pd.Series) -> pd.Categorical:
    if isinstance(values.dtype, pd.CategoricalDtype):
        return pd.Categorical(values).remove_unused_categories()
    # Labels and batches are categories to pyrovi even when stored as numbers (which then
    # keep their numeric order); values of mixed types cannot be sorted, so become text.
    try:
        return pd.Categorical(values)
    except TypeError:
        return pd.Categorical(values.map(lambda v: v if pd.isna(v) else str(v)))


def _scatter_panel(ax, coordinates: np.ndarray, categories: pd.Categorical | None,
                   title: str, size: float, order: np.ndarray) -> None:
    xy = coordinates[order]
    if categories is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, c="#4c72b0", linewidths=0, rasterized=True)
    else:
        codes = np.asarray(categories.codes)[order]
        names = list(categories.categories)
        colours = _category_colours(len(names))
        palette = np.array(colours + [_MISSING_COLOUR], dtype=object)
        # Points are drawn in one shuffled scatter, not one per category, so that no
        # category is painted over all the others.
        ax.scatter(xy[:, 0], xy[:, 1], s=size, c=list(palette[codes]), linewidths=0,
                   rasterized=True)
        counts = np.bincount(codes[codes >= 0], minlength=len(names))
        handles = [ax.scatter([], [], s=30, color=colour, label=f"{name} ({count})")
                   for name, colour, count in zip(names, colours, counts, strict=True)]
        if (codes < 0).any():
            handles.append(ax.scatter([], [], s=30, color=_MISSING_COLOUR,
                                      label=f"{_NO_CATEGORY} ({int((codes < 0).sum())})"))
        ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5),
                  frameon=False, fontsize="small", ncols=1 + (len(handles) - 1) // 25)
    ax.set_title(title)
    ax.set_xlabel("UMAP 1")
    ax.set_ylabel("UMAP 2")
    ax.set_xticks([])
    ax.set_yticks([])


def plot_umap(coordinates: np.ndarray, obs: pd.DataFrame | None = None,
              keys: list[str] | tuple[str, ...] = (), path: str | os.PathLike | None = None,
              title: str = "UMAP of the latent space", seed: int = 0):
    """Scatter plot of UMAP coordinates, one panel per ``obs`` column it is coloured by.

    Parameters
    ----------
    coordinates
        ``(n_cells, 2)`` coordinates, e.g. from :func:`umap_coordinates`.
    obs
        Cell annotations (rows in the order of ``coordinates``).
    keys
        ``obs`` columns to colour by, each its own panel with a legend (categories and cell
        counts); none: one uncoloured panel.
    path
        Where to save the figure (PNG, 150 dpi); ``None``: only return it.
    title
        Heading of an uncoloured panel; coloured panels are headed by their key.
    seed
        Seed of the drawing order (cells are drawn shuffled).

    Returns
    -------
    matplotlib.figure.Figure
        The figure (on an Agg canvas).

    Raises
    ------
    ImportError
        If matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    coordinates = np.asarray(coordinates)
    keys = [k for k in keys if k is not None]
    n_panels = max(len(keys), 1)
    figure = Figure(figsize=(7.0 * n_panels, 5.0), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, n_panels, squeeze=False)[0]
    # scanpy's rule of thumb for the marker size, kept between legible bounds.
    size = float(np.clip(120000 / max(len(coordinates), 1), 1.0, 20.0))
    order = np.random.default_rng(seed).permutation(len(coordinates))
    if not keys:
        _scatter_panel(axes[0], coordinates, None, title, size, order)
    for ax, key in zip(axes, keys, strict=False):
        _scatter_panel(ax, coordinates, _as_categories(obs[key]), key, size, order)
    if path is not None:
        figure.savefig(path, dpi=150)
    return figure


def plot_history(history: pd.DataFrame, path: str | os.PathLike | None = None,
                 columns: tuple[str, ...] = ("elbo_train", "elbo_validation")):
    """Training curves: the negative ELBO per cell of each epoch, training and validation.

    Parameters
    ----------
    history
        ``model.history`` (one row per epoch, indexed by epoch).
    path
        Where to save the figure (PNG, 150 dpi); ``None``: only return it.
    columns
        History columns to draw (those absent or all missing are left out).

    Returns
    -------
    matplotlib.figure.Figure
        The figure (on an Agg canvas).

    Raises
    ------
    ImportError
        If matplotlib is not installed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    epochs = np.asarray(history.index)
    drawn = []
    for column in columns:
        if column in history and history[column].notna().any():
            values = history[column].to_numpy(dtype=float)
            ax.plot(epochs, values, marker="o" if len(epochs) < 30 else None, markersize=3,
                    label=column.replace("elbo_", ""))
            drawn.append(values[np.isfinite(values)])
    if drawn:
        values = np.concatenate(drawn)
        # The first epochs' loss is often many times the rest; bound the axis by the later
        # epochs so that the part of the curve that matters is not flattened.
        later = np.concatenate([v[len(v) // 10:] for v in drawn])
        low, high = values.min(), later.max() if later.size else values.max()
        if high > low:
            margin = 0.05 * (high - low)
            ax.set_ylim(low - margin, high + margin)
        ax.legend(frameon=False)
    ax.set_xlabel("epoch")
    ax.set_ylabel("negative ELBO per cell (lower is better)")
    ax.set_title("Training history")
    ax.grid(alpha=0.3)
    if path is not None:
        figure.savefig(path, dpi=150)
    return figure
