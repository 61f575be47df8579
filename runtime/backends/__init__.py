"""Inference backends behind one small interface (see `base.Graph`)."""

from .base import Graph, load_graph, provider_names

__all__ = ["Graph", "load_graph", "provider_names"]
