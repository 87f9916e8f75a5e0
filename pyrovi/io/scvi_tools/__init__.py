"""scvi-tools' model files: read without running code, mapped to pyrovi's models and back.

- :mod:`~pyrovi.io.scvi_tools.safe_pickle`: ``model.pt`` through PyTorch's weights-only
  unpickler and an explicit allowlist;
- :mod:`~pyrovi.io.scvi_tools.folder`: model folders and scvi-hub downloads;
- :mod:`~pyrovi.io.scvi_tools.arguments`, :mod:`~pyrovi.io.scvi_tools.registry`: the
  constructor arguments and the set-up, in either library's terms;
- :mod:`~pyrovi.io.scvi_tools.linear_blocks`, :mod:`~pyrovi.io.scvi_tools.scvi_weights`:
  the weights, block by block.

The user-facing functions are :func:`pyrovi.from_scvi_tools` and the models'
``to_scvi_tools``.
"""

from pyrovi.io.scvi_tools.folder import ScviToolsFolder
from pyrovi.io.scvi_tools.safe_pickle import NotRead, allowed_names, read_model_pt

__all__ = ["NotRead", "ScviToolsFolder", "allowed_names", "read_model_pt"]
