"""jaxdec: lossless speculative decoding for LLMs in JAX.

    model = jaxdec.load("path/to/converted")          # see `python -m jaxdec.convert`
    out = jaxdec.generate(model, ["def fib(n):"], max_new_tokens=64)
    out.tokens, out.texts, out.stats
    jaxdec.logits(model, [1, 2, 3])                   # [3, vocab] float32 numpy
    mesh = jaxdec.make_mesh(data=1, model=8)          # then jaxdec.load(path, mesh=mesh)
"""

from jaxdec import spec
from jaxdec.config import ModelConfig
from jaxdec.generate import GenerateOutput, Stats, generate, logits
from jaxdec.heads import Heads, load_heads
from jaxdec.loading import Model, load
from jaxdec.sharding import make_mesh

__version__ = "0.1.0"

__all__ = ["spec", "GenerateOutput", "Heads", "Model", "ModelConfig", "Stats", "generate", "load", "load_heads", "logits", "make_mesh", "__version__"]
