"""Inline the grad-mode and autocast regions that torch.export wraps into submodules.

torch.export records ``with torch.no_grad():`` (and ``torch.autocast``) blocks inside a
model's forward as higher-order ops, ``wrap_with_set_grad_enabled(False, submod, *args)``,
whose body is a child ``GraphModule``. transformers' rotary embeddings are computed in
such a block. Grad mode means nothing to a compiled inference module and TVM's importer
knows no higher-order ops, so the body is copied into the parent graph and the call's
``getitem`` users read the copied results directly.
"""

from __future__ import annotations

import copy
import logging
import operator

import torch.fx as fx

from lowbit.errors import BackendError

log = logging.getLogger(__name__)

#: Names of the higher-order ops whose body runs unchanged at inference, and the
#: number of their leading arguments that are not the submodule or its inputs.
_WRAPPERS = {"wrap_with_set_grad_enabled": 1, "wrap_with_autocast": 4}


def inline_wrapped_regions(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` with every grad-mode/autocast region inlined (``gm`` itself if it has none)."""
    if not any(_wrapper_name(node) for node in gm.graph.nodes):
        return gm
    gm = copy.deepcopy(gm)
    for node in list(gm.graph.nodes):
        name = _wrapper_name(node)
        if name:
            _inline(gm, node, _WRAPPERS[name])
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _wrapper_name(node: fx.Node) -> str | None:
    if node.op != "call_function":
        return None
    name = getattr(node.target, "__name__", "")
    return name if name in _WRAPPERS else None


def _inline(gm: fx.GraphModule, node: fx.Node, leading: int) -> None:
    """Copy the body of one wrapper call before it and rewire its users."""
    submodule_arg, inputs = node.args[leading], node.args[leading + 1 :]
    if not isinstance(submodule_arg, fx.Node) or submodule_arg.op != "get_attr":
        raise BackendError(f"node '{node.name}': expected a submodule argument, got {submodule_arg!r}")
    body = getattr(gm, str(submodule_arg.target))
    placeholders = [n for n in body.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise BackendError(f"node '{node.name}': {len(inputs)} inputs for a body with {len(placeholders)}")
    for name, value in body.named_buffers():
        gm.register_buffer(f"{submodule_arg.target}_{name}".replace(".", "_"), value)
    value_map: dict[fx.Node, fx.Node] = dict(zip(placeholders, inputs))
    with gm.graph.inserting_before(node):
        for body_node in body.graph.nodes:
            if body_node.op in ("placeholder", "output"):
                continue
            if body_node.op == "get_attr":
                value_map[body_node] = gm.graph.get_attr(f"{submodule_arg.target}_{body_node.target}".replace(".", "_"))
                continue
            value_map[body_node] = gm.graph.node_copy(body_node, lambda n: value_map[n])
    results = body.graph.output_node().args[0]
    results = results if isinstance(results, (tuple, list)) else (results,)
    for user in list(node.users):
        if user.op == "call_function" and user.target is operator.getitem:
            user.replace_all_uses_with(value_map.get(results[user.args[1]], results[user.args[1]]))
        else:
            raise BackendError(f"node '{node.name}': its result is used by '{user.name}', not through getitem")
    log.debug("inlined %s (%s)", node.name, submodule_arg.target)
