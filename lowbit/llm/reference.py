"""The decoder in torch over a static KV cache: the torch target's generation, and the oracle of the TVM lowering.

Every step takes ``C`` new tokens per row with their rotary positions and the attention mask of all ``n`` positions
so far; their keys and values are written to cache slots ``n - C .. n - 1`` and each query attends causally to the
unmasked slots. The math is the transformers Llama block's (docs/generation.md), with the graph's own linears.
"""

from __future__ import annotations

import torch

from lowbit.llm.family import DecoderSpec
from lowbit.llm.weights import DecoderWeights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` ``(B, C, H, D)`` with ``cos``/``sin`` ``(B, C, 1, D)`` (rotate-half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def cache_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Write ``k``/``v`` ``(B, C, Hkv, D)`` into the caches ``(B, Hkv, T, D)`` at slots ``n - C .. n - 1`` (``n`` =
    ``mask.shape[1]``) and attend: query ``i`` sees slots ``j <= n - C + i`` whose ``mask`` is nonzero. A query that
    sees no slot gets zeros."""
    batch, chunk, q_heads, _ = q.shape
    n = mask.shape[1]
    start = n - chunk
    k_cache[:, :, start:n] = k.transpose(1, 2)
    v_cache[:, :, start:n] = v.transpose(1, 2)
    group = q_heads // k.shape[2]
    keys = k_cache[:, :, :n].repeat_interleave(group, dim=1)
    values = v_cache[:, :, :n].repeat_interleave(group, dim=1)
    scores = torch.einsum("bchd,bhnd->bhcn", q, keys) * scale
    causal = torch.arange(n).unsqueeze(0) <= (start + torch.arange(chunk)).unsqueeze(1)
    allowed = causal.unsqueeze(0) & mask.bool().unsqueeze(1)  # (B, C, n)
    scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    weights = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    values = values.masked_fill(~mask.bool()[:, None, :, None], 0.0)  # masked slots may hold anything
    return torch.einsum("bhcn,bhnd->bchd", weights, values)


class TorchDecoder:
    """`generate.Decoder` in torch: the decoder of ``spec`` with ``weights``, the rotary table ``cos``/``sin``
    ``(max_context, head_dim)`` and room for ``max_batch`` rows. Steps take any number of tokens."""

    #: Any step size runs (`generate.chunk_plan` takes the whole prompt at once).
    chunks = None

    def __init__(
        self, spec: DecoderSpec, weights: DecoderWeights, cos: torch.Tensor, sin: torch.Tensor, max_batch: int
    ) -> None:
        self.spec = spec
        self.weights = weights
        self.cos = cos
        self.sin = sin
        self.max_batch = max_batch
        self.max_context = int(cos.shape[0])
        self.vocab = spec.vocab
        self._cache: list[torch.Tensor] = []

    def reset(self, batch: int) -> None:
        self._cache = self.new_cache(batch)

    def new_cache(self, batch: int) -> list[torch.Tensor]:
        """Keys and values of every block, ``(batch, kv_heads, max_context, head_dim)`` each, zeroed."""
        shape = (batch, self.spec.kv_heads, self.max_context, self.spec.head_dim)
        return [torch.zeros(shape) for _ in range(2 * self.spec.layers)]

    @torch.no_grad()
    def step(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, last: int | None) -> torch.Tensor:
        """Logits of column ``last`` ``(batch, vocab)``, or of every column ``(batch, C, vocab)`` when None."""
        hidden = self.hidden(ids, positions, mask, self._cache)
        return self.weights.linears[self.spec.lm_head](hidden if last is None else hidden[:, last])

    @torch.no_grad()
    def hidden(
        self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: list[torch.Tensor]
    ) -> torch.Tensor:
        """The final-normed hidden states ``(B, C, hidden)`` of ``ids`` ``(B, C)``; updates ``cache`` in place."""
        spec, w = self.spec, self.weights
        batch, chunk = ids.shape
        x = w.embedding(ids)
        cos, sin = self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)
        for i in range(spec.layers):
            linear = {role: w.linears[spec.linear(i, role)] for role in ("q", "k", "v", "o", "gate", "up", "down")}
            h = rms_norm(x, w.norms[spec.norm(i, "attn")], spec.norm_eps)
            q = linear["q"](h).view(batch, chunk, spec.q_heads, spec.head_dim)
            k = linear["k"](h).view(batch, chunk, spec.kv_heads, spec.head_dim)
            v = linear["v"](h).view(batch, chunk, spec.kv_heads, spec.head_dim)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            attended = cache_attention(q, k, v, mask, cache[2 * i], cache[2 * i + 1], spec.head_dim**-0.5)
            x = x + linear["o"](attended.reshape(batch, chunk, -1))
            h = rms_norm(x, w.norms[spec.norm(i, "mlp")], spec.norm_eps)
            x = x + linear["down"](torch.nn.functional.silu(linear["gate"](h)) * linear["up"](h))
        return rms_norm(x, w.norms[spec.final_norm], spec.norm_eps)


__all__ = ["TorchDecoder", "cache_attention", "rms_norm", "rotate"]
