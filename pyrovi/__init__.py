"""pyrovi: deep generative models for single-cell omics, written as Pyro model/guide pairs."""

__version__ = "0.1.0"
