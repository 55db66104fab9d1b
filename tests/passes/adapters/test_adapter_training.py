"""Each adapter fine-tunes the real all-MiniLM-L6-v2 on a tiny sentence-classification task (sentiment).

To keep the test to seconds, the encoder is cut to its first (real) layer.

The classifier is frozen: a sentence's logits are its cosine similarity to the embedding
of each label's description, computed once by the base model. Only the adapters train,
so the test can check that the loss goes down, that nothing but adapter parameters
changed, and that the merged model computes what the adapted graph computes.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import lowbit
from lowbit import zoo
from lowbit.ir import ops
from lowbit.passes import Pass, Pipeline, get
from lowbit.passes.adapters import SORSA, Bone, LoRA, orthonormal_regularizer

LABELS = ("This sentence expresses a positive feeling.", "This sentence expresses a negative feeling.")
SENTENCES = (
    ("What a lovely sunny morning.", 0),
    ("The fresh bread smells wonderful.", 0),
    ("I really enjoyed that soup.", 0),
    ("The spring breeze feels delightful.", 0),
    ("This cake is absolutely perfect.", 0),
    ("We had a great picnic in the sun.", 0),
    ("The storm ruined our whole weekend.", 1),
    ("This pasta tastes awful.", 1),
    ("The freezing rain is miserable.", 1),
    ("The soup was cold and bland.", 1),
    ("I hate this gloomy weather.", 1),
    ("The burnt toast was disgusting.", 1),
)
TARGETS = ("query", "value")
ADAPTERS = {
    "lora": (lambda: LoRA(rank=4, alpha=8, targets=TARGETS), 5e-3),
    "lora-pissa": (lambda: LoRA(rank=4, alpha=4, init="pissa", targets=TARGETS), 2e-3),
    "sorsa": (lambda: SORSA(rank=4, targets=TARGETS), 2e-3),
    "bone": (lambda: Bone(rank=8, targets=TARGETS), 2e-3),
    "bat": (lambda: Bone(rank=8, variant="bat", targets=TARGETS), 2e-3),
}
STEPS = 3
LAYERS = 1


@pytest.fixture(scope="module")
def task():
    minilm = zoo.load_minilm()
    minilm.model.encoder.layer = minilm.model.encoder.layer[:LAYERS]
    batch = minilm.tokenize([s for s, _ in SENTENCES])
    gm = lowbit.trace(minilm.model, (), example_kwargs=batch)
    labels_batch = minilm.tokenize(list(LABELS))
    with torch.no_grad():
        prototypes = minilm.embed(minilm.model(**labels_batch), labels_batch["attention_mask"])
    labels = torch.tensor([label for _, label in SENTENCES])
    return gm, batch, prototypes, labels


def embed(gm: fx.GraphModule, batch: dict) -> torch.Tensor:
    return zoo.minilm_embed(gm(**batch), batch["attention_mask"])


def loss_of(gm: fx.GraphModule, task) -> torch.Tensor:
    _, batch, prototypes, labels = task
    return torch.nn.functional.cross_entropy(20.0 * embed(gm, batch) @ prototypes.T, labels)


def fine_tune(gm: fx.GraphModule, task, lr: float, sorsa: bool = False) -> list[float]:
    params = [p for p in gm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = loss_of(gm, task)
        loss.backward()
        if sorsa:  # the authors' order: clip the task gradient, then add the unclipped regularizer's
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            orthonormal_regularizer(gm, peak_lr=lr).backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(loss_of(gm, task).item())
    return losses


def check_training(base: fx.GraphModule, adapter: Pass, lr: float, task, sorsa: bool = False) -> fx.GraphModule:
    adapted = Pipeline([adapter])(base)
    before = {k: v.clone() for k, v in adapted.state_dict().items()}
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all(f".{adapter.name}." in n for n in trainable)
    losses = fine_tune(adapted, task, lr, sorsa)
    assert losses[-1] < losses[0], losses
    after = adapted.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= trainable
    return adapted


@pytest.mark.parametrize("kind", ADAPTERS)
def test_adapter_fine_tunes_minilm(task, kind: str) -> None:
    build, lr = ADAPTERS[kind]
    adapted = check_training(task[0], build(), lr, task, sorsa=kind == "sorsa")
    merged = Pipeline([get("merge_adapters")])(adapted)
    with torch.no_grad():
        torch.testing.assert_close(embed(merged, task[1]), embed(adapted, task[1]), atol=1e-5, rtol=1e-5)


def test_qlora_fine_tunes_a_packed_minilm(task) -> None:
    quantized = Pipeline([get("rtn", bits=4, group_size=32)])(task[0])
    adapted = check_training(quantized, LoRA(rank=4, alpha=8, init="gaussian", targets=TARGETS), 5e-3, task)
    packed = sum(n.target is ops.linear_packed for n in quantized.graph.nodes)
    assert packed == 6 * LAYERS + 1  # six per encoder layer and the pooler
    assert sum(n.target is ops.linear_packed for n in adapted.graph.nodes) == packed
    merged = Pipeline([get("merge_adapters")])(adapted)
    assert sum(n.target is ops.linear_packed for n in merged.graph.nodes) == packed
    with torch.no_grad():
        # re-quantizing the merged weights is the only difference: embeddings stay close
        similarity = (embed(merged, task[1]) * embed(adapted, task[1])).sum(-1)
    assert similarity.min() > 0.99
