"""edgesd: Stable Diffusion on machines without a big GPU.

`edgesd.Pipeline.load(path)` runs exported graphs with ONNX Runtime or OpenVINO; tokenizer,
guidance, samplers, latents and image handling are NumPy. Importing edgesd never
imports torch, diffusers, transformers, optimum or nncf.
"""

from .backends import RuntimeOptions
from .errors import Cancelled, EdgesdError
from .families import FAMILIES, ModelFamily
from .pipeline import Pipeline
from .request import GenerationRequest, GenerationResult

__all__ = ["Pipeline", "GenerationRequest", "GenerationResult", "RuntimeOptions", "ModelFamily", "FAMILIES",
           "EdgesdError", "Cancelled"]
__version__ = "0.1.0"
