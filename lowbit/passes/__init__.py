"""Passes: the base class, the registry and the pipeline that runs them."""

from lowbit.passes.base import LayerRecord, Pass, PassContext, PassResult
from lowbit.passes.config import PassConfig, option
from lowbit.passes.pipeline import Pipeline, PipelineReport, check_order
from lowbit.passes.registry import available, get, lookup, parse_spec, register

__all__ = [
    "LayerRecord",
    "Pass",
    "PassConfig",
    "PassContext",
    "PassResult",
    "Pipeline",
    "PipelineReport",
    "available",
    "check_order",
    "get",
    "lookup",
    "option",
    "parse_spec",
    "register",
]
