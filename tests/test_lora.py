"""Our LoRA layer and the ScaLoRA rewrite on real transformers models (tiny, random weights)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from scalora_dist.config import AdapterConfig, ConfigError, ScaLoRAConfig
from scalora_dist.model.lora import add_lora, find_target_linears, frozen_linear, inject_adapters, lora_layers
from scalora_dist.scalora import scaling as sm
from scalora_dist.scalora.refactor import ScaLoRA


def _batch(model, seed=0, batch=2, length=16):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def _adapted(model_dir, method="scalora", rank=4, **kw):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    cfg = AdapterConfig(method=method, rank=rank, alpha=2.0 * rank, **kw)
    inject_adapters(model, cfg)
    return model


def _trained_a_little(model_dir, steps=3, **kw):
    """A model whose adapters are non-zero and whose AdamW state is populated, plus fresh
    gradients of one more batch, i.e. the state just before a refactor."""
    model = _adapted(model_dir, **kw)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    for i in range(steps):
        model(**_batch(model, seed=i)).loss.backward()
        opt.step()
        opt.zero_grad()
    model(**_batch(model, seed=100)).loss.backward()
    return model, opt


def test_rewrite_keeps_outputs_grads_and_adam_direction(tiny_llama):
    model, opt = _trained_a_little(tiny_llama)
    layers = list(lora_layers(model).values())
    probe = _batch(model, seed=100)
    with torch.no_grad():
        logits_before = model(**probe).logits
    adam_before = [
        (
            opt.state[l.lora_A]["exp_avg"] / opt.state[l.lora_A]["exp_avg_sq"].sqrt(),
            opt.state[l.lora_B]["exp_avg"] / opt.state[l.lora_B]["exp_avg_sq"].sqrt(),
        )
        for l in layers
    ]
    effective_before = [l.weight + l.delta_weight() for l in layers]

    report = ScaLoRA(ScaLoRAConfig(kappa="auto"), layers, opt).refactor()
    assert report.column + report.scalar > 0, "the refactor must actually rescale some layers"
    assert report.column + report.scalar + report.skipped == len(layers)

    # 1. the function is unchanged (float32 tolerance)
    with torch.no_grad():
        logits_after = model(**probe).logits
    torch.testing.assert_close(logits_after, logits_before, rtol=1e-4, atol=1e-5)
    for l, w in zip(layers, effective_before):
        torch.testing.assert_close(l.weight + l.delta_weight(), w, rtol=1e-5, atol=1e-6)
    # 2. the rescaled gradients are autograd's gradients of the rescaled parameters
    rescaled = [(l.lora_A.grad.clone(), l.lora_B.grad.clone()) for l in layers]
    model.zero_grad()
    model(**probe).loss.backward()
    for l, (gA, gB) in zip(layers, rescaled):
        torch.testing.assert_close(gA, l.lora_A.grad, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(gB, l.lora_B.grad, rtol=1e-4, atol=1e-7)
    # 3. AdamW's direction m / sqrt(v) is carried over unchanged
    for l, (dA, dB) in zip(layers, adam_before):
        sA, sB = opt.state[l.lora_A], opt.state[l.lora_B]
        torch.testing.assert_close(sA["exp_avg"] / sA["exp_avg_sq"].sqrt(), dA, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(sB["exp_avg"] / sB["exp_avg_sq"].sqrt(), dB, rtol=1e-5, atol=1e-6)


def test_the_rewrite_changes_factors(tiny_llama):
    """Guards the test above against a no-op rewrite."""
    model, opt = _trained_a_little(tiny_llama)
    layers = list(lora_layers(model).values())
    before = [l.lora_B.detach().clone() for l in layers]
    ScaLoRA(ScaLoRAConfig(kappa="auto"), layers, opt).refactor()
    changed = sum(not torch.allclose(l.lora_B, b) for l, b in zip(layers, before))
    assert changed > len(layers) // 2


def test_unit_scales_reproduce_plain_lora_exactly(tiny_llama):
    lora = _adapted(tiny_llama, method="lora")
    scalora = _adapted(tiny_llama, method="lora")  # same init; rewritten with alpha = beta = 1
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (lora, scalora)]
    for step in range(4):
        for model, opt in zip((lora, scalora), opts):
            model(**_batch(model, seed=step)).loss.backward()
            if model is scalora:
                rewriter = ScaLoRA(ScaLoRAConfig(kappa=1.0), list(lora_layers(model).values()), opt)
                for layer in rewriter.layers:
                    ones = torch.ones(layer.rank, dtype=torch.float64)
                    rewriter._rewrite(layer, sm.Scales(ones, ones, sm.COLUMN))
            opt.step()
            opt.zero_grad()
    for (n1, p1), (n2, p2) in zip(lora.named_parameters(), scalora.named_parameters()):
        assert n1 == n2
        assert torch.equal(p1, p2), n1


def test_lora_training_never_changes_base_weights(tiny_llama):
    model = _adapted(tiny_llama, method="lora")
    base = {n: l.weight.detach().clone() for n, l in lora_layers(model).items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(3):
        model(**_batch(model, seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, l in lora_layers(model).items():
        assert torch.equal(l.weight, base[n]), n
        assert not l.weight.requires_grad
    assert any(l.lora_B.abs().sum() > 0 for l in lora_layers(model).values())


def test_scalora_base_weights_are_float32_and_lora_keeps_load_dtype(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    inject_adapters(model, AdapterConfig(method="scalora", rank=2))
    for l in lora_layers(model).values():
        assert l.weight.dtype == torch.float32 and l.lora_A.dtype == torch.float32
    ids = _batch(model)["input_ids"]
    assert model(input_ids=ids).logits.dtype == torch.bfloat16  # compute stays in the model dtype
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    inject_adapters(model, AdapterConfig(method="lora", rank=2))
    assert all(l.weight.dtype == torch.bfloat16 for l in lora_layers(model).values())


def test_rslora_scale(tiny_llama):
    model = _adapted(tiny_llama, method="lora", rank=4, use_rslora=True)
    layer = next(iter(lora_layers(model).values()))
    assert layer.scale == pytest.approx(8.0 / 2.0)  # alpha / sqrt(r)
    model = _adapted(tiny_llama, method="lora", rank=4)
    assert next(iter(lora_layers(model).values())).scale == pytest.approx(8.0 / 4.0)


def test_target_modules(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    all_linear = find_target_linears(model, "all-linear")
    assert "lm_head" not in all_linear and all(n.startswith("model.layers.") for n in all_linear)
    assert len(all_linear) == 7 * model.config.num_hidden_layers
    qv = find_target_linears(model, ["q_proj", "v_proj"])
    assert len(qv) == 2 * model.config.num_hidden_layers
    with pytest.raises(ConfigError, match="'qq_proj' matches no module"):
        find_target_linears(model, ["q_proj", "qq_proj"])
    with pytest.raises(ConfigError, match="not an nn.Linear"):
        find_target_linears(model, ["self_attn"])


def test_full_method_trains_target_weights_only(tiny_llama):
    model = _adapted(tiny_llama, method="full", target_modules=["q_proj"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("q_proj.weight") for n in trainable)
    assert not lora_layers(model)


def test_layer_forward_matches_dense_weight():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10)
    layer = add_lora(copy.deepcopy(base), rank=3, alpha=6.0, use_rslora=False, dropout=0.0)
    torch.nn.init.normal_(layer.lora_A)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 12)
    dense = torch.nn.functional.linear(x, base.weight + layer.delta_weight(), base.bias)
    torch.testing.assert_close(layer(x), dense, rtol=1e-5, atol=1e-6)


def test_frozen_float32_weight_under_bf16_compute_saves_no_cast_copy():
    """The forward casts a float32 master to bf16; the backward must get the same input
    gradient as F.linear on that cast, while keeping only the master alive."""
    torch.manual_seed(0)
    weight, bias = torch.randn(48, 32), torch.randn(48)
    x = torch.randn(5, 32, dtype=torch.bfloat16, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = frozen_linear(x, weight, bias)
    assert [t.untyped_storage().data_ptr() for t in saved] == [weight.untyped_storage().data_ptr()]
    grad_out = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(y, x, grad_out)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = torch.nn.functional.linear(x_ref, weight.to(torch.bfloat16), bias.to(torch.bfloat16))
    (grad_ref,) = torch.autograd.grad(y_ref, x_ref, grad_out)
    assert torch.equal(y, y_ref) and torch.equal(grad_x, grad_ref)
    # float64 reference of the math itself
    torch.testing.assert_close(grad_x.double(), grad_out.double() @ weight.double(), rtol=2e-2, atol=2e-2)
