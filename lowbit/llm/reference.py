"""The decoder in torch over a static KV cache: the torch target's generation, and the oracle of the TVM lowering.

Every step takes ``C`` new tokens per row with their rotary positions and the attention mask of all ``n`` positions
so far; their keys and values are written to cache slots ``n - C .. n - 1`` and each query attends causally to the
unmasked slots. The block is the family's (`family.Family`: its norm, positions and MLP), with the graph's own
linears; a fused projection's output is split into its roles.
"""

from __future__ import annotations

import torch

from lowbit.llm.family import ATTENTION_INPUT, MLP_INPUT, DecoderSpec
from lowbit.llm.weights import DecoderWeights


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x`` ``(B, C, H, D)`` with ``cos``/``sin`` ``(B, C, 1, R)`` (rotate-half convention) on
    the first ``R`` features of each head; the rest pass through."""
    dim = cos.shape[-1]
    part, rest = x[..., :dim], x[..., dim:]
    half = dim // 2
    rotated = torch.cat([-part[..., half:], part[..., :half]], dim=-1)
    return torch.cat([part * cos + rotated * sin, rest], dim=-1)


def norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm, or LayerNorm where the family's norms have a bias."""
    if bias is None:
        return rms_norm(x, weight, eps)
    return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)


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
        family = spec.description
        batch, chunk = ids.shape
        x = w.embedding(ids)
        if w.positions is not None:
            x = x + w.positions(positions)
        cos, sin = self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)
        for i in range(spec.layers):
            h = self._norm(x, spec.norm(i, "attn"))
            out = self._project(i, ATTENTION_INPUT, h)
            q = out["q"].view(batch, chunk, spec.q_heads, spec.head_dim)
            k = out["k"].view(batch, chunk, spec.kv_heads, spec.head_dim)
            v = out["v"].view(batch, chunk, spec.kv_heads, spec.head_dim)
            if family.position == "rotary":
                q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            attended = cache_attention(q, k, v, mask, cache[2 * i], cache[2 * i + 1], spec.head_dim**-0.5)
            x = x + self._project(i, ("o",), attended.reshape(batch, chunk, -1))["o"]
            out = self._project(i, MLP_INPUT, self._norm(x, spec.norm(i, "mlp")))
            if family.mlp == "gated_silu":
                mixed = torch.nn.functional.silu(out["gate"]) * out["up"]
            else:
                mixed = torch.nn.functional.gelu(out["up"], approximate="tanh")
            x = x + self._project(i, ("down",), mixed)["down"]
        return self._norm(x, spec.final_norm)

    def _norm(self, x: torch.Tensor, path: str) -> torch.Tensor:
        return norm(x, self.weights.norms[path], self.weights.norm_biases.get(path), self.spec.norm_eps)

    def _project(self, index: int, roles: tuple[str, ...], x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The outputs of block ``index``'s projections holding ``roles``, by role (fused ones split)."""
        outputs = {}
        for path, held in self.spec.projections(index, roles):
            y = self.weights.linears[path](x)
            outputs.update(zip(held, y.split(self.spec.widths(held, y.shape[-1]), dim=-1)))
        return outputs


__all__ = ["TorchDecoder", "cache_attention", "norm", "rms_norm", "rotate"]
