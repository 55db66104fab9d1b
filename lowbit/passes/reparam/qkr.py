"""``qkr``: OFQ's query–key reparameterization of the self-attention blocks found in the graph.

The attention logits of a head depend on ``W_q`` and ``W_k`` only through their product, so
QKR computes them from the stacked product (a `QKRLinear`), and a weight quantizer sees that
product itself: docs/methods.md (QKR). Every ``scaled_dot_product_attention`` whose q and k are
data movement of linear projections of one input is rewritten; fused qkv projections keep
only their value rows. The q and k biases are dropped as in OFQ, which preserves the function
only when the query bias is zero: the report says so per block. Blocks with anything else
between projection and attention (rotary embeddings, q/k norms) are reported with the reason.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from lowbit.ir.annotations import Reparam, annotate
from lowbit.ir.graph import get_attr, op_name
from lowbit.ir.trace import graph_inputs
from lowbit.passes.base import LayerRecord, Pass, PassContext, PassResult
from lowbit.passes.config import PassConfig, option
from lowbit.passes.registry import register
from lowbit.passes.selection import matches_any

log = logging.getLogger(__name__)
aten = torch.ops.aten

_SDPA = {F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default}
_SOFTMAX = {F.softmax, torch.softmax, aten.softmax.int, aten._softmax.default}
_MATMUL = {torch.matmul, operator.matmul, aten.matmul.default, aten.bmm.default}
#: Pure data movement (each output element is one input element): what may sit between a projection and q/k/v.
_MOVES = {
    "view",
    "reshape",
    "_unsafe_view",
    "permute",
    "transpose",
    "t",
    "split",
    "split_with_sizes",
    "unbind",
    "select",
    "slice",
    "contiguous",
    "clone",
    "alias",
    "unsqueeze",
    "squeeze",
    "narrow",
    "chunk",
    "flatten",
    "unflatten",
    "getitem",
}
#: Largest probe value a float32 holds exactly.
_EXACT_FLOAT32 = 2**24


class QKRLinear(nn.Module):
    """``F.linear(x, W_qk)`` with ``W_qk`` rows ``(h, c)`` = ``((W_q^h)ᵀ W_k^h)[c, :]``, from latent bias-free
    ``q``, ``k``.

    ``weight_quantizer`` (None, or a fake-quantizer such as StatsQ) is applied to the product.
    """

    def __init__(self, q_weight: torch.Tensor, k_weight: torch.Tensor, num_heads: int) -> None:
        super().__init__()
        rows, channels = q_weight.shape
        self.num_heads = num_heads
        self.head_dim = rows // num_heads
        self.q = nn.Linear(channels, rows, bias=False, device=q_weight.device, dtype=q_weight.dtype)
        self.k = nn.Linear(channels, rows, bias=False, device=k_weight.device, dtype=k_weight.dtype)
        with torch.no_grad():
            self.q.weight.copy_(q_weight)
            self.k.weight.copy_(k_weight)
        self.register_module("weight_quantizer", None)

    def product(self) -> torch.Tensor:
        """The stacked ``[H·C, C]`` product before any quantizer."""
        heads, d = self.num_heads, self.head_dim
        wq = self.q.weight.view(heads, d, -1)
        wk = self.k.weight.view(heads, d, -1)
        return torch.einsum("hdc,hde->hce", wq, wk).reshape(-1, wk.shape[-1])

    @property
    def weight(self) -> torch.Tensor:
        product = self.product()
        return product if self.weight_quantizer is None else self.weight_quantizer(product)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, channels={self.q.in_features}"


class _NotRecognized(Exception):
    """Internal: why one attention block cannot be reparameterized (becomes a report entry)."""


@dataclass
class _Projection:
    """A linear projection in the graph: its node, input, weight ``[out, in]``, bias and owner path."""

    node: fx.Node
    x: fx.Node
    weight: torch.Tensor
    bias: torch.Tensor | None
    path: str


@dataclass
class _Block:
    """One recognized attention call and what QKR needs to rewrite it."""

    name: str
    sdpa: fx.Node
    q: _Projection
    k: _Projection
    v: _Projection | None  # set when v comes out of the same (fused) projection as q/k
    q_cols: torch.Tensor  # [H, d] projection column of each q head element
    k_cols: torch.Tensor
    v_cols: torch.Tensor | None
    scale: float
    qk_path: str
    v_path: str | None


@dataclass(frozen=True)
class QKRConfig(PassConfig):
    """Options of the ``qkr`` pass."""

    ignore: tuple[str, ...] = option((), help="attention blocks left as they are: module paths or glob/re: patterns")


@register
class QKR(Pass):
    """Reparameterize q/k of every recognized attention block by the per-head product ``W_qᵀW_k``."""

    name = "qkr"
    Config = QKRConfig
    stage = "prepare"
    produces = frozenset({"reparam"})
    forbids = frozenset({"quant", "fake_quant", "adapter"})
    pattern = "scaled_dot_product_attention over linear q/k projections"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        records: list[LayerRecord] = []
        candidates: list[tuple[str, fx.Node, _Projection, _Projection, _Projection | None]] = []
        for node in list(gm.graph.nodes):
            if _is_manual_attention(node):
                records.append(
                    LayerRecord(
                        _block_name(node),
                        "skipped",
                        (
                            f"not recognized: attention computed with explicit matmul/softmax (node {node.name}); "
                            "qkr rewrites scaled_dot_product_attention calls"
                        ),
                    )
                )
            if not _is_sdpa(node):
                continue
            name = _block_name(node)
            if matches_any(name, self.config.ignore) or self.config_for(name) is None:
                records.append(LayerRecord(name, "skipped", "ignored by the pass options"))
                continue
            try:
                candidates.append((name, node, *_projections(gm, node)))
            except _NotRecognized as exc:
                records.append(LayerRecord(name, "skipped", f"not recognized: {exc}"))
        blocks: list[_Block] = []
        if candidates:
            values = _probe(gm, ctx, candidates)
            for name, node, q, k, v in candidates:
                try:
                    blocks.append(_block(gm, name, node, q, k, v, values))
                except _NotRecognized as exc:
                    records.append(LayerRecord(name, "skipped", f"not recognized: {exc}"))
        records += [_rewrite(gm, block) for block in blocks]
        if blocks:
            gm.graph.lint()
            gm.recompile()
            _propagate_shapes(gm, ctx)
        for record in records:
            if record.action == "skipped":
                log.info("qkr: %s: %s", record.layer, record.reason)
        done = len(blocks)
        stats = {"blocks_found": len(records), "reparameterized": done, "not_recognized": len(records) - done}
        return PassResult(changed=done > 0, layers=records, stats=stats)


# --- finding the projections ----------------------------------------------------


def _is_sdpa(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in _SDPA


def _is_manual_attention(node: fx.Node) -> bool:
    """A softmax over a matmul (possibly scaled or masked): attention written out by hand."""
    is_softmax = (node.op == "call_function" and node.target in _SOFTMAX) or (
        node.op == "call_method" and node.target == "softmax"
    )
    current = node.args[0] if is_softmax and node.args else None
    for _ in range(4):
        if not isinstance(current, fx.Node):
            return False
        if (current.op == "call_function" and current.target in _MATMUL) or (
            current.op == "call_method" and current.target == "matmul"
        ):
            return True
        current = current.args[0] if current.args else None
    return False


def _block_name(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        if path:
            return path
    return node.name


def _is_move(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Identity)
    return op_name(node) in _MOVES


def _describe(node: fx.Node) -> str:
    return f"{op_name(node) or node.target} (node {node.name})"


def _trace_back(gm: fx.GraphModule, start: Any, role: str) -> _Projection:
    """Follow ``start`` back through data movement to the linear projection that produces it."""
    current = start
    while isinstance(current, fx.Node):
        projection = _as_projection(gm, current)
        if projection is not None:
            return projection
        if not _is_move(gm, current):
            raise _NotRecognized(
                f"{role} passes through {_describe(current)} between its projection and the attention "
                "(e.g. rotary position embeddings or a q/k norm), so the logits are not x·W_qᵀW_k·xᵀ"
            )
        current = next((a for a in current.args if isinstance(a, fx.Node)), None)
    raise _NotRecognized(f"{role} does not come from a linear projection")


def _attr(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    value = get_attr(gm, node)
    return value if isinstance(value, torch.Tensor) else None


def _as_projection(gm: fx.GraphModule, node: fx.Node) -> _Projection | None:
    """The node as a linear projection (``nn.Linear`` call, ATen/functional linear or addmm on get_attr weights)."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not isinstance(module, nn.Linear):
            return None
        if type(module).forward is not nn.Linear.forward or hasattr(module, "parametrizations"):
            raise _NotRecognized(f"projection {node.target} is not a plain nn.Linear ({type(module).__name__})")
        return _Projection(node, node.args[0], module.weight.detach(), _detached(module.bias), node.target)
    if node.op != "call_function":
        return None
    if node.target in (F.linear, aten.linear.default):
        weight, bias = _attr(gm, node.args[1]), _attr(gm, node.args[2]) if len(node.args) > 2 else None
        if weight is None:
            return None
        return _Projection(node, node.args[0], weight.detach(), _detached(bias), node.args[1].target.rpartition(".")[0])
    if node.target is aten.addmm.default and len(node.args) == 3 and not node.kwargs:
        bias, weight = _attr(gm, node.args[0]), _attr(gm, node.args[2])
        if weight is None or bias is None:
            return None
        owner = node.args[2].target.rpartition(".")[0]
        return _Projection(node, node.args[1], weight.detach().t(), bias.detach(), owner)
    return None


def _detached(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.detach()


def _sdpa_arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _projections(gm: fx.GraphModule, node: fx.Node) -> tuple[_Projection, _Projection, _Projection | None]:
    if _sdpa_arg(node, 7, "enable_gqa", False):
        raise _NotRecognized("grouped-query attention (enable_gqa=True) shares k heads across q heads")
    q = _trace_back(gm, node.args[0], "q")
    k = _trace_back(gm, node.args[1], "k")
    if q.x is not k.x:
        raise _NotRecognized(f"q and k project different inputs ({q.x.name}, {k.x.name}): not self-attention")
    if len(node.args[0].meta["tensor_meta"].shape) != 4:
        raise _NotRecognized("q is not a 4-D [batch, heads, tokens, head_dim] tensor")
    fused = q.node is k.node
    v = None
    if fused:
        try:
            v_proj = _trace_back(gm, node.args[2], "v")
        except _NotRecognized:
            v_proj = None
        v = v_proj if v_proj is not None and v_proj.node is q.node else None
    return q, k, v


# --- the probe: which projection column feeds each q/k/v element ------------------


class _ProbeInterpreter(fx.Interpreter):
    """Runs the graph with each projection's output replaced by ``token·width + column``."""

    def __init__(self, gm: fx.GraphModule, probed: set[fx.Node], watched: set[fx.Node]) -> None:
        super().__init__(gm)
        self.probed, self.watched = probed, watched
        self.values: dict[fx.Node, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.probed:
            self.values[n] = torch.tensor([out.shape[-1], out.numel()])
            out = torch.arange(out.numel(), dtype=torch.float32, device=out.device).reshape(out.shape).to(out.dtype)
        if n in self.watched:
            self.values[n] = out
        return out


def _example_values(gm: fx.GraphModule, ctx: PassContext) -> list[Any]:
    """Placeholder values: the example inputs if given, else tensors shaped like the traced ones."""
    if ctx.example_inputs or ctx.example_kwargs:
        return graph_inputs(gm, tuple(ctx.example_inputs), dict(ctx.example_kwargs))
    values = []
    generator = torch.Generator().manual_seed(0)
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            values.append(node.args[0] if node.args else None)
        elif meta.dtype.is_floating_point:
            values.append(torch.randn(tuple(meta.shape), generator=generator).to(meta.dtype))
        else:
            values.append(torch.ones(tuple(meta.shape), dtype=meta.dtype))
    return values


def _probe(gm: fx.GraphModule, ctx: PassContext, candidates: list) -> dict[fx.Node, torch.Tensor]:
    probed = {p.node for _, _, q, k, v in candidates for p in (q, k, v) if p is not None}
    watched = {a for _, node, *_ in candidates for a in node.args[:3]}
    interpreter = _ProbeInterpreter(gm, probed, watched)
    with torch.no_grad():
        interpreter.run(*_example_values(gm, ctx), enable_io_processing=False)
    return interpreter.values


def _columns(values: dict[fx.Node, torch.Tensor], arg: fx.Node, projection: _Projection, role: str) -> torch.Tensor:
    """``[H, d]`` projection columns of ``arg`` ([B, H, N, d]); checks that tokens map one to one in order."""
    width, numel = values[projection.node].tolist()
    if numel >= _EXACT_FLOAT32 or values[arg].dtype not in (torch.float32, torch.float64):
        raise _NotRecognized(
            f"{role}'s projection output ({numel} elements, {values[arg].dtype}) cannot be probed exactly"
        )
    probe = values[arg].long()
    batch, heads, tokens, dim = probe.shape
    column, token = probe % width, probe // width
    expected = torch.arange(batch).view(-1, 1, 1, 1) * tokens + torch.arange(tokens).view(1, 1, -1, 1)
    expected = expected.expand_as(token)
    if not torch.equal(token, expected):
        raise _NotRecognized(f"{role}'s tokens are not the projection's tokens in order")
    cols = column[0, :, 0, :]
    if not torch.equal(column, cols.view(1, heads, 1, dim).expand_as(column)):
        raise _NotRecognized(f"{role}'s projection columns differ between tokens")
    return cols


def _block(
    gm: fx.GraphModule,
    name: str,
    node: fx.Node,
    q: _Projection,
    k: _Projection,
    v: _Projection | None,
    values: dict[fx.Node, torch.Tensor],
) -> _Block:
    q_cols = _columns(values, node.args[0], q, "q")
    k_cols = _columns(values, node.args[1], k, "k")
    v_cols = _columns(values, node.args[2], v, "v") if v is not None else None
    if q_cols.shape != k_cols.shape:
        raise _NotRecognized(f"q and k have different head layouts {tuple(q_cols.shape)} and {tuple(k_cols.shape)}")
    scale = _sdpa_arg(node, 6, "scale", None)
    scale = 1 / math.sqrt(q_cols.shape[1]) if scale is None else float(scale)
    parent = q.path.rpartition(".")[0] if q.node is k.node else _common_parent(q.path, k.path)
    qk_path = _free_path(gm, parent, "qk")
    v_path = _free_path(gm, parent, "v") if v is not None else None
    return _Block(name, node, q, k, v, q_cols, k_cols, v_cols, scale, qk_path, v_path)


# --- the rewrite ------------------------------------------------------------------


def _free_path(gm: fx.GraphModule, parent: str, name: str) -> str:
    path = f"{parent}.{name}" if parent else name
    try:
        gm.get_submodule(path)
    except AttributeError:
        return path
    raise _NotRecognized(f"cannot add module {path}: the path is taken")


def _rewrite(gm: fx.GraphModule, block: _Block) -> LayerRecord:
    """Rewire one attention call to QKR; returns its report entry."""
    heads, head_dim = block.q_cols.shape
    qk_path, v_path = block.qk_path, block.v_path
    q_weight = block.q.weight[block.q_cols.flatten()]
    k_weight = block.k.weight[block.k_cols.flatten()]
    channels = q_weight.shape[1]
    module = QKRLinear(q_weight, k_weight, heads)
    gm.add_submodule(qk_path, module)
    graph, sdpa = gm.graph, block.sdpa
    tokens = sdpa.args[0].meta["tensor_meta"].shape[2]
    old = list(sdpa.args[:3])
    with graph.inserting_before(sdpa):
        x = block.q.x
        if len(x.meta["tensor_meta"].shape) != 3:
            x = graph.call_method("reshape", (x, (-1, tokens, channels)))
        qk = graph.call_module(qk_path, (x,))
        k_new = graph.call_method("transpose", (graph.call_method("unflatten", (qk, -1, (heads, channels))), 1, 2))
        q_new = graph.call_method("expand", (graph.call_method("unsqueeze", (x, 1)), -1, heads, -1, -1))
        v_new = old[2]
        if block.v is not None:
            v_linear = nn.Linear(
                channels,
                block.v_cols.numel(),
                bias=block.v.bias is not None,
                device=block.v.weight.device,
                dtype=block.v.weight.dtype,
            )
            with torch.no_grad():
                v_linear.weight.copy_(block.v.weight[block.v_cols.flatten()])
                if block.v.bias is not None:
                    v_linear.bias.copy_(block.v.bias[block.v_cols.flatten()])
            gm.add_submodule(v_path, v_linear)
            v_out = graph.call_module(v_path, (x,))
            v_heads = graph.call_method("unflatten", (v_out, -1, (heads, block.v_cols.shape[1])))
            v_new = graph.call_method("transpose", (v_heads, 1, 2))
    kwargs = {key: value for key, value in sdpa.kwargs.items() if key not in ("scale", "enable_gqa")}
    sdpa.args = (q_new, k_new, v_new, *sdpa.args[3:6])
    sdpa.kwargs = {**kwargs, "scale": block.scale}
    annotate(qk, qk_path, reparam=Reparam("qkr", f"heads={heads}, from {_sources(block)}"))
    _erase_dead(gm, old)
    q_bias = block.q.bias[block.q_cols.flatten()] if block.q.bias is not None else None
    dropped = 0.0 if q_bias is None else q_bias.abs().max().item()
    if dropped > 0:
        log.warning(
            "qkr: %s drops a nonzero query bias (max |b_q| = %.3g): the key-dependent logit term "
            "b_q·W_k·x_j is lost, so the block is not function preserving",
            block.name,
            dropped,
        )
    stats = {
        "qk": qk_path,
        "v": v_path or "unchanged",
        "heads": heads,
        "head_dim": head_dim,
        "channels": channels,
        "fused": block.q.node is block.k.node,
        "scale": block.scale,
        "function_preserving": dropped == 0.0,
        "dropped_q_bias_max": dropped,
        "qk_params_before": 2 * heads * head_dim * channels,
        "qk_params_after": heads * channels * channels,
    }
    return LayerRecord(block.name, "reparameterized", stats=stats)


def _sources(block: _Block) -> str:
    return block.q.path if block.q.node is block.k.node else f"{block.q.path}, {block.k.path}"


def _common_parent(a: str, b: str) -> str:
    common = []
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def _erase_dead(gm: fx.GraphModule, roots: list[Any]) -> None:
    """Erase the nodes (and then the submodules) that the rewired q/k/v paths no longer need."""
    graph = gm.graph
    stack = [r for r in roots if isinstance(r, fx.Node)]
    removed_targets: set[str] = set()
    erased: set[fx.Node] = set()
    while stack:
        node = stack.pop()
        if node in erased or node.users or node.op == "placeholder":
            continue
        erased.add(node)
        if node.op in ("call_module", "get_attr"):
            removed_targets.add(node.target if node.op == "call_module" else node.target.rpartition(".")[0])
        inputs = list(node.all_input_nodes)
        graph.erase_node(node)
        stack.extend(inputs)
    used = {n.target for n in graph.nodes if n.op == "call_module"}
    used |= {n.target.rpartition(".")[0] for n in graph.nodes if n.op == "get_attr"}
    for target in sorted(removed_targets - used):
        if target and not any(u == target or u.startswith(target + ".") for u in used):
            gm.delete_submodule(target)


def _propagate_shapes(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Record ``tensor_meta`` on the new nodes (the rest of the graph is unchanged)."""
    with torch.no_grad():
        ShapeProp(gm).run(*_example_values(gm, ctx), enable_io_processing=False)


__all__ = ["QKR", "QKRConfig", "QKRLinear"]
