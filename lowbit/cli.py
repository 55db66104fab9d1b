"""The ``lowbit`` command line: compile, run, generate, inspect, trace, recipes, passes, demo.

A MODEL argument is a built-in zoo name (``lowbit trace --list`` shows them) or
``package.module:factory``, where ``factory()`` returns ``(model, example_inputs)``.
Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lowbit import progress
from lowbit.errors import LowbitError

log = logging.getLogger("lowbit")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    progress.enable(not args.quiet)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    with _logging_to_stderr(logging.WARNING if args.quiet else logging.INFO):
        try:
            return args.run(args) or 0
        except LowbitError as exc:
            print(f"lowbit: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("lowbit: interrupted", file=sys.stderr)
            return 130


@contextlib.contextmanager
def _logging_to_stderr(level: int) -> Iterator[None]:
    """Progress and warnings of lowbit's own loggers go to stderr while a command runs; other libraries are left
    alone, and the logger is restored afterwards (a longer process that calls `main` keeps its own setup)."""
    previous = log.level
    handler = None
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("lowbit: %(message)s"))
        log.addHandler(handler)
    log.setLevel(level)
    try:
        yield
    finally:
        log.setLevel(previous)
        if handler is not None:
            log.removeHandler(handler)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowbit",
        description="Compile PyTorch models: trace to torch.fx, rewrite with passes, lower to a backend.",
        epilog="Run 'lowbit COMMAND --help' for the options of a command.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only print results and errors, no progress")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="compile the built-in real model (all-MiniLM-L6-v2) and report size, accuracy, speed",
        description="Compile all-MiniLM-L6-v2 (real weights) with a default recipe and compare it with eager PyTorch.",
    )
    demo.add_argument("--recipe", default=None, help="recipe name or path (default: the demo's default recipe)")
    demo.add_argument("--target", default=None, help="backend target (default: the demo's default target)")
    demo.add_argument("--repeats", type=int, default=20, help="timed runs per model; the median is reported")
    demo.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    demo.set_defaults(run=_demo)

    comp = commands.add_parser(
        "compile",
        help="compile a model and optionally export it",
        description="Trace MODEL, run a recipe's convert passes (or --pass list), compile for a target.",
    )
    _model_args(comp)
    comp.add_argument(
        "--target", default=None, help="torch, x86, arm or cuda (default: the recipe's target, else torch)"
    )
    comp.add_argument("--export", type=Path, metavar="DIR", help="write the compiled artifact to DIR")
    comp.add_argument(
        "--export-gguf",
        type=Path,
        metavar="FILE",
        help="compile MODEL as a causal LM (llama, mistral, qwen2) and write it as a GGUF file for llama.cpp",
    )
    comp.add_argument(
        "--tokenizer", type=Path, metavar="DIR", help="the transformers tokenizer directory --export-gguf writes"
    )
    comp.add_argument(
        "--export-onnx", type=Path, metavar="DIR", help="write the compiled graph as model.onnx for ONNX Runtime to DIR"
    )
    comp.add_argument(
        "--onnx-int8",
        choices=("fast", "exact"),
        default="fast",
        help="--export-onnx's int8-activation linears: ONNX Runtime's int8 MatMulNBits (fast, its own per-block "
        "activation rounding) or lowbit's per-token arithmetic bit for bit (exact, slower in ONNX Runtime)",
    )
    comp.add_argument("--dump-dir", type=Path, metavar="DIR", help="write the IR before and after every pass to DIR")
    comp.add_argument(
        "--calibration",
        type=Path,
        metavar="FILE",
        help="calibration data for passes that need it (gptq, awq, ...): .npz or .pt input batches, "
        "or a text file tokenized by the model's tokenizer (zoo models that have one)",
    )
    tune = comp.add_argument_group("TVM kernel tuning")
    tune.add_argument(
        "--tune",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="tune the low-bit kernels that have no finished record, with the recipe's tune budget "
        "(--no-tune: hand schedules only; default: use recorded tunings, measure nothing)",
    )
    tune.add_argument(
        "--tune-trials", type=int, metavar="N", help="candidates measured per kernel (default: the recipe's)"
    )
    tune.add_argument(
        "--tune-rpc",
        metavar="HOST:PORT",
        help="measure on a remote device: an RPC tracker (with --tune-key) or an RPC server",
    )
    tune.add_argument("--tune-key", metavar="KEY", help="device key at the tracker given by --tune-rpc")
    tune.add_argument(
        "--tune-timeout",
        type=float,
        metavar="S",
        help="seconds each step on the --tune-rpc device may take (connecting, uploading, running a "
        "candidate) before it counts as lost (default 60)",
    )
    tune.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="tuning database directory (default: $LOWBIT_CACHE_DIR, else ~/.cache/lowbit/tvm)",
    )
    comp.set_defaults(run=_compile)

    run = commands.add_parser(
        "run",
        help="run an exported TVM artifact here or on a remote device (TVM RPC)",
        description="Run ARTIFACT with the TVM runtime alone, on this machine or on the device at "
        "--rpc; print a summary of each output and the median latency.",
    )
    run.add_argument("artifact", type=Path, help="directory written by 'lowbit compile --export' (a TVM target)")
    inputs = run.add_mutually_exclusive_group()
    inputs.add_argument(
        "--input",
        type=Path,
        metavar="FILE.npz",
        help="input arrays by input name (or arr_0, arr_1, ... in order, as numpy.savez writes them)",
    )
    inputs.add_argument(
        "--random",
        action="store_true",
        help="random valid inputs of the compiled shapes (the default): token ids within their vocabulary, "
        "floats standard normal",
    )
    run.add_argument("--rpc", metavar="HOST:PORT", help="the RPC server of the device (or its tracker, with --key)")
    run.add_argument("--key", help="device key at the RPC tracker given by --rpc")
    run.add_argument(
        "--timeout", type=float, default=60.0, metavar="S", help="seconds to wait for the device (default 60)"
    )
    run.add_argument("--repeats", type=int, default=10, help="timed runs; the median is reported (default 10)")
    run.set_defaults(run=_run)

    gen = commands.add_parser(
        "generate",
        help="generate text with an exported causal LM, here or on a remote device (TVM RPC)",
        description="Continue --prompt with the causal LM in ARTIFACT (compiled with dynamic_shapes and a "
        "tokenizer), streaming the text as it is produced; prefill and decode speeds go to stderr.",
    )
    gen.add_argument("artifact", type=Path, help="directory written by CompiledCausalLM.export")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to generate (default 64)")
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, help="sampling temperature (default: the model's, else 1.0)")
    gen.add_argument("--top-k", type=int, help="sample among the k most likely tokens (default: the model's)")
    gen.add_argument("--top-p", type=float, help="nucleus sampling mass (default: the model's)")
    gen.add_argument("--seed", type=int, default=0, help="random seed of sampling (default 0)")
    gen.add_argument("--rpc", metavar="HOST:PORT", help="the RPC server of the device (or its tracker, with --key)")
    gen.add_argument("--key", help="device key at the RPC tracker given by --rpc")
    gen.add_argument(
        "--timeout", type=float, default=60.0, metavar="S", help="seconds to wait for the device (default 60)"
    )
    gen.set_defaults(run=_generate)

    inspect = commands.add_parser(
        "inspect",
        help="print a model's graph with lowbit annotations",
        description="Print the graph of MODEL (after the given passes) or of an exported artifact directory.",
    )
    _model_args(inspect)
    inspect.add_argument("--annotated", action="store_true", help="show only nodes that carry lowbit annotations")
    inspect.set_defaults(run=_inspect)

    trace = commands.add_parser(
        "trace",
        help="try every tracer on a model and show where tracing breaks",
        description="Try each tracer on MODEL and report success, node count or the construct that broke it.",
    )
    trace.add_argument("model", nargs="?", help="zoo name or package.module:factory")
    trace.add_argument(
        "--leaf",
        action="append",
        default=[],
        metavar="PATH_OR_CLASS",
        help="treat this module (path or class name) as an opaque leaf; repeatable",
    )
    trace.add_argument("--list", action="store_true", help="list the built-in zoo models")
    trace.set_defaults(run=_trace)

    rec = commands.add_parser(
        "recipes",
        help="list the shipped recipes, or show one",
        description="List the shipped recipes with their status, or print one recipe's YAML.",
    )
    rec.add_argument("name", nargs="?", help="recipe to show")
    rec.set_defaults(run=_recipes)

    passes = commands.add_parser(
        "passes",
        help="list the registered passes and their options",
        description="List every registered pass with its stage and options (defaults shown).",
    )
    passes.set_defaults(run=_passes)
    return parser


def _model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", help="zoo name, package.module:factory, an .onnx file, or (inspect only) an artifact directory"
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--recipe", help="recipe name or YAML path")
    group.add_argument(
        "--pass",
        dest="passes",
        action="append",
        metavar="NAME[:KEY=VALUE,...]",
        help="a pass to run, e.g. rtn:bits=4,group_size=64; repeatable, run in order",
    )


def _demo(args: argparse.Namespace) -> None:
    from lowbit import demo

    results = demo.run(recipe=args.recipe, target=args.target, repeats=args.repeats)
    print(demo.format_results(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n")


def _compile(args: argparse.Namespace) -> None:
    import lowbit

    model, inputs, kwargs = _load_model(args.model)
    calibration = None
    if args.calibration:
        from lowbit.calibration import ARRAY_SUFFIXES, load_calibration

        text = args.calibration.suffix not in ARRAY_SUFFIXES
        calibration = load_calibration(args.calibration, inputs, kwargs, _tokenizer(args.model) if text else None)
    causal_lm = _causal_lm_options(args)
    if causal_lm:  # the example ids only size the decoder, which builds its own masks
        kwargs = {name: value for name, value in kwargs.items() if name != "attention_mask"}
    compiled = lowbit.compile(
        model,
        inputs,
        example_kwargs=kwargs,
        recipe=args.recipe,
        passes=_pass_list(args.passes),
        target=args.target,
        dump_dir=args.dump_dir,
        calibration=calibration,
        tune=_tune_option(args),
        cache_dir=args.cache_dir,
        **causal_lm,
    )
    print(compiled.report)
    if args.export:
        print(f"exported to {compiled.export(args.export)}")
    if args.export_gguf:
        print(f"exported GGUF to {compiled.export(args.export_gguf, format='gguf')}")
    if args.export_onnx:
        print(f"exported ONNX to {compiled.export(args.export_onnx, format='onnx', int8=args.onnx_int8)}")


def _causal_lm_options(args: argparse.Namespace) -> dict[str, Any]:
    """``compile`` options for --export-gguf: a KV-cache decoder sized to the example inputs, and the tokenizer."""
    if args.tokenizer and not args.export_gguf:
        raise LowbitError("--tokenizer DIR is the tokenizer --export-gguf writes: add --export-gguf FILE")
    if not args.export_gguf:
        return {}
    if not args.tokenizer:
        raise LowbitError("--export-gguf writes the tokenizer too: give its directory with --tokenizer DIR")
    from transformers import AutoTokenizer

    return {"dynamic_shapes": {"input_ids": {}}, "tokenizer": AutoTokenizer.from_pretrained(str(args.tokenizer))}


def _run(args: argparse.Namespace) -> None:
    import numpy as np

    from lowbit.backends.tvm import rpc

    if args.key and not args.rpc:
        raise LowbitError("--key names a device at an RPC tracker: give the tracker with --rpc HOST:PORT")
    if args.repeats < 1 or args.timeout <= 0:
        raise LowbitError("--repeats must be at least 1 and --timeout positive")
    inputs = None
    if args.input:
        try:
            with np.load(args.input) as data:
                inputs = {name: data[name] for name in data.files}
        except (OSError, ValueError) as exc:
            raise LowbitError(f"cannot read inputs from {args.input}: {exc}") from exc
        if all(name.startswith("arr_") for name in inputs):
            inputs = [inputs[f"arr_{index}"] for index in range(len(inputs))]
    result = rpc.run_artifact(
        args.artifact, inputs, rpc=args.rpc, key=args.key, timeout=args.timeout, repeats=args.repeats
    )
    for index, output in enumerate(result.outputs):
        values = output.astype(np.float64)
        finite = np.isfinite(values)
        summary = (
            f"mean {values.mean():.6g} std {values.std():.6g} min {values.min():.6g} max {values.max():.6g}"
            if finite.all()
            else f"{values.size - int(finite.sum())} of {values.size} values are NaN or Inf (the inputs are finite "
            "and within range: the model overflows or divides by zero on them)"
        )
        print(f"output {index}: {output.dtype}{list(output.shape)} {summary}")
    print(f"latency: {result.latency_s * 1e3:.3f} ms (median of {args.repeats}) on {result.device}")


def _generate(args: argparse.Namespace) -> None:
    import torch

    from lowbit import artifact
    from lowbit.llm.model import load
    from lowbit.llm.stream import TimedTextStreamer

    if args.key and not args.rpc:
        raise LowbitError("--key names a device at an RPC tracker: give the tracker with --rpc HOST:PORT")
    manifest = artifact.read_manifest(args.artifact)
    if "decoder" not in manifest:
        raise LowbitError(f"{args.artifact} holds no causal-LM decoder: compile the model with dynamic_shapes=")
    session = None
    if args.rpc:
        from lowbit.backends.tvm import rpc

        session = rpc.connect(args.rpc, args.key, args.timeout)
    model = load(args.artifact, manifest, session)
    if model.tokenizer is None:
        raise LowbitError(f"{args.artifact} has no tokenizer: compile with tokenizer= to generate from text")
    ids = torch.tensor([model.tokenizer(args.prompt, add_special_tokens=False)["input_ids"]], dtype=torch.long)
    streamer = TimedTextStreamer(model.tokenizer)
    options = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    model.generate(
        ids,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample or None,
        streamer=streamer,
        generator=torch.Generator().manual_seed(args.seed),
        **options,
    )
    print(streamer.summary(), file=sys.stderr)


def _inspect(args: argparse.Namespace) -> None:
    from lowbit.ir.printer import format_graph, summarize

    path = Path(args.model)
    if (path / "manifest.json").is_file():
        import lowbit.artifact

        print(json.dumps(lowbit.artifact.read_manifest(path), indent=2))
        graph = lowbit.artifact.load(path).graph  # None for TVM artifacts
    else:
        from lowbit.compiler import build_pipeline
        from lowbit.ir.trace import trace

        model, inputs, kwargs = _load_model(args.model)
        graph = trace(model, inputs, example_kwargs=kwargs)
        if args.recipe or args.passes:
            _, pipeline = build_pipeline(args.recipe, _pass_list(args.passes), "convert")
            graph = pipeline(graph, example_inputs=inputs, example_kwargs=kwargs)
    if graph is not None:
        print(format_graph(graph, annotated_only=args.annotated))
        print(summarize(graph))


def _trace(args: argparse.Namespace) -> int:
    from lowbit import zoo
    from lowbit.ir.trace import diagnose

    if args.list or not args.model:
        print("\n".join(zoo.names()))
        return 0
    model, inputs, kwargs = _load_model(args.model)
    attempts = diagnose(model, inputs, example_kwargs=kwargs, leaf_modules=tuple(args.leaf))
    for attempt in attempts:
        status = f"ok, {attempt.nodes} nodes" if attempt.ok else "FAILED"
        print(f"{attempt.tracer:8s} {status} ({attempt.seconds:.1f}s)")
        if not attempt.ok:
            print("  " + attempt.message.replace("\n", "\n  "))
    return 0 if any(a.ok for a in attempts) else 1


def _recipes(args: argparse.Namespace) -> None:
    from lowbit import recipes

    if args.name:
        print(recipes.load(args.name).path.read_text(), end="")
        return
    for name, status in recipes.status().items():
        print(f"{name:16s} {status}")


def _passes(args: argparse.Namespace) -> None:
    from lowbit import passes

    for name in passes.available():
        cls = passes.lookup(name)
        defaults = cls.Config.from_options(name, {}).as_dict()
        options = ", ".join(f"{k}={v!r}" for k, v in defaults.items())
        applies = f" on {cls.pattern}" if cls.pattern else ""
        print(f"{name:12s} [{cls.stage}{applies}] {options}")


def _load_model(spec: str) -> tuple[Any, tuple, dict]:
    """A zoo model, an ONNX file, or ``module:factory`` returning (model, example_inputs[, example_kwargs])."""
    from lowbit import zoo
    from lowbit.interop import onnx_import

    if onnx_import.is_onnx(spec):
        imported = onnx_import.load(spec)
        return imported.module, imported.example_inputs, {}
    if ":" not in spec:
        built = zoo.build(spec)
        return built.model, built.example_inputs, built.example_kwargs
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise LowbitError(f"cannot load model factory '{spec}': {exc}") from exc
    result = factory()
    if not isinstance(result, tuple) or len(result) not in (2, 3):
        raise LowbitError(f"'{spec}' must return (model, example_inputs) or (model, example_inputs, example_kwargs)")
    model, inputs, *rest = result
    return model, inputs if isinstance(inputs, tuple) else (inputs,), rest[0] if rest else {}


def _tokenizer(spec: str) -> Any:
    """The tokenizer of a zoo model that has one (minilm), else None."""
    from lowbit import zoo

    return zoo.load_minilm().tokenizer if spec == "minilm" else None


def _tune_option(args: argparse.Namespace) -> Any:
    """``compile(tune=...)`` from --tune/--no-tune, --tune-trials, --tune-rpc and --tune-key."""
    settings: dict[str, Any] = {}
    if args.tune_trials is not None:
        settings["trials"] = args.tune_trials
    if args.tune_key and not args.tune_rpc:
        raise LowbitError("--tune-key names a device at a tracker: give the tracker with --tune-rpc HOST:PORT")
    if args.tune_rpc:
        from lowbit.backends.tvm.rpc import Address
        from lowbit.backends.tvm.tuning import RPCDevice

        address = Address.parse(args.tune_rpc)
        timeout = {} if args.tune_timeout is None else {"timeout_s": args.tune_timeout}
        settings["rpc"] = RPCDevice(address.host, address.port, args.tune_key, **timeout)
    if args.tune_timeout is not None and not (args.tune_rpc and args.tune_timeout > 0):
        raise LowbitError("--tune-timeout S (S > 0) bounds each step on the device given by --tune-rpc HOST:PORT")
    if settings and not args.tune:
        raise LowbitError("--tune-trials and --tune-rpc set how to tune: add --tune")
    if not args.tune:
        return args.tune  # None: recorded tunings only; False: hand schedules only
    return settings or True


def _pass_list(specs: list[str] | None) -> list[Any] | None:
    """The passes of ``--pass name:key=value,...`` options (`lowbit.passes.registry.parse_spec`)."""
    if not specs:
        return None
    from lowbit.passes.registry import parse_spec

    return [parse_spec(spec) for spec in specs]


if __name__ == "__main__":
    sys.exit(main())
