"""Model descriptions and the embedded default model."""
