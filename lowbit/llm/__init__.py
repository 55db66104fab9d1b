"""Causal-LM generation: a decoder lowered to prefill and decode steps over a KV cache, and `generate` on top.

`lowbit.compile(llm, ..., dynamic_shapes=...)` on a transformers causal LM of a known family (`family`) returns a
`CompiledCausalLM`; docs/generation.md describes the design.
"""
