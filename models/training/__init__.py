"""Training of the embedded default model. `shapes` is NumPy + Pillow only; `train` needs torch and diffusers."""
