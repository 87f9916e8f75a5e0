"""Reading and writing models in scvi-tools' file layout (``pyrovi.io.scvi_tools``)."""
