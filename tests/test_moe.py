"""Mixtures of LoRA experts: the batched mixture, equality with PEFT's LoRA, gradients, M3OE's gate, AT-MoE's
grouped router, per-layer routing inside a BERT, folding, and every bad input as one clear ValueError.

Tiny models on CPU. Fresh B is zero, so every equality check first gives B random values (otherwise the experts
add nothing and the checks are vacuous).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from components.core.errors import ParamsError
from components.moe.layers import (MoLoRALinear, attach_molora, attach_routers, fold_molora, layer_weights,
                                   molora_layers, peft_factors, routing_context)
from components.moe.m3oe import M3OEGate, describe
from components.moe.mixing import LoraFactors, check_weights, mix_lora, mixture_delta, stack_factors
from components.moe.routers import FlatRouter, GroupedRouter, UniformRouter, group_layout, make_router

GROUPS = [[0, 2, 4], [1], [3, 5]]  # unequal sizes, not in expert order


def factors(num: int, rank: int, d_in: int, d_out: int, seed: int = 0, scales: list[float] | None = None,
            dtype: torch.dtype = torch.float32) -> list[LoraFactors]:
    gen = torch.Generator().manual_seed(seed)
    scales = scales or [0.5 + e for e in range(num)]
    return [LoraFactors(torch.randn(rank, d_in, generator=gen, dtype=dtype),
                        torch.randn(d_out, rank, generator=gen, dtype=dtype) * 0.3, scales[e]) for e in range(num)]


def randomise_b(module: nn.Module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, MoLoRALinear):
                layer.expert_b.copy_(torch.randn(layer.expert_b.shape, generator=gen) * 0.3)


def tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    return BertModel(config).eval()


def bert_inputs(n: int = 4, t: int = 7) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(n, t, dtype=torch.long)
    mask[::2, 5:] = 0
    return {"input_ids": torch.randint(1, 100, (n, t), generator=gen), "attention_mask": mask}


# --- the mixture itself ---

def test_the_batched_mixture_equals_a_loop_over_experts() -> None:
    gen = torch.Generator().manual_seed(0)
    experts = factors(4, 3, 6, 5, dtype=torch.float64)
    a, b, scales = stack_factors(experts, 6, 5)
    x = torch.randn(3, 7, 6, generator=gen, dtype=torch.float64)
    w = torch.softmax(torch.randn(3, 4, generator=gen, dtype=torch.float64), -1)
    loop = sum(w[:, e, None, None] * f.scale * (x @ f.a.T @ f.b.T) for e, f in enumerate(experts))
    assert torch.allclose(mix_lora(x, a, b, w * scales), loop, atol=1e-6)
    w0 = w[0]  # the folded form: one weight vector -> one ΔW
    loop_delta = sum(w0[e] * f.scale * (f.b @ f.a) for e, f in enumerate(experts))
    assert torch.allclose(mixture_delta(a, b, w0 * scales), loop_delta, atol=1e-6)


def test_one_hot_weights_equal_peft_lora() -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=6, target_modules=["0", "2"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    found = peft_factors(peft_model)
    assert sorted(found) == ["0", "2"] and found["0"].scale == 3.0
    # the PEFT expert sits between two others of the same rank and other scales
    experts = {n: [*factors(1, 2, f.a.shape[1], f.b.shape[0], seed=1, scales=[0.7]), f,
                   *factors(1, 2, f.a.shape[1], f.b.shape[0], seed=2, scales=[2.5])] for n, f in found.items()}
    moe = copy.deepcopy(base)
    layers = attach_molora(moe, ["0", "2"], experts=experts)
    x = torch.randn(5, 8)
    with routing_context(layers, weights=torch.tensor([0.0, 1.0, 0.0])):
        assert torch.allclose(moe(x), peft_model(x), atol=1e-6)
    with routing_context(layers, weights=torch.tensor([0.0, 0.0, 0.0])):  # no expert: the base network
        assert torch.allclose(moe(x), base(x), atol=1e-6)


@pytest.mark.parametrize("general", [False, True])
def test_token_sequences_route_each_sample_once(general: bool) -> None:
    layer = MoLoRALinear(nn.Linear(6, 5), experts=factors(3, 2, 6, 5))
    if general:
        layer.add_general(factors(1, 4, 6, 5, seed=9)[0], mix=0.3)
    x = torch.randn(4, 7, 6)
    w = torch.softmax(torch.randn(4, 3), -1)
    with routing_context([layer], weights=w):
        seq = layer(x)
    with routing_context([layer], weights=w.repeat_interleave(7, 0)):  # one row per token
        flat = layer(x.reshape(28, 6))
    assert seq.shape == (4, 7, 5) and torch.allclose(seq.reshape(28, 5), flat, atol=1e-6)
    assert torch.equal(layer.last_weights, w.repeat_interleave(7, 0))


def test_gradients_reach_only_the_trainable_parts() -> None:
    fresh = MoLoRALinear(nn.Linear(6, 5), 3, 2, alpha=4.0, generator=torch.Generator().manual_seed(0))
    randomise_b(fresh)
    gate_logits = torch.zeros(4, 3, requires_grad=True)
    with routing_context([fresh], weights=torch.softmax(gate_logits, -1)):
        fresh(torch.randn(4, 6)).pow(2).sum().backward()
    assert fresh.base.weight.grad is None and fresh.base.bias.grad is None
    assert fresh.expert_a.grad.abs().sum() > 0 and fresh.expert_b.grad.abs().sum() > 0
    assert gate_logits.grad.abs().sum() > 0  # the gate learns through the mixture

    frozen = MoLoRALinear(nn.Linear(6, 5), experts=factors(3, 2, 6, 5))
    frozen.add_general(rank=2, learn_mix=True, mix=0.4)
    frozen.router = FlatRouter(6, 3)
    with torch.no_grad():
        frozen.general_b.normal_()
    x = torch.randn(4, 6)
    with routing_context([frozen], features=x):
        frozen(x).pow(2).sum().backward()
    trainable = sorted(n for n, p in frozen.named_parameters() if p.requires_grad)
    assert trainable == ["general_a", "general_b", "mix_logit", "router.proj.weight"]
    assert all(frozen.get_parameter(n).grad.abs().sum() > 0 for n in trainable)
    assert not frozen.expert_a.requires_grad and frozen.base.weight.grad is None
    assert abs(frozen.mix.item() - 0.4) < 1e-6


# --- M3OE's gate ---

def test_m3oe_gate_weights_respect_masks_and_follow_the_task() -> None:
    torch.manual_seed(0)
    gate = M3OEGate(dim=8, num_experts=4, num_heads=2).eval()
    modality, task = torch.randn(3, 5, 8), torch.randn(3, 6, 8)
    m_mask, t_mask = torch.ones(3, 5, dtype=torch.long), torch.ones(3, 6, dtype=torch.long)
    m_mask[0, 3:] = 0
    t_mask[1, 2:] = 0
    w = gate(modality, task, m_mask, t_mask)
    assert w.shape == (3, 4) and torch.allclose(w.sum(-1), torch.ones(3)) and (w > 0).all()
    modality2, task2 = modality.clone(), task.clone()
    modality2[0, 3:] = 100.0  # padded tokens: changing them changes nothing
    task2[1, 2:] = -50.0
    assert torch.allclose(gate(modality2, task2, m_mask, t_mask), w, atol=1e-6)
    task3 = task.clone()
    task3[2] = torch.randn(6, 8)  # another task description: other weights
    w3 = gate(modality, task3, m_mask, t_mask)
    assert torch.allclose(w3[:2], w[:2], atol=1e-6) and not torch.allclose(w3[2], w[2], atol=1e-4)


def test_m3oe_routes_a_bert_from_descriptions(tiny_bert: Path) -> None:
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert, local_files_only=True)
    bert = BertModel.from_pretrained(tiny_bert, local_files_only=True).eval()
    embedding = bert.embeddings.word_embeddings
    modality, m_mask = describe(["clinical note text", "clinical note text"], tokenizer, embedding, 12)
    task, t_mask = describe(["predict the diagnosis of a patient", "is the drug effective?"], tokenizer,
                            embedding, 12)
    assert modality.shape == (2, 12, 32) and t_mask.shape == (2, 12) and 0 < int(t_mask[1].sum()) < 12
    layers = attach_molora(bert, ["query", "value"], num_experts=3, rank=2, alpha=4.0)
    randomise_b(bert)
    gate = M3OEGate(32, 3, num_heads=2)
    weights = gate(modality.detach(), task.detach(), m_mask, t_mask)
    assert not torch.allclose(weights[0], weights[1], atol=1e-4)
    ids = tokenizer(["fever and cough", "no symptoms"], padding="max_length", max_length=10, return_tensors="pt")
    with routing_context(layers, weights=weights):
        out = bert(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    # the gate learns; attach_molora froze the foundation (embeddings included), as PEFT does
    assert gate.proj.weight.grad.abs().sum() > 0 and embedding.weight.grad is None
    assert all(torch.equal(layer.last_weights, weights.detach()) for layer in layers.values())


# --- AT-MoE's grouped router ---

def test_grouped_router_weights() -> None:
    torch.manual_seed(0)
    router = GroupedRouter(8, GROUPS, tau=0.7)
    x = torch.randn(5, 8)
    w = router(x)
    last = router.last
    assert w.shape == (5, 6) and torch.allclose(w.sum(-1), torch.ones(5))
    assert torch.equal(last.within[:, ~router.layout_mask], torch.zeros(5, 3))  # padding slots: exactly 0
    for g, group in enumerate(GROUPS):
        assert torch.allclose(w[:, group].sum(-1), last.groups[:, g], atol=1e-6)
        within = last.within[:, g, :len(group)]
        assert torch.allclose(w[:, group], last.groups[:, g, None] * within, atol=1e-7)
    hot = GroupedRouter(8, GROUPS, tau=1e6)
    hot(x)
    assert torch.allclose(hot.last.groups, torch.full((5, 3), 1 / 3), atol=1e-5)
    static = GroupedRouter(8, GROUPS, static_within=True)
    with torch.no_grad():
        static.within_logits.normal_()
    static(x)
    a = static.last
    static(torch.randn(5, 8) * 3)
    assert torch.equal(a.within, static.last.within) and not torch.allclose(a.groups, static.last.groups)
    router(torch.randn(5, 8) * 3)
    assert not torch.allclose(last.within, router.last.within)  # input-dependent by default


def test_flat_and_uniform_routers() -> None:
    x = torch.randn(4, 8)
    flat = make_router("flat", 8, 5, tau=2.0)
    assert isinstance(flat, FlatRouter) and torch.allclose(flat(x).sum(-1), torch.ones(4))
    uniform = make_router("uniform", 8, 5)
    assert isinstance(uniform, UniformRouter) and torch.equal(uniform(x), torch.full((4, 5), 0.2))
    assert isinstance(make_router("grouped", 8, 6, groups=GROUPS), GroupedRouter)


def test_each_layer_reads_its_own_router_in_a_bert() -> None:
    bert = tiny_bert()
    plain = copy.deepcopy(bert)
    layers = attach_molora(bert, ["query", "value"], num_experts=6, rank=2, seed=3)
    assert sorted(layers) == sorted(f"encoder.layer.{i}.attention.self.{p}" for i in (0, 1) for p in ("query", "value"))
    assert molora_layers(bert).keys() == layers.keys()
    for name, module in bert.named_modules():  # every other Linear is untouched
        if name.endswith(("key", "dense")):
            assert type(module) is nn.Linear
            assert torch.equal(module.weight, plain.get_submodule(name).weight)
    inputs = bert_inputs()
    features = torch.randn(4, 32)
    routers = attach_routers(layers, lambda name: GroupedRouter(32, GROUPS, tau=0.5))
    with routing_context(layers, features=features):  # B = 0: the foundation's outputs
        assert torch.allclose(bert(**inputs).last_hidden_state, plain(**inputs).last_hidden_state, atol=1e-5)
    randomise_b(bert)
    with routing_context(layers, features=features):
        out = bert(**inputs).last_hidden_state
    assert out.shape == (4, 7, 32) and not torch.allclose(out, plain(**inputs).last_hidden_state, atol=1e-3)
    per_layer = layer_weights(layers, features)
    for name, layer in layers.items():
        assert torch.equal(layer.last_weights, per_layer[name].detach())
        assert torch.equal(routers[name].last.experts, layer.last_weights)
    first, second = (layers[f"encoder.layer.{i}.attention.self.query"].last_weights for i in (0, 1))
    assert not torch.allclose(first, second)
    trainable = {n for n, p in bert.named_parameters() if p.requires_grad}
    assert trainable and all(".router." in n or "expert_" in n for n in trainable)


# --- folding ---

@pytest.mark.parametrize("per_layer", [False, True])
def test_a_folded_model_equals_the_routed_one(per_layer: bool) -> None:
    bert = tiny_bert()
    layers = attach_molora(bert, ["query", "value"], num_experts=6, rank=2, alpha=4.0, seed=1)
    randomise_b(bert)
    for layer in layers.values():
        layer.add_general(factors(1, 3, 32, 32, seed=5)[0], mix=0.6, learn_mix=True)
    inputs = bert_inputs(n=1)
    if per_layer:  # AT-MoE: each layer's routing of this one request
        attach_routers(layers, lambda name: GroupedRouter(32, GROUPS))
        features = torch.randn(1, 32)
        fixed = {n: w[0].detach() for n, w in layer_weights(layers, features).items()}
        context = routing_context(layers, features=features)
    else:  # one task's weight vector for every layer
        fixed = torch.softmax(torch.randn(6), -1)
        context = routing_context(layers, weights=fixed)
    with context, torch.no_grad():
        routed = bert(**inputs).last_hidden_state
    folded = fold_molora(bert, fixed)
    assert not molora_layers(folded) and type(folded.encoder.layer[0].attention.self.query) is nn.Linear
    assert torch.allclose(folded(**inputs).last_hidden_state, routed, atol=1e-5)
    assert all(isinstance(m, MoLoRALinear) for m in molora_layers(bert).values())


# --- bad inputs: one ValueError each, naming the problem ---

BAD: list[tuple[str, Callable[[], object], str]] = [
    ("no groups", lambda: group_layout([]), "no groups given"),
    ("empty group", lambda: group_layout([[0, 1], []]), r"groups\[1\] is empty"),
    ("duplicate expert", lambda: group_layout([[0, 1], [1, 2]]), r"expert 1 appears twice"),
    ("unknown expert", lambda: group_layout([[0, 5]], 3), r"groups\[0\] names expert 5, but experts are 0\.\.2"),
    ("expert in no group", lambda: group_layout([[0], [2]], 3), r"experts \[1\] are in no group"),
    ("tau zero", lambda: GroupedRouter(4, [[0]], tau=0.0), "tau must be a finite number > 0"),
    ("tau negative", lambda: FlatRouter(4, 2, tau=-1.0), "tau must be a finite number > 0"),
    ("grouped without groups", lambda: make_router("grouped", 4, 2), "needs groups"),
    ("flat with groups", lambda: make_router("flat", 4, 2, groups=[[0, 1]]), "takes no groups"),
    ("unknown router", lambda: make_router("bogus", 4, 2), r"unknown router 'bogus'; known"),
    ("ranks differ", lambda: stack_factors(factors(1, 2, 6, 5) + factors(1, 3, 6, 5), 6, 5),
     "must share their rank.*expert 1 rank 3"),
    ("shape mismatch", lambda: stack_factors(factors(1, 2, 7, 5), 6, 5), r"expert 0 has A \(2, 7\)"),
    ("no experts", lambda: MoLoRALinear(nn.Linear(6, 5), experts=[]), "no expert factors"),
    ("rank too large", lambda: MoLoRALinear(nn.Linear(6, 5), 2, 6), "rank 6 exceeds"),
    ("experts and rank", lambda: MoLoRALinear(nn.Linear(6, 5), rank=2, experts=factors(1, 2, 6, 5)), "not both"),
    ("weights shape", lambda: check_weights(torch.ones(3, 4), 3, 5), r"shape \(3, 4\) do not fit"),
    ("target missing", lambda: attach_molora(nn.Sequential(nn.Linear(2, 2)), ["query"], 2, 1),
     r"'query' matches no nn.Linear layer.*e\.g\. \['0'\]"),
    ("experts for other layers", lambda: attach_molora(nn.Sequential(nn.Linear(6, 5)), ["0"],
                                                       experts={"1": factors(1, 2, 6, 5)}),
     r"missing for \['0'\].*untargeted \['1'\]"),
    ("mix out of range", lambda: MoLoRALinear(nn.Linear(6, 5), 2, 1).add_general(rank=1, mix=1.5), r"mix λ=1.5"),
    ("learned mix at 1", lambda: MoLoRALinear(nn.Linear(6, 5), 2, 1).add_general(rank=1, mix=1.0, learn_mix=True),
     r"\(0, 1\)"),
    ("no descriptions", lambda: describe([], None, nn.Embedding(4, 2), 8), "no description texts"),
    ("gate heads", lambda: M3OEGate(10, 3, num_heads=3), "num_heads dividing dim"),
    ("gate empty task", lambda: M3OEGate(4, 2)(torch.randn(2, 3, 4), torch.randn(2, 3, 4), None,
                                               torch.tensor([[1, 0, 0], [0, 0, 0]])),
     r"task description of samples \[1\] has no real token"),
    ("routing twice", lambda: routing_context([], weights=torch.ones(2), features=torch.ones(1, 2)).__enter__(),
     "exactly one of"),
]


@pytest.mark.parametrize(("case", "call", "message"), BAD, ids=[c[0] for c in BAD])
def test_bad_inputs_raise_one_clear_error(case: str, call: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert isinstance(info.value, ParamsError)  # the CLI prints it as one line


def test_a_layer_outside_a_routing_context_says_so() -> None:
    layer = MoLoRALinear(nn.Linear(6, 5), 2, 1, name="q")
    with pytest.raises(RuntimeError, match="'q': no routing set"):
        layer(torch.randn(2, 6))
    with routing_context([layer], weights={"other": torch.ones(2)}), pytest.raises(ValueError, match="not for 'q'"):
        layer(torch.randn(2, 6))
