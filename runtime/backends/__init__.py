"""Inference backends behind one small interface (see `base.Graph`)."""

from .base import BACKENDS, Graph, RuntimeOptions, load_graph, provider_names

__all__ = ["BACKENDS", "Graph", "RuntimeOptions", "load_graph", "provider_names"]
