"""Parameter-efficient adapter passes and their merge. Importing this package registers them
(``lora``, ``sorsa``, ``bone``, ``merge_adapters``, ``unmerge_adapters``)."""

from lowbit.passes.adapters.bone import BatModule, Bone, BoneConfig, BoneModule
from lowbit.passes.adapters.common import AdapterError, AdapterModule, freeze_base
from lowbit.passes.adapters.io import import_peft_lora, load_adapters, save_adapters
from lowbit.passes.adapters.lora import LoRA, LoRAConfig, LoRAModule
from lowbit.passes.adapters.merge import MergeAdapters, UnmergeAdapters
from lowbit.passes.adapters.sorsa import SORSA, SORSAConfig, SORSAModule, orthonormal_loss, orthonormal_regularizer

__all__ = [
    "AdapterError",
    "AdapterModule",
    "BatModule",
    "Bone",
    "BoneConfig",
    "BoneModule",
    "LoRA",
    "LoRAConfig",
    "LoRAModule",
    "MergeAdapters",
    "SORSA",
    "SORSAConfig",
    "SORSAModule",
    "UnmergeAdapters",
    "freeze_base",
    "import_peft_lora",
    "load_adapters",
    "orthonormal_loss",
    "orthonormal_regularizer",
    "save_adapters",
]
