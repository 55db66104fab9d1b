"""`CompiledCausalLM`: a compiled decoder that scores any length in range and generates, and its artifact.

It is what ``lowbit.compile(llm, ..., dynamic_shapes=...)`` returns. Calling it runs the prompt through the decoder's
steps and returns every position's logits in eager's output structure; `CompiledCausalLM.generate` follows
transformers' ``generate``. The artifact holds the decoder (a TVM library, or the torch target's graph and rotary
table), ``decoder.json`` (family spec, limits, step sizes, how each linear was lowered), the generation config and,
when the compile was given one, the tokenizer's files, so ``lowbit generate`` needs nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lowbit import artifact
from lowbit.compiler import CompiledModel, CompileReport
from lowbit.errors import ArtifactError
from lowbit.interface import Interface
from lowbit.llm.generate import Decoder, GenerationOptions, all_logits, generate
from lowbit.llm.runtime import DecoderLayout

DECODER_FILE = "decoder.json"
ROTARY_FILE = "rotary.pt"
GENERATION_FILE = "generation_config.json"
TOKENIZER_DIR = "tokenizer"
#: Keys of a transformers generation config that become `GenerationOptions` defaults.
_OPTION_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id")


class CompiledCausalLM(CompiledModel):
    """A compiled causal LM with a KV-cache decoder: ``model(input_ids, attention_mask=None)`` gives every
    position's logits for any batch and length in the compiled range; `generate` continues prompts."""

    def __init__(
        self,
        graph: Any,
        decoder: Decoder | None,
        report: CompileReport,
        info: dict[str, Any],
        interface: Interface,
        layout: DecoderLayout,
        generation: Mapping[str, Any] | None = None,
        tokenizer: Any = None,
        library: Any = None,
        source: Path | None = None,
    ) -> None:
        super().__init__(graph, decoder, report, info, interface, source)
        self.layout = layout
        #: The model's generation config (``eos_token_id``, ``pad_token_id``, sampling defaults) as a dict.
        self.generation = dict(generation or {})
        self.tokenizer = tokenizer
        self._library = library

    @property
    def decoder(self) -> Decoder:
        if self._runner is None:
            from lowbit.errors import BackendError

            raise BackendError(
                f"this {self.report.target} decoder cannot run on this machine (cross-compiled); export it and run "
                "`lowbit generate ARTIFACT --rpc HOST:PORT` against the device"
            )
        return self._runner

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Any:
        self.interface.check((input_ids,), {})
        return self.interface.rebuild((all_logits(self.decoder, input_ids, attention_mask),))

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        streamer: Any = None,
        generator: torch.Generator | None = None,
        **options: Any,
    ) -> torch.Tensor:
        """The prompts followed by the generated tokens, as transformers' ``generate`` returns them.

        ``options``: ``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``,
        ``pad_token_id``; unset ones come from the model's generation config, then transformers' defaults.
        """
        unknown = sorted(set(options) - set(_OPTION_KEYS))
        if unknown:
            from lowbit.errors import GenerationError

            raise GenerationError(f"unknown generation option(s) {unknown}; known: {list(_OPTION_KEYS)}")
        defaults = {key: self.generation[key] for key in _OPTION_KEYS if self.generation.get(key) is not None}
        chosen = GenerationOptions(**{**defaults, **{k: v for k, v in options.items() if v is not None}})
        return generate(self.decoder, input_ids, chosen, attention_mask, streamer, generator)

    def export(self, path: str | Path, overwrite: bool = False, format: str = "lowbit") -> Path:
        """Write the decoder, ``decoder.json``, the generation config and the tokenizer to the directory ``path``;
        ``format="gguf"`` writes the file ``path`` for llama.cpp instead (`lowbit.llm.gguf_export`)."""
        if format == "gguf":
            from lowbit.llm.gguf_export import write_gguf

            return write_gguf(self.graph, self.layout.spec, self.tokenizer, path, overwrite=overwrite)
        if format != "lowbit":
            raise ArtifactError(f"unknown export format {format!r}; known: 'lowbit' (an artifact directory), 'gguf'")
        if self.source is not None:
            return artifact.copy(self.source, path, overwrite=overwrite)
        info = {
            **self._info,
            "interface": self.interface.as_dict(),
            "report": self.report.summary(),
            "decoder": self.layout.as_dict(),
        }
        return artifact.write(path, self.report.target, self._runner, info, overwrite=overwrite, save=self._save)

    def _save(self, directory: Path) -> list[str]:
        files = [GENERATION_FILE]
        (directory / GENERATION_FILE).write_text(json.dumps(self.generation, indent=2, default=str) + "\n")
        if self._library is not None:
            files += self._library.save(directory)
        else:
            from lowbit.backends import get_backend

            files += get_backend("torch").save(self.graph, directory)
            decoder = self._runner
            torch.save({"cos": decoder.cos, "sin": decoder.sin}, directory / ROTARY_FILE)
            files.append(ROTARY_FILE)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
            files += sorted(
                str(p.relative_to(directory)) for p in (directory / TOKENIZER_DIR).rglob("*") if p.is_file()
            )
        return files


def load(path: Path, manifest: Mapping[str, Any], session: Any = None) -> CompiledCausalLM:
    """The causal LM artifact at ``path`` (checked by `artifact.read_manifest`), its decoder on this machine or on
    the device of ``session`` (a TVM RPC session)."""
    layout = DecoderLayout.from_dict(manifest["decoder"])
    target = manifest["target"]
    report, interface, info = artifact.restored(manifest)
    generation = json.loads((path / GENERATION_FILE).read_text()) if (path / GENERATION_FILE).is_file() else {}
    tokenizer = None
    if (path / TOKENIZER_DIR).is_dir():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path / TOKENIZER_DIR))
    if target == "torch":
        decoder, graph = _torch_decoder(path, layout)
        return CompiledCausalLM(graph, decoder, report, info, interface, layout, generation, tokenizer, source=path)
    from lowbit.llm.library import DecoderLibrary

    if session is not None:
        library, device = DecoderLibrary.remote(path, session)
        decoder = library.decoder(layout, device)
    else:
        library = DecoderLibrary.load(path)
        decoder = library.decoder(layout)
    return CompiledCausalLM(None, decoder, report, info, interface, layout, generation, tokenizer, library, path)


def _torch_decoder(path: Path, layout: DecoderLayout) -> tuple[Decoder, Any]:
    from lowbit.backends import get_backend
    from lowbit.llm.reference import TorchDecoder
    from lowbit.llm.weights import read_weights

    if not (path / ROTARY_FILE).is_file():
        raise ArtifactError(f"{path}: {ROTARY_FILE} is missing")
    graph = get_backend("torch").load(path)
    rotary = torch.load(path / ROTARY_FILE)
    weights = read_weights(graph, layout.spec)
    return TorchDecoder(layout.spec, weights, rotary["cos"], rotary["sin"], layout.max_batch), graph


__all__ = ["CompiledCausalLM", "load"]
