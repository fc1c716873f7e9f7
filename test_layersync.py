"""Tests for layersync.py, train_cifar.py and sample.py: `python -m pytest -q`, on the CPU (the CUDA
group runs only where a GPU is visible).

In the reader's order: first the method (layersync.py), each subject with its small helpers beside
it, with no script, no subprocess and no file: the loss, record_blocks, the SiT, the objective, the
samplers, the probe. Then the README's examples; then the scripts: run and resume, refusals,
signals and crashes, a full disk, the probe of a run, sample and compare, FID, the official
weights, torchrun; last CUDA (skipped without a GPU), its paths on fake tensors, and the dry run of
the prepared GPU script, .ci/gpu.
"""

import argparse
import copy
import csv
import errno
import io
import itertools
import math
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.datasets.cifar
from PIL import Image
from torchvision.models import VisionTransformer

import layersync as L
import sample as sample_script
import train_cifar

# tiny models run many times slower when torch's threads outnumber free cores (CI shares 2)
torch.set_num_threads(1)
HERE = os.path.dirname(os.path.abspath(__file__))


# ================================================================ 1. the method (layersync.py)
# No script, no subprocess, no file: the functions a reader copies, on tensors made here.

# ---------------------------------------------------------------- the loss, Eq. 2

def cosine_formula(student, teacher):
    a, b = student.double(), teacher.double()
    return -((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean()


@pytest.mark.parametrize("shape", [(16,), (3, 16), (4, 7, 16), (2, 3, 5, 8)])
def test_loss_equals_formula_on_any_leading_shape(shape):
    torch.manual_seed(0)
    student, teacher = torch.randn(shape), torch.randn(shape)
    assert L.layersync_loss(student, teacher).shape == ()
    assert torch.allclose(L.layersync_loss(student, teacher).double(),
                          cosine_formula(student, teacher), atol=1e-6)


def test_loss_gradient_reaches_the_student_only():
    torch.manual_seed(0)
    student = torch.randn(4, 9, 16, requires_grad=True)
    teacher = torch.randn(4, 9, 16, requires_grad=True)
    L.layersync_loss(student, teacher).backward()
    assert teacher.grad is None  # Eq. 2 stop-gradient
    # the gradient into the student is the formula's
    w = student.detach().double().requires_grad_()
    cosine_formula(w, teacher.detach()).backward()
    assert torch.allclose(student.grad.double(), w.grad, atol=1e-7)
    assert student.grad.abs().sum() > 0


def test_loss_extremes_and_scale_invariance():
    torch.manual_seed(0)
    a, b = torch.randn(5, 11, 24), torch.randn(5, 11, 24)
    assert L.layersync_loss(a, a.clone()).item() == pytest.approx(-1.0, abs=1e-6)
    assert L.layersync_loss(a, -a).item() == pytest.approx(1.0, abs=1e-6)
    base = L.layersync_loss(a, b)
    assert torch.allclose(L.layersync_loss(3.7 * a, 0.02 * b), base, atol=1e-6)
    # per-token scales too: the cosine ignores each token's norm
    scale = torch.rand(5, 11, 1) + 0.1
    assert torch.allclose(L.layersync_loss(a * scale, b), base, atol=1e-6)


def test_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        L.layersync_loss(torch.randn(2, 4, 8), torch.randn(2, 4, 16))


# ---------------------------------------------------------------- record_blocks, on others' models

def tiny_vit(depth=4, seed=0):
    """torchvision's VisionTransformer, tiny: 16 patches + a class token, width 16."""
    torch.manual_seed(seed)
    model = VisionTransformer(image_size=16, patch_size=4, num_layers=depth, num_heads=2,
                              hidden_dim=16, mlp_dim=32, num_classes=5)
    with torch.no_grad():  # torchvision starts the class token at 0; any value tests more
        model.class_token.normal_()
    return model.eval()


def vit_blocks_by_hand(model, images):
    """Every encoder block's output, walking torchvision's own forward step by step."""
    x = model._process_input(images)
    x = torch.cat([model.class_token.expand(len(x), -1, -1), x],
                  dim=1) + model.encoder.pos_embedding
    outputs = []
    for block in model.encoder.layers:
        x = block(x)
        outputs.append(x)
    return outputs


def hook_count(blocks):
    return sum(len(block._forward_hooks) for block in blocks)


class TupleBlock(torch.nn.Module):
    """A block that returns (hidden, attention-like extra), as joint-attention blocks do."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x), x.mean()


# the small SiT of the tests below, and a batch of its inputs
def tiny_sit(depth=4, seed=0, perturb=True, **overrides):
    """A small SiT; `perturb` replaces the zero adaLN-Zero init so blocks and outputs differ."""
    torch.manual_seed(seed)
    kwargs = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=depth,
                  num_heads=4, num_classes=5)
    kwargs.update(overrides)
    model = L.SiT(**kwargs)
    if perturb:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "adaLN" in name or "final_layer.linear" in name:
                    p.normal_(0, 0.1)
    return model


def batch(model, n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    size = model.x_embedder.kernel_size[0] * int(model.pos_embed.shape[1] ** 0.5)
    x = torch.randn(n, model.in_channels, size, size, generator=g)
    y = torch.randint(0, model.num_classes, (n,), generator=g)
    return x, y


def test_record_blocks_equals_the_blocks_by_hand():
    model = tiny_vit()
    images = torch.randn(3, 3, 16, 16)
    with L.record_blocks(model.encoder.layers, [1, 3, 4]) as out:
        logits = model(images)
    by_hand = vit_blocks_by_hand(model, images)
    assert sorted(out) == [1, 3, 4]
    for k in (1, 3, 4):
        assert out[k].shape == (3, 17, 16)
        assert torch.equal(out[k], by_hand[k - 1]), k
    assert not torch.equal(out[1], out[3])
    assert torch.equal(logits, model(images))  # recording never changes the output
    with pytest.raises(KeyError, match="block 2 has not run"):
        out[2]


def test_record_blocks_gradient_reaches_blocks_up_to_k_only():
    model = tiny_vit(depth=4)
    with L.record_blocks(model.encoder.layers, [2, 4]) as out:
        model(torch.randn(3, 3, 16, 16))
    L.layersync_loss(out[2], out[4]).backward()  # the LayerSync term alone
    for i, block in enumerate(model.encoder.layers):
        grad = sum(p.grad.abs().sum() for p in block.parameters() if p.grad is not None)
        assert (grad > 0) == (i < 2), (i, grad)  # blocks 1..k learn, blocks after k do not
    assert model.conv_proj.weight.grad.abs().sum() > 0
    assert model.heads.head.weight.grad is None


def test_record_blocks_removes_its_hooks_on_exit_and_on_error():
    model = tiny_vit()
    blocks = model.encoder.layers
    with L.record_blocks(blocks, [1, 2, 2]) as out:  # a repeated number gets one hook
        assert hook_count(blocks) == 2
        model(torch.randn(2, 3, 16, 16))
        first = out[1].clone()
        model(torch.randn(2, 3, 16, 16))  # a second forward overwrites the first one's outputs
        assert not torch.equal(out[1], first)
    assert hook_count(blocks) == 0
    blocks[1].ln_1 = torch.nn.LayerNorm(8)  # block 2 now raises, after block 1's hook has run
    with pytest.raises(RuntimeError):
        with L.record_blocks(blocks, [1, 2]) as out:
            model(torch.randn(2, 3, 16, 16))
    assert 1 in out and 2 not in out
    assert hook_count(blocks) == 0


@pytest.mark.parametrize("numbers", [[0, 2], [5], [1, 4.0], [True, 2], []])
def test_record_blocks_refuses_bad_block_numbers_before_registering(numbers):
    blocks = tiny_vit(depth=4).encoder.layers
    with pytest.raises(ValueError, match=r"integers in 1\.\.4"):
        with L.record_blocks(blocks, numbers):
            pass
    assert hook_count(blocks) == 0
    with L.record_blocks(blocks, [np.int64(1), torch.tensor(4)]) as out:  # integer types are fine
        assert hook_count(blocks) == 2 and not out


def test_record_blocks_pick_selects_the_tensor_of_a_tuple_output():
    model = tiny_vit()
    blocks = torch.nn.ModuleList(TupleBlock(b) for b in model.encoder.layers)
    x = torch.randn(2, 17, 16)
    with L.record_blocks(blocks, [1, 3], pick=lambda out: out[0]) as out:
        h, by_hand = x, []
        for block in blocks:
            h, _ = block(h)
            by_hand.append(h)
    assert torch.equal(out[1], by_hand[0]) and torch.equal(out[3], by_hand[2])
    with pytest.raises(TypeError, match="returned tuple.*pick="):
        with L.record_blocks(blocks, [1]) as unpicked:
            blocks[0](x)
    assert hook_count(blocks) == 0 and 1 not in unpicked  # the tuple was never recorded


def test_record_blocks_on_the_sit_gives_training_loss_eq2():
    model = tiny_sit(depth=4)
    x, y = batch(model)
    with L.record_blocks(model.blocks, [1, 3]) as out:
        torch.manual_seed(3)
        losses = L.training_loss(model, x, y, [(1, 3)], 0.2)
    assert torch.equal(L.layersync_loss(out[1], out[3]).detach(), losses["layersync"])
    # and the hooked outputs are SiT.forward's own return_layers
    model.eval()
    t = torch.rand(len(x))
    with L.record_blocks(model.blocks, [2, 4]) as out:
        _, (h2, h4) = model(x, t, y, return_layers=(2, 4))
    assert torch.equal(out[2], h2) and torch.equal(out[4], h4)


# ---------------------------------------------------------------- the SiT

@pytest.mark.parametrize("name,input_size,channels", [
    ("SiT-S/2", 32, 3), ("SiT-S/4", 32, 3), ("SiT-S/8", 32, 3), ("SiT-B/4", 16, 4), ("SiT-L/8", 64,
                                                                                     1)])
def test_shapes_and_zero_output_at_init(name, input_size, channels):
    model = L.SiT_models[name](input_size=input_size, in_channels=channels, num_classes=10, depth=2)
    x = torch.randn(3, channels, input_size, input_size)
    v, (h,) = model(x, torch.rand(3), torch.tensor([0, 5, 9]), return_layers=(2,))
    assert v.shape == x.shape
    patch = int(name[-1])
    assert h.shape == (3, (input_size // patch) ** 2, model.pos_embed.shape[-1])
    assert torch.equal(v, torch.zeros_like(v))  # adaLN-Zero: exactly zero at init


def test_return_layers_contract():
    model = tiny_sit(depth=4).eval()  # eval: no random label dropout between the calls
    x, y = batch(model)
    t = torch.rand(len(x))
    v = model(x, t, y)
    assert v.abs().sum() > 0
    v2, hs = model(x, t, y, return_layers=(3, 1, 4))
    assert torch.equal(v, v2)  # asking for layers never changes the velocity
    assert [h.shape for h in hs] == [(6, 16, 32)] * 3
    _, (h1, h3, h4) = model(x, t, y, return_layers=(1, 3, 4))
    assert torch.equal(hs[0], h3) and torch.equal(hs[1], h1) and torch.equal(hs[2], h4)
    assert not torch.equal(h1, h3)
    # h_k is the residual stream after block k: feeding h_4 to the head reproduces v
    c = model.t_embedder(t) + model.y_embedder(y)
    assert torch.allclose(model.unpatchify(model.final_layer(h4, c)), v)
    # and block k+1 applied to h_k gives h_{k+1}
    _, (h2,) = model(x, t, y, return_layers=(2,))
    assert torch.allclose(model.blocks[2](h2, c), h3)
    # block 0 is the embedded input tokens, what block 1 reads
    _, (h0,) = model(x, t, y, return_layers=(0,))
    assert torch.equal(h0, model.x_embedder(x).flatten(2).transpose(1, 2) + model.pos_embed)
    assert torch.allclose(model.blocks[0](h0, c), h1)
    for bad in [(-1,), (5,)]:
        with pytest.raises(ValueError, match="numbered 1..4"):
            model(x, t, y, return_layers=bad)


# the trainable parameter counts of the official SiT code (willisma/SiT models.py) with
# learn_sigma off (its default, learn_sigma=True, adds the 2C-channel head), position table excluded
CIFAR_COUNTS = {"SiT-S/2": 32_475_660, "SiT-B/2": 129_537_036,
                "SiT-L/2": 456_802_316, "SiT-XL/2": 673_666_572}


@pytest.mark.parametrize("name", sorted(CIFAR_COUNTS))
def test_parameter_counts_match_official_sit(name):
    with torch.device("meta"):
        model = L.SiT_models[name](input_size=32, in_channels=3, num_classes=10)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == CIFAR_COUNTS[name]
    assert "pos_embed" not in dict(model.named_parameters())  # fixed, not trained


def test_parameter_count_imagenet_latents_xl2():
    with torch.device("meta"):
        model = L.SiT_models["SiT-XL/2"]()  # defaults: 32x32x4 latents, 1000 classes
    assert sum(p.numel() for p in model.parameters()) == 674_816_272


def test_timestep_embedding_is_cos_then_sin_of_raw_t():
    embedder = L.TimestepEmbedder(8)
    embedder.mlp = torch.nn.Identity()
    t = torch.tensor([0.0, 0.3])
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    expected = torch.cat([torch.cos(0.3 * freqs), torch.sin(0.3 * freqs)])
    emb = embedder(t)
    assert torch.equal(emb[0], torch.cat([torch.ones(128), torch.zeros(128)]))
    assert torch.allclose(emb[1], expected, atol=1e-6)


def test_position_embedding_is_fixed_sincos():
    model = tiny_sit(perturb=False)
    pos = model.pos_embed[0]  # (16 tokens, 32 channels), 4x4 grid
    assert pos.shape == (16, 32)
    # token 1 is row 0, column 1: first half encodes the column, sin(1) at frequency 1
    assert pos[1, 0].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    assert pos[4, 16].item() == pytest.approx(math.sin(1.0), abs=1e-6)  # row 1, column 0
    assert pos[4, 0].item() == 0.0 and "pos_embed" not in model.state_dict()


def test_label_dropout_uses_null_class_only_in_training():
    model = tiny_sit(class_dropout_prob=1.0)
    emb = model.y_embedder
    y = torch.tensor([0, 1, 2, 3, 4])
    null = emb.table.weight[5]
    emb.train()
    assert torch.equal(emb(y), null.expand(5, -1))
    emb.eval()
    assert torch.equal(emb(y), emb.table.weight[:5])
    emb.dropout_prob = 0.1
    emb.train()
    torch.manual_seed(0)
    dropped = (emb(torch.zeros(20000, dtype=torch.long)) == null).all(-1).float().mean()
    assert abs(dropped.item() - 0.1) < 0.01
    assert tiny_sit(class_dropout_prob=0.0).y_embedder.table.num_embeddings == 5  # no null row


# ---------------------------------------------------------------- the objective, Eq. 1 + 3

def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def loss_and_grads(model, x, y, pairs, weight, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = L.training_loss(model, x, y, pairs, weight)
    out["loss"].backward()
    return out, grads(model)


def test_objective_is_fm_plus_weighted_layersync():
    model = tiny_sit()
    x, y = batch(model)
    out = L.training_loss(model, x, y, [(1, 3)], 0.7)
    assert out["loss"].shape == out["fm"].shape == out["layersync"].shape == ()
    assert torch.allclose(out["loss"], out["fm"] + 0.7 * out["layersync"])
    # fm is Eq. 1 for the same draws: redo them by hand
    torch.manual_seed(5)
    out = L.training_loss(model.eval(), x, y, [(1, 3)], 0.7)
    torch.manual_seed(5)
    x0, t = torch.randn_like(x), torch.rand(len(x))
    xt = t[:, None, None, None] * x + (1 - t[:, None, None, None]) * x0
    v, (h1, h3) = model(xt, t, y, return_layers=(1, 3))
    assert torch.allclose(out["fm"], ((v - (x - x0)) ** 2).mean())
    assert torch.allclose(out["layersync"], L.layersync_loss(h1, h3))


def test_zero_weight_is_exactly_the_baseline():
    model = tiny_sit()
    x, y = batch(model)
    base, g_base = loss_and_grads(model, x, y, (), 0.0)
    zero, g_zero = loss_and_grads(model, x, y, [(1, 3)], 0.0)
    assert torch.equal(base["loss"], zero["loss"]) and base["layersync"] == 0
    assert zero["layersync"] < 0  # still measured, for comparing runs
    assert g_base.keys() == g_zero.keys()
    assert all(torch.equal(g_base[n], g_zero[n]) for n in g_base)


def test_regulariser_gradient_reaches_blocks_up_to_k_only():
    model = tiny_sit(depth=4)
    x, y = batch(model)
    _, g0 = loss_and_grads(model, x, y, [(2, 4)], 0.0)
    _, g1 = loss_and_grads(model, x, y, [(2, 4)], 1.0)
    reg = {n: g1[n] - g0[n] for n in g0}
    for n, g in reg.items():
        deep = n.startswith(("blocks.2.", "blocks.3.", "final_layer"))
        if deep:
            assert torch.equal(g, torch.zeros_like(g)), n  # stop-gradient: nothing after block k
    for i in (0, 1):
        assert sum(g.abs().sum() for n, g in reg.items() if n.startswith(f"blocks.{i}.")) > 0
    assert reg["x_embedder.weight"].abs().sum() > 0


def test_every_pair_counts():
    model = tiny_sit(depth=4)
    x, y = batch(model)
    values = []
    for pairs in ([(1, 3)], [(2, 4)], [(1, 3), (2, 4)]):
        torch.manual_seed(3)
        values.append(L.training_loss(model, x, y, pairs, 0.2)["layersync"])
    assert not torch.allclose(values[0], values[1])
    assert torch.allclose(values[2], (values[0] + values[1]) / 2)


@pytest.mark.parametrize("pairs,message", [
    ([(3, 3)], "shallower"), ([(7, 3)], "shallower"), ([(0, 2)], "at least 1"),
    ([(3, 13)], "only 12 blocks"), ([("3", 7)], "two block numbers"), ([(1, 2, 3)],
                                                                       "two block numbers"),
    ([(True, 2)], "two block numbers"), ([(3, 7), (8, 8)], "(8, 8)")])
def test_bad_pairs_raise_a_clear_error(pairs, message):
    with torch.device("meta"):
        model = L.SiT_models["SiT-S/8"](input_size=32, in_channels=3, num_classes=10)
    with pytest.raises(ValueError, match=r"e\.g\. 3:7") as error:
        L.check_layersync_pairs(pairs, 12)
    assert message in str(error.value)
    x = torch.zeros(2, 3, 32, 32, device="meta")
    with pytest.raises(ValueError):
        L.training_loss(model, x, torch.zeros(2, dtype=torch.long, device="meta"), pairs, 0.2)


def test_default_pair_scales_the_papers_choice():
    assert L.default_layersync_pair(28) == (8, 16)  # the paper's SiT-XL/2 setting
    assert L.default_layersync_pair(12) == (3, 7)
    for depth in range(2, 40):
        k, kk = L.default_layersync_pair(depth)
        assert 1 <= k < kk <= depth
        if depth >= 5:  # Sec. 3.4: not the first block, a real gap, teacher outside the last ~20%
            assert k >= 2 and kk - k >= 2 and kk <= 0.8 * depth, depth
        if depth >= 8:  # the studies' pairs: 8/28 and 16/28 of the depth, rounded
            assert (k, kk) == (round(depth * 8 / 28), round(depth * 16 / 28)), depth
    assert L.default_layersync_pair(6) == L.default_layersync_pair(5) == (2, 4)
    assert L.default_layersync_pair(4) == (1, 2)  # below 5 blocks no pair keeps the rule
    with pytest.raises(ValueError):
        L.default_layersync_pair(1)


def test_training_step_compiles_without_graph_breaks():
    model = tiny_sit()
    x, y = batch(model)

    def step(x, y):
        return L.training_loss(model, x, y, [(1, 3)], 0.2)["loss"]
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)  # fullgraph: breaks raise
    torch.manual_seed(0)
    eager = step(x, y)
    torch.manual_seed(0)
    assert torch.allclose(compiled(x, y), eager, atol=1e-6)


def test_library_refuses_its_traps():
    model = tiny_sit(depth=4)
    x, y = batch(model)
    with pytest.raises(ValueError, match="plain baseline"):
        L.training_loss(model, x, y, (), 0.2)  # the public code's trap: a weight but no pair
    with pytest.raises(ValueError, match="finite and >= 0"):
        L.training_loss(model, x, y, [(1, 3)], float("nan"))
    with pytest.raises(ValueError, match="empty"):
        L.training_loss(model, x[:0], y[:0], [(1, 3)], 0.2)
    torch.manual_seed(0)
    plain = L.training_loss(model, x, y, [(1, 3)], 0.2)["loss"]
    for pair in [(np.int64(1), np.int32(3)), (torch.tensor(1), torch.tensor(3)), [1, 3]]:
        assert L.check_layersync_pairs([pair], 4) == [(1, 3)]
        torch.manual_seed(0)
        assert torch.equal(L.training_loss(model, x, y, [pair], 0.2)["loss"], plain)
    for bad in [(1.0, 3), (torch.tensor(1.5), 3), "13"]:
        with pytest.raises(ValueError, match="two block numbers"):
            L.check_layersync_pairs([bad], 4)


# ---------------------------------------------------------------- samplers

MU, S = 1.5, 0.5


def gaussian_velocity(x, t):
    """Exact marginal velocity of the linear interpolant for data N(mu, s^2 I): with
    S_t = t^2 s^2 + (1 - t)^2, v = mu + (t s^2 - (1 - t)) / S_t (x - t mu); its flow maps noise z
    to mu + s z (mu != 0 keeps the field asymmetric in time, so Heun shows its true order)."""
    t = t.view(-1, *([1] * (x.dim() - 1)))
    s_t = t ** 2 * S ** 2 + (1 - t) ** 2
    return MU + (t * S ** 2 - (1 - t)) / s_t * (x - t * MU)


@pytest.mark.parametrize("method,order", [("euler", 1.0), ("heun", 2.0)])
def test_sampler_converges_with_its_order(method, order):
    z = torch.randn(512, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = MU + S * z
    errors = [(L.sample(gaussian_velocity, z, steps=n, method=method) - exact).abs().max().item()
              for n in (16, 32, 64)]
    observed = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(o - order) < 0.15 for o in observed), observed
    assert errors[-1] < (5e-2 if method == "euler" else 5e-4)


@pytest.mark.parametrize("method,calls", [("euler", 7), ("heun", 14)])
def test_sampler_evaluation_count_and_time_argument(method, calls):
    seen = []

    def velocity_fn(x, t):
        assert t.shape == (x.shape[0],) and t.dtype == x.dtype
        seen.append(t[0].item())
        return torch.zeros_like(x)
    noise = torch.randn(3, 2)
    assert torch.equal(L.sample(velocity_fn, noise, steps=7, method=method), noise)
    assert len(seen) == calls and seen[0] == 0.0 and max(seen) <= 1.0
    with pytest.raises(ValueError, match="euler"):
        L.sample(velocity_fn, noise, method="rk4")


def test_guided_velocity_is_the_cfg_formula_in_one_forward():
    model = tiny_sit().eval()
    x, y = batch(model)
    t = torch.rand(len(x))
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    v = L.guided_velocity(model, y, 4.0)(x, t)
    assert calls == [2 * len(x)]  # conditional + unconditional batched together
    v_c, v_u = model(x, t, y), model(x, t, torch.full_like(y, 5))
    assert torch.allclose(v, v_u + 4.0 * (v_c - v_u), atol=1e-5)
    calls.clear()
    assert torch.equal(L.guided_velocity(model, y, 1.0)(x, t), v_c)
    assert calls == [len(x)]  # scale 1: no extra forward
    with pytest.raises(ValueError, match="eval"):
        L.guided_velocity(model.train(), y, 2.0)


# ---------------------------------------------------------------- the probe, and learning

def test_probe_reads_a_linear_label_and_not_noise():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (1200,), generator=g)
    noise = torch.randn(1200, 24, generator=g)
    carrying = noise.clone()
    carrying[:, :10] = F.one_hot(labels, 10)  # the class, exactly, in 10 of 24 dimensions
    accuracy = L.ridge_probe_accuracy(carrying[:800], labels[:800], carrying[800:], labels[800:],
                                      10)
    assert accuracy == 1.0
    chance = L.ridge_probe_accuracy(noise[:800], labels[:800], noise[800:], labels[800:], 10)
    assert abs(chance - 0.1) < 0.06  # 400 scored samples: chance within about 3 sigma


def test_probe_sees_the_null_label_only():
    model = tiny_sit(depth=3).eval()
    images = torch.rand(5, 3, 8, 8) * 2 - 1
    features, cosine, update = L.block_features(model, images, 0.5, teacher=3)
    assert features.shape == (3, 5, 32) and cosine.shape == update.shape == (3,)
    assert cosine[2].item() == pytest.approx(1.0, abs=1e-5)  # the teacher against itself
    # rebuild x_t by hand: the probe's features are the model's on the null class (5) ...
    x0 = torch.randn(images.shape, generator=torch.Generator().manual_seed(1234))  # default seed
    xt = 0.5 * images + 0.5 * x0
    t = torch.full((5,), 0.5)
    _, hidden = model(xt, t, torch.full((5,), 5), return_layers=(0, 1, 2, 3))
    assert torch.allclose(features, torch.stack([h.mean(1) for h in hidden[1:]]), atol=1e-5)
    by_hand = [((h - h_in).norm(dim=-1) / h_in.norm(dim=-1)).mean()  # h_0: the input tokens
               for h_in, h in zip(hidden, hidden[1:])]
    assert torch.allclose(update, torch.stack(by_hand), atol=1e-5)
    hidden = hidden[1:]
    # ... whatever the true labels are, which do change the blocks' features
    _, labelled = model(xt, t, torch.arange(5), return_layers=(1, 2, 3))
    assert not torch.allclose(features, torch.stack([h.mean(1) for h in labelled]), atol=1e-3)
    with pytest.raises(ValueError, match="null class"):
        L.block_features(tiny_sit(class_dropout_prob=0.0), images, 1.0)


def test_probe_on_the_trained_colour_toy(trained_colour_model):
    probe = probe_colour_model(trained_colour_model)
    assert sorted(probe.accuracy) == sorted(probe.teacher_cosine) == [0.0, 1.0]
    assert all(sorted(blocks) == [1, 2, 3, 4] for blocks in probe.accuracy.values())  # from 1
    clean, noise_only = probe.accuracy[1.0].values(), probe.accuracy[0.0].values()
    assert max(clean) >= 0.9  # chance is 0.25: some block reads the class
    # at t = 0 the input is pure noise; with the label hidden, no block can know the class
    assert max(noise_only) <= 0.45, noise_only
    assert probe.teacher_cosine[1.0][3] == pytest.approx(1.0,
                                                         abs=1e-5)  # the teacher against itself
    assert probe == probe_colour_model(trained_colour_model)  # deterministic


COLOURS = torch.tensor([[0.8, -0.8, -0.8], [-0.8, 0.8, -0.8], [-0.8, -0.8, 0.8], [0.5, 0.5, -0.5]])


@pytest.fixture(scope="module")
def trained_colour_model():
    """A 4-block SiT trained for 600 steps on 4 classes, each a flat colour plus noise."""
    torch.manual_seed(0)
    model = L.SiT(input_size=8, patch_size=4, in_channels=3, hidden_size=64, depth=4,
                  num_heads=4, num_classes=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0)
    for _ in range(600):
        y = torch.randint(0, 4, (64,))
        x1 = COLOURS[y][:, :, None, None] + 0.1 * torch.randn(64, 3, 8, 8)
        loss = L.training_loss(model, x1, y, [(1, 3)], 0.2)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def colour_images(labels, seed):
    g = torch.Generator().manual_seed(seed)
    x = COLOURS[labels][:, :, None, None] + 0.1 * torch.randn(len(labels), 3, 8, 8, generator=g)
    return x.clamp(-1, 1)


def probe_colour_model(model):
    """The probe on the colour-class toy: fit on 200 fresh images, score on 100 others."""
    fit_y, test_y = torch.arange(200) % 4, torch.arange(100) % 4
    return L.linear_probe(model.eval(), (colour_images(fit_y, 1), fit_y),
                          (colour_images(test_y, 2), test_y),
                          [1.0, 0.0], teacher=3)


def test_tiny_sit_learns_class_colours(trained_colour_model):
    """Samples must come back in their class's colour."""
    model = trained_colour_model
    torch.manual_seed(1)
    y = torch.arange(4).repeat_interleave(32)
    images = L.sample(L.guided_velocity(model, y, 1.5), torch.randn(128, 3, 8, 8), steps=10)
    pixels = images.view(4, 32, 3, 64)
    assert (pixels.mean(dim=(1, 3)) - COLOURS).abs().max() < 0.1, pixels.mean(dim=(1, 3))
    assert pixels.std(dim=(1, 3)).max() < 0.3  # the noise was turned into images, not kept


# ================================================================ 2. the README's examples, run

def test_readme_hook_example_runs_as_printed():
    readme = open(os.path.join(HERE, "README.md")).read()
    example, = [block for block in re.findall(r"```python\n(.*?)```", readme,
                                              re.S) if "record_blocks(" in block]
    scope = {}
    exec(compile(example, "README.md", "exec"), scope)
    assert scope["student"].shape == scope["teacher"].shape == (8, 64, 384)  # no class token
    assert torch.isfinite(scope["loss"]) and hook_count(scope["model"].encoder.layers) == 0


def test_readme_paper_to_code_map_names_what_layersync_py_defines():
    """Each name in the last column of the README's paper-to-code table is defined in
    layersync.py (SiT.forward: the method of that class)."""
    readme = open(os.path.join(HERE, "README.md")).read()
    section = readme.split("## Paper to code")[1].split("\n## ")[0]
    cells = [line.rstrip(" |").rsplit("|", 1)[-1] for line in section.splitlines()
             if line.startswith("| ")]
    names = set(re.findall(r"`([A-Za-z_][A-Za-z_.]*)`", "".join(cells)))
    assert {"layersync_loss", "record_blocks", "training_loss", "sample", "linear_probe"} <= names
    for name in names:
        owner = L
        for part in name.split("."):
            assert hasattr(owner, part), name
            owner = getattr(owner, part)


# ================================================================ helpers of the scripts' tests

TINY = ("--model SiT-S/4 --depth 3 --hidden-size 32 --num-heads 2 --image-size 8 --batch-size 8 "
        "--sample-steps 2 --device cpu").split()


@pytest.fixture
def image_folder(tmp_path):
    """3 classes x 8 images of odd sizes and flat random colours, as ImageFolder reads them."""
    rng = np.random.default_rng(0)
    for c in range(3):
        os.makedirs(tmp_path / "images" / f"class{c}")
        for i in range(8):
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            Image.new("RGB", (12, 10), colour).save(tmp_path / "images" / f"class{c}" / f"{i}.png")
    return str(tmp_path / "images")


def image_folder_with(tmp_path, images: dict):
    """One class folder per image, {name.ext: PIL image}."""
    for name, image in images.items():
        folder = tmp_path / "modes" / name.split(".")[0]
        os.makedirs(folder)
        image.save(folder / name)
    return str(tmp_path / "modes")


def write_fake_cifar10(root, per_batch=20):
    """A small cifar-10-batches-py in torchvision's on-disk format (pickled dicts, CHW rows)."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch"]:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, per_batch)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                     "horse", "ship", "truck"]}, f)


def train(folder, out, *extra):
    return train_cifar.main(["--data", folder, "--out", str(out), *TINY, *extra])


def run_error(argv, fn=train_cifar.main):
    with pytest.raises(SystemExit) as error:
        fn(argv)
    return str(error.value.code)


def checkpoint(run_folder):
    """The last.pt of a run folder, as train_cifar.py wrote it."""
    return torch.load(os.path.join(run_folder, "last.pt"), weights_only=True)


def assert_same_training_state(a: dict, b: dict, optimizer=True):
    """Two checkpoints hold bit-identical weights, EMA and (optionally) optimizer moments."""
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys(), key
        assert all(torch.equal(a[key][n], b[key][n]) for n in a[key]), key
    if optimizer:
        for i, state in a["optimizer"]["state"].items():
            assert all(torch.equal(state[k], b["optimizer"]["state"][i][k]) for k in state), i


def poison_training_loss(monkeypatch, at_call: int, effect):
    """train_cifar's training_loss, with `effect(out)` applied at its `at_call`-th call."""
    real_loss, calls = train_cifar.training_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        out = real_loss(*args, **kwargs)
        if len(calls) == at_call:
            effect(out)
        return out
    monkeypatch.setattr(train_cifar, "training_loss", poisoned)


def cli(script, *args):
    """The command line that runs one of the project's scripts."""
    return [sys.executable, os.path.join(HERE, script), *args]


def run_cli(script, *args, timeout=120, **popen):
    """The script as a user runs it, on one thread (as here, so results compare bit for bit)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(cli(script, *args), capture_output=True,
                          text=True, timeout=timeout, env=env, **popen)


def assert_one_line_error(result, *fragments):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if data is read or sampling starts: refusals must come before both."""
    def forbidden(*_, **__):
        raise AssertionError("work started before the input was checked")
    monkeypatch.setattr(train_cifar, "load_data", forbidden)
    monkeypatch.setattr(sample_script, "generate", forbidden)


def terminate_after_two_logged_steps(cmd, out, timeout=120):
    """Start a training command, SIGTERM it once metrics.csv has two rows; (code, stderr)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (out / "metrics.csv").exists() and len(open(out / "metrics.csv").readlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)  # torchrun gives its workers 30 s before killing them
    return proc.returncode, stderr


def torchrun(*args, processes=2, timeout=180, **popen):
    """train_cifar.py under `python -m torch.distributed.run`, as a user launches it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={processes}",
           os.path.join(HERE, "train_cifar.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **popen)


# given after TINY: the later --batch-size wins
DDP = ["--batch-size", "12", "--lr", "3e-3", "--log-every", "4", "--sample-every", "1000",
       "--ckpt-every", "1000", "--probe-every", "0"]


def test_readme_quick_start_runs_as_printed_at_a_smaller_scale(tmp_path):
    """The README's quick start, its commands as printed with a tiny model and 4 steps."""
    readme = open(os.path.join(HERE, "README.md")).read()
    block = readme.split("## Quick start")[1].split("```bash\n")[1].split("```")[0]
    smaller = {"--image-size 16": "--image-size 8", "--depth 8": "--depth 3",
               "--hidden-size 64": "--hidden-size 16", "--num-heads 4": "--num-heads 2",
               "--batch-size 64": "--batch-size 8", "--steps 1200": "--steps 4",
               "--log-every 40": "--log-every 2", "--sample-every 600": "--sample-every 2",
               "--sample-steps 20": "--sample-steps 2"}
    for big, small in smaller.items():
        assert big in block, big
        block = block.replace(big, small)
    commands = [line for line in block.splitlines() if not line.startswith(("python3 -m", "pip "))]
    for name in ("layersync.py", "train_cifar.py", "sample.py"):
        os.symlink(os.path.join(HERE, name), tmp_path / name)
    (tmp_path / "bin").mkdir()  # `python` is this interpreter
    (tmp_path / "bin" / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (tmp_path / "bin" / "python").chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}",
               OMP_NUM_THREADS="1")
    result = subprocess.run(["bash", "-e", "-c", "\n".join(commands)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(tmp_path / "quick.png").size[0] > 1000
    for run in ("quick-baseline", "quick-layersync"):
        rows = list(csv.DictReader(open(tmp_path / "runs" / run / "probe.csv")))
        assert len(rows) == 2 * 2 * 3 and all(float(r["relative_update"]) >= 0 for r in rows)
    assert "arms (runs whose configs and histories differ only in --seed)" in result.stdout


# ================================================================ 3. run and resume

def test_short_run_writes_checkpoint_metrics_and_grids(image_folder, tmp_path):
    out = tmp_path / "run"
    train(image_folder, out, "--steps", "4", "--log-every", "2", "--sample-every", "2",
          "--ckpt-every", "2")
    ckpt = checkpoint(out)  # data only, no pickled code
    assert set(ckpt) == {"model", "ema", "optimizer", "step", "config", "rng", "elapsed_s"}
    assert ckpt["step"] == 4 and ckpt["elapsed_s"] > 0
    assert ckpt["config"]["model"] == dict(input_size=8, patch_size=4, in_channels=3,
                                           hidden_size=32,
                                           depth=3, num_heads=2, num_classes=3)
    assert ckpt["config"]["layersync_pairs"] == [[1, 2]]  # default pair for depth 3
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert {"step", "loss", "fm", "layersync", "img_per_s"} <= rows[0].keys()
    for r in rows:
        assert float(r["loss"]) == pytest.approx(float(r["fm"]) + 0.2 * float(r["layersync"]),
                                                 rel=1e-4)
    for step in (2, 4):
        grid = Image.open(out / f"samples_{step:07d}.png")
        # 8 columns, one row per class, 2 px padding; 8x8 images drawn 8 times larger
        assert grid.size == (8 * 64 + 9 * 2, 3 * 64 + 4 * 2)


def test_resume_equals_uninterrupted_bit_for_bit(image_folder, tmp_path):
    common = ["--log-every", "3", "--sample-every", "100", "--ckpt-every", "100"]
    train(image_folder, tmp_path / "straight", "--steps", "10", *common)
    train(image_folder, tmp_path / "resumed", "--steps", "5", *common)
    halfway = checkpoint(tmp_path / "resumed")
    train(image_folder, tmp_path / "resumed", "--steps", "10", "--resume", *common)
    a = checkpoint(tmp_path / "straight")
    b = checkpoint(tmp_path / "resumed")
    assert a["step"] == b["step"] == 10
    assert_same_training_state(a, b)
    assert torch.equal(a["rng"]["ranks"][0]["torch"], b["rng"]["ranks"][0]["torch"])
    assert not torch.equal(a["model"]["blocks.0.attn.qkv.weight"],
                           halfway["model"]["blocks.0.attn.qkv.weight"])
    steps = [int(r["step"]) for r in csv.DictReader(open(tmp_path / "resumed" / "metrics.csv"))]
    assert steps == [3, 5, 6, 9, 10]  # resumed rows follow on, none repeated


def relative_distance(a: dict, b: dict) -> dict:
    """How far checkpoint a's weights, EMA and AdamW moments are from b's, relative to b's."""
    def tensors(c):
        moments = [v for _, s in sorted(c["optimizer"]["state"].items())
                   for k, v in sorted(s.items()) if k != "step"]
        return {"model": [c["model"][n] for n in sorted(c["model"])],
                "ema": [c["ema"][n] for n in sorted(c["ema"])], "moments": moments}

    def flat(ts):
        return torch.cat([t.double().flatten() for t in ts])
    ours, theirs = tensors(a), tensors(b)
    return {k: float((flat(ours[k]) - flat(theirs[k])).norm() / flat(theirs[k]).norm())
            for k in ours}


RESUMABLE = ["--lr", "3e-3", "--no-hflip", "--log-every", "3", "--sample-every", "100",
             "--ckpt-every", "100", "--probe-every", "0"]


def test_resume_from_the_checkpoint_alone(image_folder, tmp_path):
    """`--out DIR --resume` continues a run with the flags it was started with: 3 steps, then
    --steps 6 and nothing else, equal 6 straight steps (with the default --lr and flips instead,
    they would not)."""
    flags = ["--data", image_folder, *TINY, *RESUMABLE]
    train_cifar.main([*flags, "--out", str(tmp_path / "straight"), "--steps", "6"])
    train_cifar.main([*flags, "--out", str(tmp_path / "resumed"), "--steps", "3"])
    train_cifar.main(["--out", str(tmp_path / "resumed"), "--resume", "--steps", "6"])
    a, b = checkpoint(tmp_path / "straight"), checkpoint(tmp_path / "resumed")
    assert_same_training_state(a, b)
    assert b["config"]["flags"]["lr"] == 3e-3 and b["config"]["flags"]["steps"] == 6
    # elapsed_s goes on from where the resumed run left it
    elapsed = [float(r["elapsed_s"]) for r in csv.DictReader(open(tmp_path / "resumed" /
                                                                   "metrics.csv"))]
    assert len(elapsed) == 2 and elapsed[0] < elapsed[1]


def test_resume_of_a_finished_run_has_nothing_to_do(image_folder, tmp_path, capsys):
    train_cifar.main(["--data", image_folder, *TINY, *RESUMABLE, "--out", str(tmp_path / "run"),
                      "--steps", "3"])
    before = folder_contents(tmp_path / "run")
    capsys.readouterr()
    train_cifar.main(["--out", str(tmp_path / "run"), "--resume"])
    assert "at step 3 >= --steps 3: nothing to do" in capsys.readouterr().out
    assert folder_contents(tmp_path / "run") == before


def test_resume_lists_every_changed_setting_and_nothing_else(image_folder, tmp_path, capsys):
    train_cifar.main(["--data", image_folder, *TINY, *RESUMABLE, "--out", str(tmp_path / "run"),
                      "--steps", "3"])
    capsys.readouterr()
    train_cifar.main(["--out", str(tmp_path / "run"), "--resume", "--steps", "5", "--lr", "1e-3",
                      "--no-hflip", "--layersync-pairs", "1:2"])  # given again, unchanged
    printed = capsys.readouterr()
    said = next(line for line in printed.out.splitlines() if line.startswith("resumed at step 3"))
    assert said.endswith("settings changed: --steps 3 -> 5, --lr 0.003 -> 0.001"), said
    config = checkpoint(tmp_path / "run")["config"]
    assert config["lr"] == 1e-3 and config["history"] == [
        {"step": 3, "changes": {"steps": [3, 5], "lr": [3e-3, 1e-3]}}]
    # the bar spells out Eq. 3: fm + lambda x layersync = loss
    assert re.search(r"fm \d\.\d{4} \+ 0\.2 x layersync -?\d\.\d{3} = -?\d\.\d{4}", printed.err)


def test_resume_sets_the_optimizer_and_refuses_a_new_seed(image_folder, tmp_path):
    """A given weight decay acts on the optimizer; a new seed is refused (the RNG is the run's)."""
    out = tmp_path / "run"
    train_cifar.main(["--data", image_folder, *TINY, *RESUMABLE, "--out", str(out), "--steps",
                      "2"])
    train_cifar.main(["--out", str(out), "--resume", "--steps", "3", "--weight-decay", "0.1"])
    assert {g["weight_decay"] for g in checkpoint(out)["optimizer"]["param_groups"]} == {0.1}
    assert_refused(run_error(["--out", str(out), "--resume", "--steps", "4", "--seed", "5"]),
                   "seed")
    assert checkpoint(out)["step"] == 3


def test_sklearn_digits_are_built_in(tmp_path, monkeypatch):
    images, labels, classes = train_cifar.load_data("sklearn-digits", None, 16)
    assert images.shape == (1797, 3, 16, 16) and images.dtype == torch.uint8
    assert classes == [str(d) for d in range(10)] and labels.unique().tolist() == list(range(10))
    assert torch.equal(images[:, 0], images[:, 2]) and images.max() == 255
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # as if not installed
    message = run_error(["--data", "sklearn-digits", "--out", str(tmp_path / "x"), *TINY])
    assert "pip install scikit-learn" in message and not (tmp_path / "x").exists()


def test_trains_on_cifar10_format(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path / "data")
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a,
                        **k: True)  # fake md5s
    out = tmp_path / "run"
    tiny = [a if a != "8" else "32" for a in TINY]  # CIFAR-10 is 32x32
    train_cifar.main(["--data-dir", str(tmp_path / "data"), "--out", str(out), *tiny, "--steps",
                      "2"])
    ckpt = checkpoint(out)
    assert ckpt["config"]["model"]["num_classes"] == 10 and ckpt["config"]["classes"][9] == "truck"
    assert Image.open(out / "samples_0000002.png").size == (8 * 64 + 18, 10 * 64 + 22)  # 2x
    # the probe fits on the training split and scores on test_batch: 3 blocks x 2 noise levels
    assert len(list(csv.DictReader(open(out / "probe.csv")))) == 6


def test_device_batches_shuffle_flip_and_scale():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).clone()
    images[:, :, :, 1] += 100  # the right column is brighter: a flip is visible
    batches = train_cifar.DeviceBatches(images, torch.arange(10), 5, seed=0, device="cpu")
    seen, flipped = [], 0
    for _ in range(2):  # one epoch = two batches of five
        x, y = batches.next()
        assert x.min() >= -1 and x.max() <= 1
        pixel = ((x + 1) * 127.5).round()
        assert torch.equal(pixel[:, 0, 0, :].min(1).values,
                           y.double().float())  # image i has label i
        flipped += (pixel[:, 0, 0, 0] > pixel[:, 0, 0, 1]).sum().item()
        seen += y.tolist()
    assert sorted(seen) == list(range(10)) and 0 < flipped < 10


def test_ema_warm_up():
    ema, params = [torch.zeros(3)], [torch.ones(3)]
    train_cifar.update_ema(ema, params, step=0, max_decay=0.9999)  # decay 1/10 at the start
    assert torch.allclose(ema[0], torch.full((3,), 0.9))
    ema = [torch.zeros(3)]
    train_cifar.update_ema(ema, params, step=10**6, max_decay=0.9999)
    assert torch.allclose(ema[0], torch.full((3,), 1e-4))


def test_grad_clip_zero_means_no_clipping(image_folder, tmp_path):
    common = ["--steps", "3", "--lr", "1e-2"]
    weights = {}
    for clip in ("0", "1e9", "1e-3"):
        train(image_folder, tmp_path / clip, "--grad-clip", clip, *common)
        weights[clip] = checkpoint(tmp_path / clip)["model"]
    for name in weights["0"]:  # 0 = never clip: the same as a bound that is never reached
        assert torch.equal(weights["0"][name], weights["1e9"][name]), name
    assert any(not torch.equal(weights["0"][n], weights["1e-3"][n]) for n in weights["0"])
    norms = [float(r["grad_norm"]) for r in csv.DictReader(open(tmp_path / "0" / "metrics.csv"))]
    assert norms and all(n > 0 for n in norms)  # still measured


def test_training_flops_per_image_match_the_sit_cost_formula():
    """The MFU's numerator: 3 forwards of 2 FLOPs per multiply-add; SiT-S/2 on 32x32 is about
    6.06 G multiply-adds per forward, SiT-XL/2 on 32x32 latents 118.6 G (the SiT cost formula)."""
    for name, channels, gmacs in (("SiT-S/2", 3, 6.06), ("SiT-XL/2", 4, 118.6)):
        config = dict(L.SiT_models[name].keywords, input_size=32, in_channels=channels)
        assert train_cifar.train_flops_per_image(config) / 6e9 == pytest.approx(gmacs, rel=0.01)


def test_one_block_baseline_trains_and_one_block_layersync_is_refused(image_folder, tmp_path,
                                                                      capsys):
    train(image_folder, tmp_path / "one", "--depth", "1", "--layersync-weight", "0", "--steps", "2")
    ckpt = checkpoint(tmp_path / "one")
    assert ckpt["config"]["model"]["depth"] == 1 and ckpt["config"]["layersync_pairs"] == []
    error = run_error(["--data", image_folder, "--out", str(tmp_path / "two"), *TINY, "--depth",
                       "1"])
    assert "at least 2 blocks" in error and "--layersync-weight 0" in error


def test_flips_are_a_choice_recorded_and_shown(image_folder, tmp_path, capsys):
    images = torch.zeros(8, 3, 2, 2, dtype=torch.uint8)
    images[:, :, :, 1] = 255
    for hflip, expect_flips in ((False, False), (True, True)):
        batches = train_cifar.DeviceBatches(images, torch.zeros(8, dtype=torch.long), 8, 0, "cpu",
                                            hflip)
        flipped = (batches.next()[0][:, 0, 0, 0] > 0).any().item()
        assert flipped == expect_flips
    train(image_folder, tmp_path / "run", "--steps", "1", "--no-hflip")
    assert checkpoint(tmp_path / "run")["config"]["hflip"] is False
    banner = capsys.readouterr().out
    assert "flips off" in banner
    assert ("SiT-S/4 changed by --depth --hidden-size --num-heads: depth 3, width 32, 2 heads, "
            "patch 4") in banner


def test_resume_keeps_only_readable_log_rows(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(image_folder, out, "--steps", "2", "--log-every", "1")
    # the same folder spelled relative to another working directory is the same data
    monkeypatch.chdir(os.path.dirname(image_folder))
    with open(out / "metrics.csv", "a") as f:
        # hand edits (a label, an extra field, text for a number) and a line cut by kill -9
        f.write("garbage,row\n1,2,3,4,5,6,7,8\n2,1,1,1,1,x,\n3,not,a,number\n")
    train(os.path.basename(image_folder), out, "--steps", "3", "--resume", "--log-every", "1")
    assert [r["step"] for r in csv.DictReader(open(out / "metrics.csv"))] == ["1", "2", "3"]


def test_resume_refuses_renamed_classes(image_folder, tmp_path):
    """Renamed class folders would shift every label."""
    out = tmp_path / "run"
    train(image_folder, out, "--steps", "2")
    os.rename(os.path.join(image_folder, "class2"), os.path.join(image_folder, "zebra"))
    error = run_error(["--data", image_folder, "--out", str(out), *TINY, "--steps", "4",
                       "--resume"])
    assert "classes:" in error and "zebra" in error and "\n" not in error


def test_a_dict_that_is_not_a_checkpoint_of_ours_is_refused(image_folder, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"state_dict": {"w": torch.zeros(1)}}, out / "last.pt")
    for argv, fn in ((["--data", image_folder, "--out", str(out), *TINY, "--resume"],
                      train_cifar.main),
                     (["--ckpt", str(out / "last.pt"), "--grid", "g.png"], sample_script.main)):
        assert_refused(run_error(argv, fn), str(out / "last.pt"), "state_dict")


def test_one_precision_rule_for_step_grids_and_probe(image_folder, tmp_path, monkeypatch):
    """--precision decides autocast everywhere (before, the probe and sample.py chose by device)."""
    seen, real = [], train_cifar.autocast

    def recording(device, precision):
        seen.append(precision)
        return real(device, precision)
    monkeypatch.setattr(train_cifar, "autocast", recording)
    for precision in ("fp32", "bf16"):
        seen.clear()
        train(image_folder, tmp_path / precision, "--steps", "2", "--sample-every", "2",
              "--probe-every", "2", "--precision", precision)
        assert len(seen) == 2 + 1 + 1 and set(seen) == {precision}  # 2 steps, 1 grid, 1 probe
    cpu = torch.device("cpu")
    assert real(cpu, "bf16")._enabled and not real(cpu, "fp32")._enabled


# ================================================================ 4. refusals: one line, no work

def test_command_line_errors_are_one_line_without_traceback(image_folder, tmp_path):
    cmd = cli("train_cifar.py", "--data", image_folder, "--out", str(tmp_path / "x"), *TINY,
              "--depth", "12", "--layersync-pairs", "7:3")
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "error: --layersync-pairs" in result.stderr and "e.g. 3:7" in result.stderr
    assert not (tmp_path / "x").exists()  # stopped before any work


def assert_refused(error: str, *names):
    """A refusal: one line, starting with error:, naming each of `names` (a flag, a file)."""
    assert error.startswith("error: ") and "\n" not in error, error
    assert all(name in error for name in names), (names, error)


@pytest.mark.parametrize("pairs", ["3:3", "2:9", "1-2", "1:2,x", "0:2", "1:2:3"])
def test_bad_pairs_stop_with_a_clear_message(image_folder, tmp_path, no_work, pairs):
    error = run_error(["--data", image_folder, "--out", str(tmp_path / "x"), *TINY,
                       "--layersync-pairs", pairs])
    assert_refused(error, "--layersync-pairs", pairs)
    assert not (tmp_path / "x").exists()


def test_missing_data_is_a_clear_error(tmp_path, monkeypatch):
    args = ["--out", str(tmp_path / "x"), *TINY]
    assert "no such folder" in run_error(["--data", str(tmp_path / "nope"), *args])
    assert_refused(run_error(["--data", "sklearn_digits", *args]), "sklearn_digits",
                   "sklearn-digits", "cifar10")  # a typo of a built-in: the built-ins named
    os.makedirs(tmp_path / "empty" / "class0")
    assert "one sub-folder per class" in run_error(["--data", str(tmp_path / "empty"), *args])
    (tmp_path / "empty" / "class0" / "broken.png").write_bytes(b"not a png")
    assert "broken.png" in run_error(["--data", str(tmp_path / "empty"), *args])
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "0.png")  # images, but no class folders
    message = run_error(["--data", str(tmp_path / "flat"), *args])
    assert "class folder in" in message and ".;" not in message, message
    # a batch larger than the dataset: refused after reading it, before --out is made
    message = run_error(["--data", image_folder_with(tmp_path, {"a.png": Image.new("RGB", (8, 8))}),
                         *args, "--batch-size", "64"])
    assert "the dataset has" in message and "fewer than --batch-size 64" in message
    assert not (tmp_path / "x").exists()

    def offline(*_, **__):
        raise OSError("no internet")
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    message = run_error(["--data", "cifar10", "--data-dir", str(tmp_path / "nocifar"), "--out",
                         str(tmp_path / "x")])
    assert "cifar-10-python.tar.gz" in message and "no internet" in message


def test_resume_refuses_another_configuration(image_folder, tmp_path):
    out = tmp_path / "run"
    train(image_folder, out, "--steps", "2")
    message = run_error(["--data", image_folder, "--out", str(out), *TINY, "--depth", "2",
                         "--resume", "--steps", "4"])
    assert "another configuration" in message and "depth: 3 in the checkpoint, 2 now" in message
    # the run is finished, yet a contradicting flag is still refused, not "nothing to do"
    before = sorted(os.listdir(out)), checkpoint(out)["step"]
    assert_refused(run_error(["--out", str(out), "--resume", "--depth", "2"]), str(out))
    assert (sorted(os.listdir(out)), checkpoint(out)["step"]) == before
    assert "--resume" in run_error(["--data", image_folder, "--out", str(out),
                                    *TINY])  # no silent overwrite
    assert "no checkpoint" in run_error(["--data", image_folder, "--out", str(tmp_path / "new"),
                                         *TINY, "--resume"])


def folder_contents(folder) -> dict:
    """Every file of a folder and its bytes: what a refusal must leave as it was."""
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def test_a_resume_cannot_change_the_layersync_arm(image_folder, tmp_path):
    """A baseline resumed with the LayerSync command would be neither arm: refused in one line
    naming the weight (or the pairs), before anything is written, also once the run has ended."""
    out = tmp_path / "base"
    train(image_folder, out, "--layersync-weight", "0", "--steps", "2")
    before = folder_contents(out)
    for argv in (["--steps", "4", "--layersync-weight", "0.2"], ["--layersync-weight", "0.2"],
                 ["--steps", "4", "--layersync-pairs", "1:3"]):
        error = run_error(["--out", str(out), "--resume", *argv])
        assert_refused(error, "layersync_", "another --out")
        assert folder_contents(out) == before


def test_a_last_pt_of_another_run_is_refused_before_anything_is_written(image_folder, tmp_path):
    """One folder holds one run: a last.pt copied over another run's snapshots and logs is
    refused by --resume, --fid RUN_DIR and --compare; a new run refuses a folder with snapshots;
    in a folder of its own, the copied last.pt continues."""
    train(image_folder, tmp_path / "a", "--steps", "4", "--keep-every", "2")
    train(image_folder, tmp_path / "b", "--steps", "6", "--seed", "1")
    shutil.copy(tmp_path / "b" / "last.pt", tmp_path / "a" / "last.pt")
    before = folder_contents(tmp_path / "a")
    error = run_error(["--out", str(tmp_path / "a"), "--resume", "--steps", "8"])
    assert_refused(error, "--resume", "different runs", "ema_0000002.pt")
    for argv in (["--fid", str(tmp_path / "a")], ["--compare", str(tmp_path / "a")]):
        assert_refused(run_error(argv, sample_script.main), argv[0], "different runs")
    assert folder_contents(tmp_path / "a") == before
    os.remove(tmp_path / "a" / "last.pt")  # snapshots alone: still another run's folder
    error = run_error(["--data", image_folder, "--out", str(tmp_path / "a"), *TINY])
    assert_refused(error, "ema_<step>.pt", "remove them")
    (tmp_path / "alone").mkdir()
    shutil.copy(tmp_path / "b" / "last.pt", tmp_path / "alone" / "last.pt")
    train_cifar.main(["--out", str(tmp_path / "alone"), "--resume", "--steps", "8"])
    run_id = checkpoint(tmp_path / "b")["config"]["run_id"]
    assert checkpoint(tmp_path / "alone")["config"]["run_id"] == run_id
    assert (tmp_path / "alone" / "run_id.txt").read_text().strip() == run_id


@pytest.mark.parametrize("flag,value", [
    ("--grad-clip", "-1"), ("--ema-decay", "1"), ("--ema-decay", "-0.5"),
    ("--layersync-weight", "-0.2"), ("--layersync-weight", "nan"), ("--lr", "inf"), ("--lr", "0"),
    ("--weight-decay", "-1"), ("--batch-size", "0"), ("--steps", "0"), ("--log-every", "0"),
    ("--sample-every", "-3"), ("--ckpt-every", "0"), ("--sample-steps", "0"), ("--depth", "0"),
    ("--keep-every", "-1"), ("--probe-every", "-1"), ("--probe-t", "1.5"), ("--probe-t", "x"),
    ("--patch-size", "3"), ("--num-heads", "5"), ("--hidden-size", "30"), ("--device", "mps"),
    ("--device", "gpu0")])
def test_bad_flag_is_one_line_before_any_work(image_folder, tmp_path, no_work, flag, value):
    error = run_error(["--data", image_folder, "--out", str(tmp_path / "x"), *TINY, flag, value])
    # a shape the model cannot take names the model flag and the rule it broke, once
    assert_refused(error, "--model" if flag in ("--patch-size", "--num-heads", "--hidden-size")
                   else flag)
    assert error.count("divisible") <= 1 and not (tmp_path / "x").exists()


def test_bad_out_folder_is_refused_before_any_work(image_folder, tmp_path, no_work):
    (tmp_path / "afile").write_text("")
    for out in (tmp_path / "afile", tmp_path / "afile" / "run"):
        assert_refused(run_error(["--data", image_folder, "--out", str(out), *TINY]), "--out",
                       str(tmp_path / "afile"))
    assert (tmp_path / "afile").read_text() == ""


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no /proc on this system")
def test_out_on_a_virtual_filesystem_is_refused_as_such(image_folder, tmp_path, no_work):
    """/proc stores no files: one line saying so, not a full disk's advice."""
    error = run_error(["--data", image_folder, "--out", "/proc/layersync-run", *TINY])
    assert_refused(error, "--out /proc/layersync-run", "virtual filesystem")
    assert "--keep-every" not in error and not os.path.exists("/proc/layersync-run")


def test_refusals_through_the_command_line(image_folder, tmp_path):
    result = run_cli("train_cifar.py", "--data", image_folder, "--out", str(tmp_path / "x"), *TINY,
                     "--grad-clip", "-1", cwd=tmp_path)
    assert_one_line_error(result, "--grad-clip")
    result = run_cli("train_cifar.py", "--data", image_folder, "--out", str(tmp_path / "x"), *TINY,
                     "--device", "tpu", cwd=tmp_path)
    assert_one_line_error(result, "--device tpu")
    result = run_cli("sample.py", "--ckpt", "nope.pt", "--grid",
                     str(tmp_path / "missing" / "g.png"), cwd=tmp_path)
    assert_one_line_error(result, "--grid", "does not exist")


def test_every_image_mode_reads_right(tmp_path):
    grey16 = Image.fromarray(np.full((6, 6), 32768, dtype=np.uint16))  # mid-grey, 16 bits
    assert grey16.mode.startswith("I")
    transparent = Image.new("RGBA", (6, 6), (255, 0, 0, 0))  # red, but fully transparent
    palette = Image.new("RGB", (6, 6), (10, 200, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    folder = image_folder_with(tmp_path, {
        "a16.png": grey16, "b_rgba.png": transparent, "c_palette.png": palette,
        "d_l.png": Image.new("L", (6, 6), 77), "e_bw.png": Image.new("1", (6, 6), 1),
        "f_cmyk.jpg": Image.new("CMYK", (6, 6), (0, 0, 0, 0)), "g_la.png": Image.new("LA", (6, 6),
                                                                                     (40, 255))})
    images, labels, classes = train_cifar.load_image_folder(folder, 4)
    pixel = {name: images[labels == i][0, :, 0, 0].tolist() for i, name in enumerate(classes)}
    assert pixel["a16"] == [128, 128, 128]  # 32768 / 257 = 127.5: mid-grey, not clipped to 255
    assert pixel["b_rgba"] == [255, 255, 255]  # transparent over white, not the hidden red
    assert pixel["c_palette"] == [10, 200, 30] and pixel["d_l"] == [77] * 3
    assert pixel["e_bw"] == [255] * 3
    assert pixel["f_cmyk"] == [255, 255, 255] and pixel["g_la"] == [40] * 3


def test_unreadable_images_are_named(tmp_path, no_work):
    png = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3),
                                                      dtype=np.uint8)).save(png)
    folder = tmp_path / "data" / "cls"
    os.makedirs(folder)
    (folder / "cut.png").write_bytes(png.read_bytes()[:300])  # a truncated download
    error = run_error([str(folder.parent), "8"],
                      lambda a: train_cifar.load_image_folder(*a[:1], int(a[1])))
    assert "cut.png" in error and "sub-folder" not in error and "\n" not in error
    os.remove(folder / "cut.png")
    Image.fromarray(np.ones((4, 4), dtype=np.float32)).save(folder / "float.tif")
    error = run_error([str(folder.parent), "8"],
                      lambda a: train_cifar.load_image_folder(*a[:1], int(a[1])))
    assert "float.tif" in error and "8- or 16-bit" in error


def test_sample_checks_its_outputs_before_sampling(image_folder, tmp_path, monkeypatch):
    train(image_folder, tmp_path / "run", "--steps", "1")
    ckpt = str(tmp_path / "run" / "last.pt")
    monkeypatch.setattr(sample_script, "generate",
                        lambda *a: pytest.fail("sampled before checking"))
    base = ["--ckpt", ckpt, "--device", "cpu"]
    assert "must end with .npz" in run_error([*base, "--npz", str(tmp_path / "s.np")],
                                             sample_script.main)
    assert ".png or .jpg" in run_error([*base, "--grid", str(tmp_path / "g.gif")],
                                       sample_script.main)
    assert "does not exist" in run_error([*base, "--grid", str(tmp_path / "no" / "g.png")],
                                         sample_script.main)
    assert "--steps 0" in run_error([*base, "--grid", str(tmp_path / "g.png"), "--steps", "0"],
                                    sample_script.main)
    assert "finite" in run_error([*base, "--grid", str(tmp_path / "g.png"), "--cfg-scale", "nan"],
                                 sample_script.main)
    assert "--device" in run_error([*base, "--grid", str(tmp_path / "g.png"), "--device", "xla"],
                                   sample_script.main)
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    assert "pip install torch-fidelity" in run_error([*base, "--fid"], sample_script.main)


@pytest.mark.parametrize("argv, names", [
    ([], ["--ckpt", "--compare"]),  # nothing to read
    (["--ckpt", "a.pt", "--compare", "run"], ["--ckpt", "--compare"]),  # one or the other
    (["--ckpt", "a.pt"], ["--grid", "--npz", "--fid", "--probe"]),  # nothing to write
    (["--ckpt", "a.pt", "--fid", "--class-label", "1"], ["--class-label"]),
    (["--fid", "RUN", "--ckpt", "a.pt"], ["--fid", "--ckpt"])])
def test_sample_usage_errors_name_their_flags(tmp_path, capsys, monkeypatch, argv, names):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "RUN").mkdir()
    with pytest.raises(SystemExit) as error:
        sample_script.main(argv)
    message = capsys.readouterr().err.strip().splitlines()[-1]  # argparse: usage, then the error
    assert error.value.code == 2 and all(name in message for name in names), message
    assert os.listdir(tmp_path) == ["RUN"]


def test_sample_fid_without_torch_fidelity_says_what_to_install(image_folder, tmp_path,
                                                                monkeypatch):
    train(image_folder, tmp_path / "run", "--steps", "1")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails as if not installed
    message = run_error(["--ckpt", str(tmp_path / "run" / "last.pt"), "--n", "2", "--steps", "1",
                         "--fid",
                         "--device", "cpu"], sample_script.main)
    assert "pip install torch-fidelity" in message
    assert "no checkpoint" in run_error(["--ckpt", str(tmp_path / "nope.pt"), "--grid", "g.png"],
                                        sample_script.main)


# ================================================================ 5. signals and crashes

def test_ctrl_c_while_saving_keeps_the_old_checkpoint(image_folder, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(image_folder, out, "--steps", "2")
    before = (out / "last.pt").read_bytes()

    def interrupted_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(train_cifar.torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        train(image_folder, out, "--steps", "4", "--resume")
    monkeypatch.undo()
    assert (out / "last.pt").read_bytes() == before
    assert checkpoint(out)["step"] == 2
    assert not (out / "last.pt.tmp").exists()


@pytest.mark.parametrize("output", [["--keep-every", "5"], ["--probe-every", "5"]])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(image_folder, tmp_path,
                                                                  monkeypatch, output):
    poison_training_loss(monkeypatch, 4, lambda out: out.update(loss=out["loss"] * float("nan")))
    out = tmp_path / "run"
    message = run_error(["--data", image_folder, "--out", str(out), *TINY, "--steps", "8",
                         "--ckpt-every", "3", "--log-every", "3", *output])  # logged at 6
    assert "non-finite at step 4" in message and "last.pt" in message
    assert checkpoint(out)["step"] == 3
    assert not (out / "ema_0000005.pt").exists()  # no snapshot of poisoned weights either
    assert list(csv.DictReader(open(out / "probe.csv"))) == []  # nor a probe of them


def test_ctrl_c_finishes_the_step_saves_and_stops(image_folder, tmp_path, monkeypatch):
    # as if the user pressed Ctrl-C during step 3, a second into the run
    poison_training_loss(monkeypatch, 3, lambda out: time.sleep(1) or os.kill(os.getpid(),
                                                                              signal.SIGINT))
    before = signal.getsignal(signal.SIGINT)  # Python's own, or SIG_IGN in a background job
    with pytest.raises(SystemExit) as error:
        train(image_folder, tmp_path / "run", "--steps", "10", "--ckpt-every", "100")
    assert error.value.code == 128 + signal.SIGINT  # interrupted, not finished
    assert checkpoint(tmp_path / "run")["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # the handler given back
    # no metrics row was logged before the stop, yet the resumed run's time goes on from it
    monkeypatch.undo()
    train(image_folder, tmp_path / "run", "--steps", "4", "--resume")
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [r["step"] for r in rows] == ["4"] and float(rows[0]["elapsed_s"]) > 1, rows


def test_sigterm_saves_and_resumes_bit_identical(image_folder, tmp_path):
    """What SLURM sends before it preempts: finish the step, save, exit 143, resume exactly."""
    out = tmp_path / "run"
    common = ["--log-every", "1", "--sample-every", "10000", "--ckpt-every", "10000"]
    cmd = cli("train_cifar.py", "--data", image_folder, "--out", str(out), *TINY, "--steps",
              "10000", *common)
    code, stderr = terminate_after_two_logged_steps(cmd, out)
    assert code == 128 + signal.SIGTERM, stderr
    assert "interrupted by SIGTERM" in stderr and "--resume" in stderr and "Traceback" not in stderr
    stopped = checkpoint(out)["step"]
    assert 2 <= stopped < 10000
    train(image_folder, out, "--steps", str(stopped + 3), "--resume", *common)
    train(image_folder, tmp_path / "straight", "--steps", str(stopped + 3), *common)
    assert_same_training_state(checkpoint(out), checkpoint(tmp_path / "straight"))


def start_and_wait_for_rows(cmd, metrics, rows: int, timeout=120):
    """Start a training command; return the process once its metrics.csv has `rows` rows."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) > rows:
            return proc
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the trainer did not log {rows} rows: {proc.communicate()[1][-2000:]}")


def test_one_trainer_per_folder_a_second_is_refused_naming_the_first(image_folder, tmp_path):
    """A live run holds its --out: a second trainer, with or without --resume, is refused in one
    line naming the first's pid and changes nothing; the first goes on, and logs every step once."""
    out = tmp_path / "run"
    common = [*TINY, "--log-every", "1", "--sample-every", "10000", "--ckpt-every", "3"]
    first = start_and_wait_for_rows(cli("train_cifar.py", "--data", image_folder, "--out",
                                        str(out), "--steps", "100000", *common),
                                    out / "metrics.csv", 4)
    for again in (["--resume"], ["--seed", "1"]):
        before = (out / "run_id.txt").read_text()
        second = run_cli("train_cifar.py", "--data", image_folder, "--out", str(out), *common,
                         "--steps", "100000", *again)
        assert_one_line_error(second, f"--out {out}", f"pid {first.pid} on ", "another trainer")
        assert (out / "run_id.txt").read_text() == before and first.poll() is None
    first.send_signal(signal.SIGTERM)  # the first saves and stops, as it would at its end
    _, stderr = first.communicate(timeout=60)
    assert first.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    steps = [int(row["step"]) for row in csv.DictReader(open(out / "metrics.csv"))]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] == checkpoint(out)["step"]
    assert not list(out.glob("*.tmp"))


def test_after_kill_9_a_resume_finds_no_stale_lock(image_folder, tmp_path):
    out = tmp_path / "run"
    common = [*TINY, "--log-every", "1", "--sample-every", "10000", "--ckpt-every", "2"]
    proc = start_and_wait_for_rows(cli("train_cifar.py", "--data", image_folder, "--out",
                                       str(out), "--steps", "100000", *common),
                                   out / "metrics.csv", 3)
    proc.kill()  # SIGKILL: no handler runs, nothing is cleaned up
    proc.communicate(timeout=60)
    saved = checkpoint(out)["step"]
    train(image_folder, out, *common, "--steps", str(saved + 2), "--resume")
    assert checkpoint(out)["step"] == saved + 2


def test_a_temporary_file_is_its_writers_own_and_a_failure_names_its_cause(tmp_path):
    """Two processes writing one file never share a temporary file: its name carries the pid.
    A write that fails for want of a folder says so, and is not called a full disk."""
    seen = []
    train_cifar.RunFiles.write(str(tmp_path / "a.txt"), lambda f: seen.append(os.listdir(tmp_path)))
    assert seen == [[f"a.txt.{os.getpid()}.tmp"]] and os.listdir(tmp_path) == ["a.txt"]
    with pytest.raises(train_cifar.RunFiles.WriteFailed) as failed:
        train_cifar.RunFiles.write(str(tmp_path / "gone" / "b.txt"), lambda f: None)
    assert failed.value.errno == errno.ENOENT and os.strerror(errno.ENOENT) in str(failed.value)


# ================================================================ 5a. a full disk, for real
#
# RLIMIT_FSIZE caps the size of any file the process writes: a write past it fails with EFBIG
# (Python ignores SIGXFSZ), and torch's zip writer raises the same RuntimeError as on a full disk
# (ENOSPC). As root, a small tmpfs gives a true ENOSPC too.

@contextmanager
def file_size_limit(size: int):
    """This process's files may not grow past `size` bytes inside the `with`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def limit_file_size(size: int):
    """For subprocess.run's preexec_fn: the same limit in the child, before it starts."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE,
                                      (size, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def complete_rows(path) -> list:
    """A CSV's rows, asserting that each has every field and the file ends with a whole line."""
    text = open(path, newline="").read()
    assert text.endswith("\n"), text[-80:]
    rows = list(csv.DictReader(io.StringIO(text)))
    assert all(None not in row and "" not in row.values() for row in rows), rows
    return rows


TOO_LARGE = os.strerror(errno.EFBIG)  # "File too large"
QUIET = ["--no-hflip", "--probe-every", "0", "--keep-every", "0", "--sample-every", "100"]


def test_a_checkpoint_the_disk_cannot_hold_stops_in_one_line_and_resumes_later(image_folder,
                                                                             tmp_path,
                                                                             monkeypatch):
    """The next last.pt cannot be written: one line naming it and the cause, the last good last.pt
    and complete CSV rows kept, no temporary file; once there is room, --resume ends where an
    uninterrupted run does, bit for bit."""
    train(image_folder, tmp_path / "straight", *QUIET, "--log-every", "2", "--steps", "8")
    out = tmp_path / "run"
    train(image_folder, out, *QUIET, "--log-every", "2", "--steps", "4")
    before = (out / "last.pt").read_bytes()
    with file_size_limit(len(before) // 2):
        error = run_error(["--out", str(out), "--resume", "--steps", "8", "--ckpt-every", "2"])
    assert_refused(error, str(out / "last.pt"), TOO_LARGE, "--resume")
    assert (out / "last.pt").read_bytes() == before and not list(out.glob("*.tmp"))
    assert [row["step"] for row in complete_rows(out / "metrics.csv")] == ["2", "4", "6"]
    held = []  # after each save: is the replaced last.pt still mapped, its space not yet free?
    real_save = train_cifar.save_checkpoint

    def save_and_look(*args, **kwargs):
        real_save(*args, **kwargs)
        if os.path.exists("/proc/self/maps"):  # Linux
            held.append("last.pt (deleted)" in open("/proc/self/maps").read())
    monkeypatch.setattr(train_cifar, "save_checkpoint", save_and_look)
    train_cifar.main(["--out", str(out), "--resume", "--steps", "8"])  # the limit lifted
    assert_same_training_state(checkpoint(tmp_path / "straight"), checkpoint(out))
    assert not any(held)
    assert [row["step"] for row in complete_rows(out / "metrics.csv")] == ["2", "4", "6", "8"]


def test_a_new_run_the_disk_cannot_hold_says_to_start_again(image_folder, tmp_path):
    """Before any last.pt exists, the advice is to start again, not to resume; and that works."""
    out = tmp_path / "run"
    result = run_cli("train_cifar.py", "--data", image_folder, "--out", str(out), *TINY,
                     "--steps", "2", preexec_fn=limit_file_size(5))  # not even run_id.txt fits
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(ours) == 1 and "Traceback" not in result.stderr
    assert_refused(ours[0], str(out / "run_id.txt"), TOO_LARGE, "start the run again")
    assert os.listdir(out) == ["train.lock"]  # the trainer's lock file, empty
    train(image_folder, out, "--steps", "2")
    assert checkpoint(out)["step"] == 2


def test_a_torch_file_the_disk_cannot_hold_is_one_failed_write(tmp_path):
    """torch.save into a file that hits the limit raises either torch's RuntimeError over the
    OSError, or the OSError itself when the file's last buffer fails again on closing, by where
    the limit falls: each is one WriteFailed naming the file, and leaves no file behind."""
    path = str(tmp_path / "big.pt")
    for limit in range(300_000, 316_000, 2_000):  # 1.2 MB of floats, cut at 8 points
        with file_size_limit(limit), pytest.raises(train_cifar.RunFiles.WriteFailed) as failed:
            train_cifar.RunFiles.write(path, lambda f: torch.save(torch.zeros(300_000), f))
        assert str(failed.value) == f"could not write {path} ({TOO_LARGE})"
        assert os.listdir(tmp_path) == []

    def unrelated(f):  # a bug while writing is not a full disk: it keeps its own traceback
        raise RuntimeError("a bug")
    with pytest.raises(RuntimeError, match="a bug"):
        train_cifar.RunFiles.write(path, unrelated)
    assert os.listdir(tmp_path) == []


def test_a_log_the_disk_cannot_hold_keeps_its_complete_rows(image_folder, tmp_path):
    out = tmp_path / "run"
    train(image_folder, out, *QUIET, "--log-every", "1", "--steps", "2")
    before = (out / "last.pt").read_bytes()
    # room for two rows and a bit, in a process of its own: this one's captured output would not fit
    result = run_cli("train_cifar.py", "--out", str(out), "--resume", "--steps", "50",
                     preexec_fn=limit_file_size(os.path.getsize(out / "metrics.csv") + 150))
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1 and len(ours) == 1 and "Traceback" not in result.stderr
    assert_refused(ours[0], str(out / "metrics.csv"), TOO_LARGE)
    rows = complete_rows(out / "metrics.csv")  # the row that did not fit is not there in part
    assert [int(row["step"]) for row in rows] == list(range(1, len(rows) + 1)) and len(rows) > 2
    assert (out / "last.pt").read_bytes() == before
    train_cifar.main(["--out", str(out), "--resume", "--steps", "5"])
    assert [row["step"] for row in complete_rows(out / "metrics.csv")] == ["1", "2", "3", "4", "5"]


def test_a_full_disk_under_torchrun_stops_every_rank_with_one_line(image_folder, tmp_path):
    out = tmp_path / "run"
    train(image_folder, out, *DDP, "--steps", "4")
    size = os.path.getsize(out / "last.pt")
    result = torchrun("--out", str(out), "--resume", "--steps", "8", "--ckpt-every", "4",
                      "--device", "cpu", preexec_fn=limit_file_size(size // 2), timeout=120)
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and len(ours) == 1, result.stderr[-3000:]
    assert str(out / "last.pt") in ours[0] and TOO_LARGE in ours[0]
    worker_traces = [line for line in result.stderr.splitlines() if "train_cifar.py" in line
                     and line.strip().startswith("File ")]
    assert not worker_traces and "Connection closed" not in result.stderr, result.stderr[-3000:]
    assert checkpoint(out)["step"] == 4 and not list(out.glob("*.tmp"))
    train_cifar.main(["--out", str(out), "--resume", "--steps", "8", "--device", "cpu"])
    assert checkpoint(out)["step"] == 8


def test_sample_outputs_the_disk_cannot_hold_stop_in_one_line(image_folder, tmp_path):
    run = tmp_path / "run"
    train(image_folder, run, "--steps", "2")
    common = ["--ckpt", str(run), "--steps", "1", "--device", "cpu"]
    outputs = {"--npz": (tmp_path / "s.npz", ["--n", "1000"]),  # 192 kB of pixels
               "--grid": (tmp_path / "s.png", ["--n", "480"])}  # 3 rows of 160, at 64 px
    with file_size_limit(50_000):
        for flag, (path, extra) in outputs.items():
            error = run_error([*common, flag, str(path), *extra], sample_script.main)
            assert_refused(error, str(path), TOO_LARGE)
    assert sorted(os.listdir(tmp_path)) == ["images", "run"]  # nothing half-written, no .tmp


def test_a_run_or_an_npz_that_cannot_fit_is_refused_before_any_work(image_folder, tmp_path,
                                                                    monkeypatch):
    """The up-front estimate, against this disk's real free space: a run that would keep 10^12
    snapshots, an npz of 10^11 images."""
    out = tmp_path / "run"
    error = run_error(["--data", image_folder, "--out", str(out), *TINY, "--steps", str(10 ** 12),
                       "--keep-every", "1"])
    assert_refused(error, "--keep-every 0", "--out", "free")
    assert not out.exists()
    train(image_folder, out, "--steps", "2")
    monkeypatch.setattr(sample_script, "generate", lambda *a: pytest.fail("sampled"))
    error = run_error(["--ckpt", str(out), "--npz", str(tmp_path / "s.npz"), "--n", str(10 ** 11),
                       "--device", "cpu"], sample_script.main)
    assert_refused(error, "--npz", "free")


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs: a disk that really fills up (ENOSPC). Needs root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the file-size limit tests cover the rest")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(disk)]).returncode:
        pytest.skip("this machine does not let root mount a tmpfs")
    yield disk
    subprocess.run(["umount", "-l", str(disk)])


def fill(disk) -> "Path":
    """A file that takes every free byte of `disk`."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
    return filler


def test_on_a_small_disk_warn_refuse_and_stop_in_one_line(image_folder, tmp_path, small_disk,
                                                           capsys):
    """On a real 6 MB disk: a run that fills most of it is warned of; on a full disk a resume is
    refused up front; a disk that fills during the run stops it in one line (ENOSPC); once the
    space is freed, --resume goes on from the last good last.pt."""
    train(image_folder, tmp_path / "sizes", "--steps", "1")
    state = checkpoint(tmp_path / "sizes")
    weights = sum(t.nbytes for t in state["ema"].values())  # a snapshot's tensors
    last = weights + sum(t.nbytes for t in state["model"].values()) + sum(
        t.nbytes for moments in state["optimizer"]["state"].values() for t in moments.values()
        if t.dim())
    grid = 3 * 8 * 3 * 66 * 66  # the estimate of one grid: 3 classes x 8, 64 px and a border
    free = shutil.disk_usage(small_disk).free
    steps = int((0.9 * free - 2 * last - grid) / weights)  # a run that fills 90% of the disk
    out = small_disk / "run"
    capsys.readouterr()
    train(image_folder, out, "--steps", str(steps), "--keep-every", "1", "--sample-every",
          "100000", "--probe-every", "0", "--log-every", "1")
    warnings = [line for line in capsys.readouterr().out.splitlines()
                if line.startswith("warning: ")]
    assert len(warnings) == 1 and f"{steps} ema_<step>.pt" in warnings[0], warnings
    for snapshot_file in out.glob("ema_*.pt"):
        snapshot_file.unlink()
    filler = fill(small_disk)
    error = run_error(["--out", str(out), "--resume", "--steps", str(steps + 2)])
    assert_refused(error, "free", "--out")
    filler.unlink()
    cmd = cli("train_cifar.py", "--out", str(out), "--resume", "--steps", "100000",
              "--keep-every", "0", "--ckpt-every", "5", "--sample-every", "100000")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 60  # once it logs, the disk fills; its next write fails
    while time.time() < deadline and len(open(out / "metrics.csv").readlines()) < steps + 4:
        time.sleep(0.05)
    fill(small_disk)
    _, stderr = proc.communicate(timeout=60)
    ours = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and len(ours) == 1 and "Traceback" not in stderr, stderr[-2000:]
    assert os.strerror(errno.ENOSPC) in ours[0]
    assert not list(out.glob("*.tmp"))
    complete_rows(out / "metrics.csv")
    (small_disk / "filler").unlink()
    saved = checkpoint(out)["step"]
    train_cifar.main(["--out", str(out), "--resume", "--steps", str(saved + 2)])
    assert checkpoint(out)["step"] == saved + 2


# ========================================================= 6. the per-block linear probe of a run

def test_train_writes_probe_csv_through_a_resume(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--probe-every", "2", "--sample-every", "100", "--probe-t", "1,0.5"]
    train(image_folder, out, "--steps", "3", *common)
    capsys.readouterr()
    train(image_folder, out, "--steps", "5", "--resume", *common)
    rows = list(csv.DictReader(open(out / "probe.csv")))
    keys = [(int(r["step"]), float(r["t"]), int(r["block"])) for r in rows]
    expected = [(s, t, k) for s in (2, 3, 4, 5) for t in (1.0, 0.5) for k in (1, 2, 3)]
    assert keys == expected  # no duplicates
    assert all(0 <= float(r["accuracy"]) <= 1 for r in rows)
    assert all(-1 <= float(r["teacher_cosine"]) <= 1 + 1e-6 for r in rows)
    assert "--probe-every" in run_error(["--data", image_folder, "--out", str(tmp_path / "y"),
                                         *TINY,
                                         "--probe-every", "-1"])
    assert "--probe-t" in run_error(["--data", image_folder, "--out", str(tmp_path / "y"), *TINY,
                                     "--probe-t", "2"])


def test_probe_a_checkpoint_twice_gives_the_same_numbers(image_folder, tmp_path, capsys):
    train(image_folder, tmp_path / "run", "--steps", "2", "--probe-every", "0")
    assert not (tmp_path / "run" / "probe.csv").exists()
    ckpt = str(tmp_path / "run" / "last.pt")
    capsys.readouterr()
    tables = []
    for i in range(2):
        sample_script.main(["--ckpt", ckpt, "--probe", "--probe-csv", str(tmp_path / f"p{i}.csv"),
                            "--device", "cpu"])
        tables.append(capsys.readouterr().out)
    assert (tmp_path / "p0.csv").read_text() == (tmp_path / "p1.csv").read_text()
    assert tables[0].replace("p0.csv", "p1.csv") == tables[1]
    assert "student  1" in tables[0] and "teacher  2" in tables[0]
    assert len(list(csv.DictReader(open(tmp_path / "p0.csv")))) == 2 * 3  # 2 levels x 3 blocks


def test_probe_fit_subset_of_a_large_folder_spans_every_class(monkeypatch):
    """Past the cap, the fitted images are a seeded sample, not the first classes in file order."""
    monkeypatch.setattr(train_cifar, "PROBE_FIT_IMAGES", 12)
    labels = torch.arange(4).repeat_interleave(10)  # ImageFolder order: class by class
    images = torch.zeros(40, 3, 2, 2, dtype=torch.uint8)
    (fit_x, fit_y), (scored_x, scored_y), _ = train_cifar.probe_split("folder", ".", images, labels)
    assert len(fit_y) == 12 and set(fit_y.tolist()) == {0, 1, 2, 3}
    assert scored_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]  # every 5th image of each class
    assert torch.equal(train_cifar.probe_split("folder", ".", images, labels).fit[1],
                       fit_y)  # deterministic


# ================================================================ 7. sample and compare (sample.py)

def test_sample_writes_grid_and_adm_npz(image_folder, tmp_path):
    train(image_folder, tmp_path / "run", "--steps", "2")
    ckpt = str(tmp_path / "run" / "last.pt")
    npz, grid = str(tmp_path / "s.npz"), str(tmp_path / "g.png")
    sample_script.main(["--ckpt", ckpt, "--n", "7", "--steps", "2", "--batch-size", "4",
                        "--npz", npz, "--device", "cpu"])
    data = np.load(npz)
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (7, 8, 8, 3)
    assert data["arr_1"].tolist() == [0, 1, 2, 0, 1, 2, 0]
    # the grid: one row per class, as in training; by default 8 images per class
    sample_script.main(["--ckpt", ckpt, "--steps", "2", "--grid", grid, "--npz", npz,
                        "--device", "cpu"])
    assert Image.open(grid).size == (8 * 64 + 9 * 2, 3 * 64 + 4 * 2)
    pixels, labels = np.asarray(Image.open(grid)), np.load(npz)["arr_1"]
    # each 8x8 image drawn 8x larger by nearest neighbour: every 8th pixel is the image
    first_row = [pixels[2:66:8, 2 + 66 * i:66 + 66 * i:8] for i in range(8)]
    blocks = [pixels[2:66, 2 + 66 * i:66 + 66 * i] for i in range(8)]
    by_class = np.load(npz)["arr_0"][labels == 0]  # class 0's images, in drawing order
    assert all(np.array_equal(cell, image) for cell, image in zip(first_row, by_class))
    assert all(np.array_equal(block, image.repeat(8, 0).repeat(8, 1))
               for block, image in zip(blocks, by_class))
    assert "a multiple of the 3 classes" in run_error(["--ckpt", ckpt, "--n", "7", "--grid", grid],
                                                      sample_script.main)
    # the same seed gives the same images whatever the batch size; --class-label fixes the class
    sample_script.main(["--ckpt", ckpt, "--n", "7", "--steps", "2", "--batch-size", "7", "--npz",
                        npz,
                        "--device", "cpu"])
    assert np.array_equal(np.load(npz)["arr_0"], data["arr_0"])
    sample_script.main(["--ckpt", ckpt, "--n", "4", "--steps", "2", "--class-label", "2",
                        "--method", "euler",
                        "--cfg-scale", "2", "--npz", npz, "--device", "cpu"])
    assert np.load(npz)["arr_1"].tolist() == [2, 2, 2, 2]
    assert "classes 0..2" in run_error(["--ckpt", ckpt, "--class-label", "3", "--grid", grid],
                                       sample_script.main)


def test_compare_writes_a_figure_or_says_what_to_install(image_folder, tmp_path, monkeypatch,
                                                         capsys):
    common = ["--steps", "4", "--probe-every", "2", "--sample-every", "2", "--log-every", "2"]
    train(image_folder, tmp_path / "base", "--layersync-weight", "0", *common)
    train(image_folder, tmp_path / "sync", *common)
    capsys.readouterr()
    runs = [str(tmp_path / "base"), str(tmp_path / "sync")]
    figure = tmp_path / "compare.png"
    pytest.importorskip("matplotlib")
    sample_script.main(["--compare", *runs, "--figure", str(figure)])
    assert Image.open(figure).size == (2860, 1265)  # 4 panels a row: no FID panel without fid.csv
    table = capsys.readouterr().out
    assert "baseline: 1 seed(s): base (seed 0)" in table
    assert "LayerSync lambda 0.2: 1 seed(s): sync" in table
    assert "t=0.5" in table and "cosine to the teacher block per block" in table
    assert "note: an arm with one seed" in table  # one seed per arm: the spread is unknown
    os.remove(figure)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    message = run_error(["--compare", *runs, "--figure", str(figure)], sample_script.main)
    assert "pip install matplotlib" in message and not figure.exists()
    assert table.startswith(capsys.readouterr().out)  # the same numbers, as text
    assert "not a train_cifar.py run folder" in run_error(["--compare", str(tmp_path)],
                                                          sample_script.main)


def test_compare_groups_seeds_into_arms_with_their_spread(image_folder, tmp_path, capsys):
    """Runs that differ only in --seed are one arm: mean (min..max) over them, for the losses,
    the probe of every block and the cosine to the teacher."""
    common = ["--steps", "4", "--probe-every", "4", "--sample-every", "4", "--log-every", "2"]
    for name, extra in (("b0", ["--layersync-weight", "0"]),
                        ("b1", ["--layersync-weight", "0", "--seed", "1"]),
                        ("s0", []), ("s1", ["--seed", "1"]), ("lr", ["--lr", "3e-4"])):
        train(image_folder, tmp_path / name, *common, *extra)
    capsys.readouterr()
    arms = sample_script.group_into_arms([sample_script.read_run(str(tmp_path / n))
                                          for n in ("b0", "s0", "b1", "s1", "lr")])
    assert [[run.name for run in arm.runs] for arm in arms] == [["b0", "b1"], ["s0", "s1"], ["lr"]]
    assert [arm.label for arm in arms] == ["baseline", "LayerSync lambda 0.2, lr 0.0001",
                                           "LayerSync lambda 0.2, lr 0.0003"]
    table = sample_script.compare_table(arms)
    # the baseline's fm at the last step, over its two seeds, as metrics.csv holds it
    fm = [float(list(csv.DictReader(open(tmp_path / n / "metrics.csv")))[-1]["fm"]) for n in ("b0",
                                                                                              "b1")]
    assert fm[0] != fm[1]
    assert f"{sum(fm) / 2:.4f} ({min(fm):.4f}..{max(fm):.4f})" in table
    # and block 3's probe accuracy at t = 1
    acc = [float(next(r["accuracy"] for r in csv.DictReader(open(tmp_path / n / "probe.csv"))
                      if r["t"] == "1" and r["block"] == "3")) * 100 for n in ("b0", "b1")]
    section = table.split("probe accuracy (%) per block, t=1,")[1].splitlines()
    row = next(line for line in section[2:] if line.split()[0] == "3")
    assert row.split()[1:3] == [f"{sum(acc) / 2:.1f}", f"({min(acc):.1f}..{max(acc):.1f})"]
    # and block 2's relative update at t = 0.5, the measure of collapse beside the cosine
    update = [float(next(r["relative_update"] for r in csv.DictReader(open(tmp_path / n /
                                                                            "probe.csv"))
                         if r["t"] == "0.5" and r["block"] == "2")) for n in ("b0", "b1")]
    section = table.split("relative update ||h_k - h_(k-1)|| / ||h_(k-1)|| per block, t=0.5,")[1]
    row = next(line for line in section.splitlines()[2:] if line.split()[0] == "2")
    spread = f"{sum(update) / 2:.3f} ({min(update):.3f}..{max(update):.3f})"
    assert max(update) > 0 and " ".join(row.split()[1:3]).rstrip("st") == spread
    assert "note: an arm with one seed" in table  # the lr arm
    without_lr = sample_script.compare_table(arms[:2])
    assert "note:" not in without_lr and "2 seed(s)" in without_lr


def test_a_baseline_measures_the_teacher_cosine_of_the_default_pair(image_folder, tmp_path):
    """--layersync-weight 0 still records every block's cosine to the default pair's teacher,
    without a gradient, so its profile compares with LayerSync's."""
    out = tmp_path / "base"
    train(image_folder, out, "--layersync-weight", "0", "--steps", "2", "--probe-every", "2")
    pairs = checkpoint(out)["config"]["layersync_pairs"]
    assert pairs == [list(L.default_layersync_pair(3))] == [[1, 2]]
    rows = list(csv.DictReader(open(out / "probe.csv")))
    assert len(rows) == 2 * 3 and all(r["teacher_cosine"] != "" for r in rows)
    teacher = [float(r["teacher_cosine"]) for r in rows if r["block"] == "2"]
    assert teacher == pytest.approx([1.0, 1.0], abs=1e-5)  # the teacher block against itself


# ================================================================ 7a. FID over training
#
# The real Inception needs its weights (a download) and about a second per image here, so these
# tests go through torch-fidelity's own code with a small registered stand-in: each image's mean
# colour (3 features). FID is then a number checkable by hand.

STAND_IN = "layersync-test-colour-stats"


def colour_stats(images: torch.Tensor) -> torch.Tensor:
    """The stand-in's features of uint8 images (N, 3, H, W): the mean colour, in [0, 1]."""
    return images.double().mean((2, 3)) / 255


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID's formula, by hand: |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    import scipy.linalg
    mu_a, mu_b = a.mean(0).numpy(), b.mean(0).numpy()
    s_a, s_b = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    root = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))


@pytest.fixture
def fid_stand_in(monkeypatch, tmp_path):
    """sample.py's FID with the stand-in extractor, its cache under tmp_path; yields the list of
    batch sizes the extractor saw, to tell a cached reference from a recomputed one."""
    torch_fidelity = pytest.importorskip("torch_fidelity")
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    seen = []

    class ColourStats(FeatureExtractorBase):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **_):
            super().__init__(name, features_list)
            self.register_buffer("mix", torch.eye(3, dtype=torch.float64))
            if feature_extractor_weights_path:  # the file --fid-weights hands over
                self.mix = torch.load(feature_extractor_weights_path, weights_only=True)["mix"]

        def forward(self, x):
            seen.append(len(x))
            return (colour_stats(x) @ self.mix,)

        get_provided_features_list = staticmethod(lambda: ("colour",))
        get_default_feature_layer_for_metric = staticmethod(lambda metric: "colour")
        can_be_compiled = staticmethod(lambda: False)
        get_dummy_input_for_compile = staticmethod(lambda: None)

    FEATURE_EXTRACTORS_REGISTRY.pop(STAND_IN, None)
    torch_fidelity.register_feature_extractor(STAND_IN, ColourStats)
    monkeypatch.setattr(sample_script, "FID_EXTRACTOR", STAND_IN)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    yield seen
    FEATURE_EXTRACTORS_REGISTRY.pop(STAND_IN, None)


def fid_rows(run):
    return list(csv.DictReader(open(os.path.join(run, "fid.csv"))))


def test_keep_every_writes_ema_snapshots_through_a_resume(image_folder, tmp_path):
    out = tmp_path / "run"
    train(image_folder, out, "--steps", "5", "--keep-every", "2")
    assert sorted(p for p in os.listdir(out) if p.startswith("ema_")) == [
        "ema_0000002.pt", "ema_0000004.pt", "ema_0000005.pt"]  # every 2 steps and at the end
    snapshot = torch.load(out / "ema_0000005.pt", weights_only=True)
    assert set(snapshot) == {"ema", "step", "config"} and snapshot["step"] == 5
    assert all(torch.equal(snapshot["ema"][k], checkpoint(out)["ema"][k]) for k in snapshot["ema"])
    assert snapshot["config"] == checkpoint(out)["config"]
    train_cifar.main(["--out", str(out), "--resume", "--steps", "6"])  # --keep-every 2 kept
    assert (out / "ema_0000006.pt").exists() and not (out / "ema_0000003.pt").exists()
    train(image_folder, tmp_path / "none", "--steps", "2", "--keep-every", "0")
    assert not [p for p in os.listdir(tmp_path / "none") if p.startswith("ema_")]
    assert checkpoint(tmp_path / "none")["config"]["flags"]["keep_every"] == 0


def test_fid_of_a_run_appends_a_row_per_snapshot_and_skips_on_rerun(image_folder, tmp_path,
                                                                     fid_stand_in, monkeypatch):
    out = tmp_path / "run"
    train(image_folder, out, "--steps", "4", "--keep-every", "2")
    score = ["--fid", str(out), "--n", "12", "--steps", "2", "--device", "cpu"]
    real_generate, samples = sample_script.generate, []

    def generate(args, loaded, labels, *rest):
        inputs.append((args.seed, labels.tolist()))
        samples.append(real_generate(args, loaded, labels, *rest))
        return samples[-1]
    inputs = []
    monkeypatch.setattr(sample_script, "generate", generate)
    sample_script.main(score)
    rows = fid_rows(out)
    assert list(rows[0]) == ["step", "n", "fid", "method", "steps", "cfg_scale", "seed"]
    assert [(r["step"], r["n"], r["method"], r["steps"], r["seed"]) for r in rows] == [
        ("2", "12", "heun", "2", "0"), ("4", "12", "heun", "2", "0")]
    # the number: Frechet distance of the stand-in's features, samples against the training data
    reference, _, _ = train_cifar.load_data(image_folder, "unused", 8)
    for row, images in zip(rows, samples):
        features = colour_stats(images.permute(0, 3, 1, 2))
        expected = frechet_distance(features, colour_stats(reference))
        assert float(row["fid"]) == pytest.approx(expected, rel=1e-3, abs=1e-4)
    # the same noise seed and labels for every snapshot: only the weights differ
    assert inputs[0] == inputs[1] == (0, [i % 3 for i in range(12)])
    assert not torch.equal(samples[0], samples[1])
    reference_passes = len(fid_stand_in)
    sample_script.main(score)  # a rerun: nothing new, nothing sampled
    assert len(fid_rows(out)) == 2 and len(samples) == 2
    train_cifar.main(["--out", str(out), "--resume", "--steps", "6"])
    sample_script.main(score)  # only the new snapshot, and the reference comes from the cache
    assert [r["step"] for r in fid_rows(out)] == ["2", "4", "6"] and len(samples) == 3
    assert fid_stand_in[reference_passes:] == [12]
    # an interruption while scoring keeps every row written before it
    monkeypatch.setattr(sample_script, "compute_fid", lambda images, options: [][0]
                        if len(samples) == 5 else 1.5)
    with pytest.raises(IndexError):
        sample_script.main([*score[:3], "6", *score[4:]])  # --n 6: new settings, all 3 again
    assert [(r["step"], r["n"]) for r in fid_rows(out)][3:] == [("2", "6")]
    sample_script.main([*score[:3], "6", *score[4:]])
    assert [(r["step"], r["n"]) for r in fid_rows(out)][3:] == [("2", "6"), ("4", "6"), ("6", "6")]


# sample.py in a process of its own, with a stand-in feature extractor that takes a second per
# batch, so that a second scorer starts while the first still scores
SLOW_SCORER = """
import sys, time
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
sys.path.insert(0, sys.argv[1])
import sample

class SlowColourStats(FeatureExtractorBase):
    def __init__(self, name, features_list, **_):
        super().__init__(name, features_list)

    def forward(self, x):
        time.sleep(1)
        return (x.double().mean((2, 3)) / 255,)

    get_provided_features_list = staticmethod(lambda: ("colour",))
    get_default_feature_layer_for_metric = staticmethod(lambda metric: "colour")
    can_be_compiled = staticmethod(lambda: False)
    get_dummy_input_for_compile = staticmethod(lambda: None)

torch_fidelity.register_feature_extractor("slow-colour-stats", SlowColourStats)
sample.FID_EXTRACTOR = "slow-colour-stats"
sample.main(sys.argv[2:])
"""


def test_two_scorers_of_one_run_write_each_step_once(image_folder, tmp_path):
    """Two sample.py --fid on one run, as two real processes: the second is refused in one line
    naming the first, which scores every snapshot, each once."""
    pytest.importorskip("torch_fidelity")
    run = tmp_path / "run"
    train(image_folder, run, "--steps", "8", "--keep-every", "1", "--probe-every", "0")
    (tmp_path / "scorer.py").write_text(SLOW_SCORER)
    cmd = [sys.executable, str(tmp_path / "scorer.py"), HERE, "--fid", str(run), "--n", "9",
           "--steps", "1", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_HOME=str(tmp_path / "torch_home"))
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env)
    deadline = time.time() + 120
    while time.time() < deadline and first.poll() is None and not (
            (run / "fid.csv").exists() and len((run / "fid.csv").read_text().splitlines()) > 1):
        time.sleep(0.05)
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert first.poll() is None, "the first scorer ended before the second started"
    ours = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert second.returncode == 1 and len(ours) == 1 and "Traceback" not in second.stderr
    assert_refused(ours[0], f"--fid {run}", f"pid {first.pid} on ", "another scorer")
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr[-2000:]
    assert [row["step"] for row in fid_rows(run)] == [str(step) for step in range(1, 9)]


def test_a_run_can_be_scored_while_it_trains(image_folder, tmp_path, fid_stand_in):
    """The trainer's lock is not the scorer's: --fid RUN_DIR scores the snapshots of a live run."""
    run = tmp_path / "run"
    common = ["--log-every", "1", "--sample-every", "10000", "--probe-every", "0"]
    train(image_folder, run, "--steps", "4", "--keep-every", "2", *common)
    trainer = start_and_wait_for_rows(cli("train_cifar.py", "--out", str(run), "--resume",
                                          "--steps", "100000", "--keep-every", "0"),
                                      run / "metrics.csv", 6)
    sample_script.main(["--fid", str(run), "--n", "6", "--steps", "1", "--device", "cpu"])
    assert trainer.poll() is None  # it still trains
    trainer.send_signal(signal.SIGTERM)
    trainer.communicate(timeout=60)
    assert [row["step"] for row in fid_rows(run)][:2] == ["2", "4"]


def test_fid_of_a_run_scores_last_pt_where_no_snapshot_has_its_step(image_folder, tmp_path,
                                                                    fid_stand_in):
    out = tmp_path / "run"
    train(image_folder, out, "--steps", "3", "--keep-every", "0")
    sample_script.main(["--fid", str(out), "--n", "6", "--steps", "1", "--device", "cpu"])
    assert [r["step"] for r in fid_rows(out)] == ["3"]
    # one file still prints one number, and writes no row
    sample_script.main(["--fid", str(out / "last.pt"), "--n", "6", "--steps", "1",
                        "--device", "cpu"])
    assert len(fid_rows(out)) == 1


def test_fid_refusals_are_one_line_before_any_sampling(image_folder, tmp_path, fid_stand_in,
                                                       monkeypatch):
    out = tmp_path / "run"
    train(image_folder, out, "--steps", "2", "--keep-every", "2")
    monkeypatch.setattr(sample_script, "generate", lambda *a: pytest.fail("sampled"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()

    class Planted:
        def __reduce__(self):  # loading this with pickle would create a file
            return (open, (str(tmp_path / "planted"), "w"))
    torch.save({"mix": Planted()}, tmp_path / "code.pt")
    torch.save({"mix": torch.eye(3), "note": "text"}, tmp_path / "mixed.pt")
    torch.save([torch.eye(3)], tmp_path / "list.pt")
    before = sorted(os.listdir(tmp_path)), sorted(os.listdir(out))
    for argv, fragments in (
            (["--fid", "empty"], ["--fid empty", "no checkpoint"]),
            (["--fid", str(out), "--fid-weights", "missing.pt"], ["--fid-weights missing.pt",
                                                                   "no such file"]),
            (["--fid", str(out), "--fid-weights", "mixed.pt"], ["--fid-weights mixed.pt"]),
            (["--fid", str(out), "--fid-weights", "list.pt"], ["--fid-weights list.pt"]),
            (["--fid", str(out), "--fid-weights", "code.pt"], ["--fid-weights code.pt"])):
        error = run_error([*argv, "--device", "cpu"], sample_script.main)
        assert error.startswith("error: ") and "\n" not in error, error
        assert all(fragment in error for fragment in fragments), error
    assert not (tmp_path / "planted").exists()  # the unsafe file ran nothing
    # the run's own training data is gone: named, and no data/ folder left behind
    os.rename(image_folder, tmp_path / "moved")
    error = run_error(["--fid", str(out), "--device", "cpu"], sample_script.main)
    assert "\n" not in error and os.path.realpath(image_folder) in error
    assert (sorted(os.listdir(tmp_path)), sorted(os.listdir(out))) == (
        sorted(set(before[0]) - {"images"} | {"moved"}), before[1])
    os.rename(tmp_path / "moved", image_folder)
    # weights that torch-fidelity cannot load, or download offline: the message names --fid-weights
    monkeypatch.setattr(sample_script, "FID_EXTRACTOR", "inception-v3-compat")
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    def offline(*_, **__):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")
    monkeypatch.setattr(inception, "load_state_dict_from_url", offline)
    torch.save({"mix": torch.eye(3)}, tmp_path / "mixed.pt")  # a state dict, not Inception's
    for extra in ([], ["--fid-weights", "mixed.pt"]):
        error = run_error(["--fid", str(out), "--device", "cpu", *extra], sample_script.main)
        assert "\n" not in error and "--fid-weights" in error, error
    assert not (out / "fid.csv").exists()
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as if not installed
    error = run_error(["--fid", str(out), "--device", "cpu"], sample_script.main)
    assert "pip install torch-fidelity" in error and "\n" not in error


def test_fid_weights_reach_the_feature_extractor(image_folder, tmp_path, fid_stand_in,
                                                 monkeypatch):
    """--fid-weights is read safely, then handed to torch-fidelity's extractor: here a feature
    mix that doubles every feature doubles every distance, so FID x 4."""
    out = tmp_path / "run"
    train(image_folder, out, "--steps", "2", "--keep-every", "2")
    torch.save({"mix": 2 * torch.eye(3, dtype=torch.float64)}, tmp_path / "double.pt")
    common = ["--n", "9", "--steps", "1", "--device", "cpu"]
    sample_script.main(["--fid", str(out), *common])
    (out / "fid.csv").rename(tmp_path / "plain.csv")  # the same cache: other weights, other key
    sample_script.main(["--fid", str(out), *common, "--fid-weights", str(tmp_path / "double.pt")])
    plain = float(list(csv.DictReader(open(tmp_path / "plain.csv")))[0]["fid"])
    assert float(fid_rows(out)[0]["fid"]) == pytest.approx(4 * plain, rel=1e-4)


def test_fid_reference_is_cached_by_the_images_content(image_folder, tmp_path, fid_stand_in):
    """Edited images of the same size and count are measured again, not read from the cache."""
    out = tmp_path / "run"
    train(image_folder, out, "--steps", "2", "--keep-every", "2")
    score = ["--fid", str(out), "--n", "6", "--steps", "1", "--device", "cpu"]
    for edit in (False, False, True):
        if edit:  # one image of the folder, a new colour
            Image.new("RGB", (12, 10), (1, 2, 3)).save(os.path.join(image_folder, "class0",
                                                                    "0.png"))
        seen_before = len(fid_stand_in)
        sample_script.main(score)
        os.remove(out / "fid.csv")  # score the snapshot again
        passes = fid_stand_in[seen_before:]  # the 6 samples, then the 24 images if not cached
        assert passes == ([6, 24] if edit or not seen_before else [6]), passes


def test_compare_tables_use_the_last_step_every_seed_reached(image_folder, tmp_path, capsys):
    """Seeds of one arm that ran to different lengths are compared at the last step they share,
    in the losses and in the probe, and the table says so."""
    common = ["--probe-every", "2", "--sample-every", "100", "--log-every", "2"]
    train(image_folder, tmp_path / "s0", *common, "--steps", "4")
    train(image_folder, tmp_path / "s1", *common, "--steps", "6", "--seed", "1")
    capsys.readouterr()
    arms = sample_script.group_into_arms([sample_script.read_run(str(tmp_path / n))
                                          for n in ("s0", "s1")])
    table = sample_script.compare_table(arms)
    metrics = {n: {r["step"]: float(r["fm"]) for r in csv.DictReader(open(tmp_path / n /
                                                                          "metrics.csv"))}
               for n in ("s0", "s1")}
    fm = [metrics["s0"]["4"], metrics["s1"]["4"]]  # step 4, not s1's step 6
    row = next(line for line in table.splitlines() if line.startswith("LayerSync lambda 0.2 "))
    assert row.split()[4:7] == ["4", f"{sum(fm) / 2:.4f}", f"({min(fm):.4f}..{max(fm):.4f})"]
    assert "ran to steps 4, 6" in table
    accuracy = [100 * float(next(r["accuracy"] for r in csv.DictReader(open(tmp_path / n /
                                                                           "probe.csv"))
                                 if (r["step"], r["t"], r["block"]) == ("4", "1", "3")))
                for n in ("s0", "s1")]
    section = table.split("probe accuracy (%) per block, t=1,")[1].splitlines()
    block3 = next(line for line in section[2:] if line.split()[0] == "3")
    assert block3.split()[1] == f"{sum(accuracy) / 2:.1f}"


def test_compare_meets_arms_of_different_lengths_at_their_last_shared_step(image_folder, tmp_path):
    """A baseline of 8 steps and LayerSync of 4: the table compares both at step 4, losses and
    probe, with a note giving each arm's length; the curves keep their full length."""
    common = ["--probe-every", "2", "--sample-every", "100", "--log-every", "2"]
    train(image_folder, tmp_path / "base", *common, "--steps", "8", "--layersync-weight", "0")
    train(image_folder, tmp_path / "ls", *common, "--steps", "4")
    arms = sample_script.group_into_arms([sample_script.read_run(str(tmp_path / n))
                                          for n in ("base", "ls")])
    table = sample_script.compare_table(arms)
    for name, label in (("base", "baseline"), ("ls", "LayerSync lambda 0.2")):
        fm = next(float(r["fm"]) for r in csv.DictReader(open(tmp_path / name / "metrics.csv"))
                  if r["step"] == "4")
        row = next(line for line in table.splitlines() if line.startswith(label + " "))
        assert row[len(label):].split()[:3] == ["1", "4", f"{fm:.4f}"], row
        probe = csv.DictReader(open(tmp_path / name / "probe.csv"))
        accuracy = next(100 * float(r["accuracy"]) for r in probe
                        if (r["step"], r["t"], r["block"]) == ("4", "1", "2"))
        assert arms[["base", "ls"].index(name)].runs[0].curves[("accuracy", 1.0)][2] == accuracy
    assert "baseline ran to steps 8; LayerSync lambda 0.2 ran to steps 4" in table
    assert "at step 4, the last that all of them reached" in table
    assert max(arms[0].runs[0].curves["fm"]) == 8  # the curve over steps keeps its length


def test_a_changed_setting_on_resume_makes_its_own_arm(image_folder, tmp_path, capsys):
    """A --lr changed on resume is accepted and kept in the run's history, in last.pt and every
    later snapshot; --compare shows that run as an arm of its own, named by the change. A run only
    made longer stays in its arm, and of two runs with one seed the longer is kept."""
    common = ["--probe-every", "0", "--sample-every", "100", "--log-every", "2", "--keep-every",
              "2"]
    train(image_folder, tmp_path / "plain", *common, "--steps", "4")
    for name, resumed in (("changed", ["--steps", "4", "--lr", "3e-4"]), ("longer", ["--steps",
                                                                                    "6"])):
        train(image_folder, tmp_path / name, *common, "--steps", "2")
        train_cifar.main(["--out", str(tmp_path / name), "--resume", *resumed])
    history = checkpoint(tmp_path / "changed")["config"]["history"]
    assert history == [{"step": 2, "changes": {"steps": [2, 4], "lr": [1e-4, 3e-4]}}]
    snapshots = [torch.load(tmp_path / "changed" / f"ema_000000{step}.pt", weights_only=True)
                 for step in (2, 4)]
    assert [snapshot["config"]["history"] for snapshot in snapshots] == [[], history]
    capsys.readouterr()
    sample_script.main(["--compare", *(str(tmp_path / n) for n in ("plain", "changed", "longer")),
                        "--figure", str(tmp_path / "compare.png")])
    out = capsys.readouterr().out
    assert "kept longer (step 6), set aside plain (step 4)" in out
    assert "  LayerSync lambda 0.2, lr 0.0001: 1 seed(s): longer (seed 0)" in out
    assert ("  LayerSync lambda 0.2, lr 0.0003, resumed with lr 0.0001 -> 0.0003 at step 2: 1 "
            "seed(s): changed (seed 0)") in out


def constructed_run(folder, template: dict, weight: float, seed: int, fm: list, probe: dict):
    """A run folder whose CSVs the test writes: `template`'s last.pt as this arm and seed, fm at
    steps 10, 20, ..., and probe.csv at the last of them, probe = {block: (accuracy, update)} at
    t = 1."""
    os.makedirs(folder)
    state = copy.deepcopy(template)
    state["config"].update(layersync_weight=weight, seed=seed, run_id=f"w{weight}s{seed}",
                           layersync_pairs=[[1, 3]])
    torch.save(state, folder / "last.pt")
    (folder / "run_id.txt").write_text(f"w{weight}s{seed}\n")
    steps = [10 * (i + 1) for i in range(len(fm))]
    with open(folder / "metrics.csv", "w") as f:
        f.write("step,loss,fm,layersync,grad_norm,img_per_s,elapsed_s\n")
        f.writelines(f"{step},{v},{v},-0.9,1,100,{step}\n" for step, v in zip(steps, fm))
    with open(folder / "probe.csv", "w") as f:
        f.write("step,t,block,accuracy,teacher_cosine,relative_update\n")
        f.writelines(f"{steps[-1]},1,{k},{a},0.9,{u}\n" for k, (a, u) in probe.items())
    return str(folder)


def test_compare_pairs_each_arm_with_the_baseline_seed_by_seed(image_folder, tmp_path):
    """Runs with known gaps: fm higher in every seed (but one seed's gap changes sign over the
    last rows: not steady), the student's probe mixed, the blocks between the pair writing less
    in every seed; LayerSync's seed 3 has no baseline partner."""
    train(image_folder, tmp_path / "template", "--steps", "1", "--keep-every", "0")
    template = checkpoint(tmp_path / "template")
    base_probe = {1: (0.50, 0.3), 2: (0.60, 0.2), 3: (0.70, 0.2)}
    runs = [constructed_run(tmp_path / f"b{s}", template, 0.0, s, [1.0] * 6, base_probe)
            for s in (0, 1, 2)]
    for seed, fm, student, update in ((0, [1.1] * 6, 0.55, 0.1), (1, [1.2] * 6, 0.53, 0.15),
                                      (2, [0.9] * 5 + [1.05], 0.48, 0.05),
                                      (3, [1.3] * 6, 0.9, 0.1)):
        probe = {1: (student, 0.3), 2: (0.60, update), 3: (0.70, 0.2)}
        runs.append(constructed_run(tmp_path / f"s{seed}", template, 0.2, seed, fm, probe))
    arms = sample_script.group_into_arms([sample_script.read_run(run) for run in runs])
    lines = sample_script.compare_table(arms).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(
        "paired gaps, LayerSync lambda 0.2 minus baseline, seeds [0, 1, 2] (left out, without a "
        "partner: [3])"))
    block = itertools.takewhile(lambda line: line.startswith("  "), lines[start + 1:])
    paired = dict(line.strip().split(": ", 1) for line in block)
    assert paired["fm at step 60"] == ("+0.1 +0.2 +0.05; mean +0.1167; same sign in every seed "
                                       "(by chance alone 1 in 4)")
    assert paired["student 1's probe at t=1 (%)"].endswith("+5 +3 -2; mean +2; mixed")
    assert paired["best block's probe at t=1 (%)"] == "+0 +0 +0; mean +0; no gap in any seed"
    assert paired["relative update of blocks 2..2 at t=1"].startswith("-0.1 -0.05 -0.15;")
    assert paired["relative update of blocks 2..2 at t=1"].endswith("same sign in every seed "
                                                                    "(by chance alone 1 in 4)")
    assert paired["fm gap over the last 6 logged steps"] == "not steady, its sign changes in "\
                                                           "seeds [2]"
    # a baseline never probed: no block table at a shared step, the loss still paired
    bare = constructed_run(tmp_path / "bare", template, 0.0, 0, [1.0] * 6, {})
    arms = sample_script.group_into_arms([sample_script.read_run(r) for r in (bare, runs[3])])
    assert "  fm at step 60: +0.1; mean +0.1; one seed: no verdict" in (
        sample_script.compare_table(arms).splitlines())
    assert sample_script.verdict([0.1, 0.2]).endswith("two seeds cannot settle a difference)")
    assert sample_script.verdict([-0.1, -0.2, -0.3]) == ("same sign in every seed (by chance "
                                                         "alone 1 in 4)")


def fid_run(name: str, weight: float, seed: int, fid: dict) -> "sample_script.Run":
    config = {"layersync_weight": weight, "seed": seed, "layersync_pairs": [[1, 2]]}
    return sample_script.Run(name, config, {"fid": fid}, None, {})  # its FID curve alone


def test_speedup_is_read_off_the_mean_fid_curves():
    base = sample_script.Arm("baseline", [fid_run("b0", 0, 0, {10: 50, 20: 40, 40: 30}),
                                          fid_run("b1", 0, 1, {10: 52, 20: 42, 40: 32})], 1, 2)
    # mean 40 at step 10 and 30 at step 20: the baseline's final 31 is crossed at step 19
    fast = sample_script.Arm("LayerSync lambda 0.2", [fid_run("s0", .2, 0, {10: 41, 20: 29}),
                                                      fid_run("s1", .2, 1, {10: 39, 20: 31})], 1, 2)
    slow = sample_script.Arm("LayerSync lambda 0.5", [fid_run("t0", .5, 0, {10: 45, 20: 35})],
                             1, 2)
    early = sample_script.Arm("LayerSync lambda 0.3", [fid_run("e0", .3, 0, {10: 30, 20: 20})],
                              1, 2)
    lines = sample_script.speedup_lines([base, fast, slow, early])
    assert "baseline ends at FID 31.00 at step 40" in lines[0]
    assert lines[1].endswith("reaches the baseline's FID 31.00 at step 19: 2.11x fewer steps")
    assert lines[2].endswith("LayerSync lambda 0.5: not reached within 20 steps")
    assert lines[3].endswith("at step 10: 4.00x fewer steps")
    assert sample_script.speedup_lines([fast, slow]) == []  # no baseline arm, no speed-up
    no_fid = sample_script.Arm("baseline", [fid_run("b", 0, 0, {})], 1, 2)
    assert sample_script.speedup_lines([no_fid, fast]) == []


def test_compare_draws_fid_counts_a_repeated_seed_once(image_folder, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    common = ["--steps", "4", "--probe-every", "0", "--sample-every", "4", "--log-every", "2"]
    for name, extra in (("b0", ["--layersync-weight", "0"]),
                        ("b0again", ["--layersync-weight", "0"]), ("s0", [])):
        train(image_folder, tmp_path / name, *common, *extra)
    for name, fids in (("b0", {2: 9.0, 4: 7.0}), ("s0", {2: 8.0, 4: 6.0})):
        with open(tmp_path / name / "fid.csv", "w") as f:
            f.write("step,n,fid,method,steps,cfg_scale,seed\n")
            f.writelines(f"{step},100,{fid},heun,50,1.0,0\n" for step, fid in fids.items())
            f.write("6,100,5.0,heun,50,1.0,")  # cut by a kill after its last comma: skipped
    with open(tmp_path / "b0" / "metrics.csv", "a") as f:
        f.write("6,0.25,0.2")  # cut mid-row
    capsys.readouterr()
    figure = tmp_path / "compare.png"
    sample_script.main(["--compare", *(str(tmp_path / n) for n in ("b0", "b0again", "s0")),
                        "--figure", str(figure)])
    out = capsys.readouterr().out
    assert "note: b0 and b0again have the same configuration" in out
    assert "kept b0 (step 4), set aside b0again (step 4)" in out  # equal lengths: the first
    assert "baseline: 1 seed(s): b0 (seed 0)" in out
    assert "reaches the baseline's FID 7.00 at step 3: 1.33x fewer steps" in out
    assert Image.open(figure).size == (3575, 1265)  # 5 panels a row: (h), FID, drawn

# ================================================================ 7b. the official weights
#
# Files in the official SiT / LayerSync layout are written here from the known facts of that layout
# (timm's parameter names, a stored pos_embed, a learn_sigma head, train.py's dict with an
# argparse.Namespace), from a SiT of this file, and must load back to the same model.

def official_state_dict(model) -> dict:
    """`model`'s weights as the official SiT code names and shapes them: x_embedder.proj (timm's
    PatchEmbed), y_embedder.embedding_table, mlp.fc1 / mlp.fc2 (timm's Mlp), a frozen pos_embed,
    and a learn_sigma head of 2C channels whose rows run (patch row, patch column, channel), the
    velocity in channels 0..C-1 and a (here random) sigma in C..2C-1 of every patch position."""
    names = {"x_embedder.": "x_embedder.proj.", "y_embedder.table.": "y_embedder.embedding_table.",
             ".mlp.0.": ".mlp.fc1.", ".mlp.2.": ".mlp.fc2."}
    out = {}
    for name, tensor in model.state_dict().items():
        for ours, official in names.items():
            name = name.replace(ours, official)
        out[name] = tensor.clone()
    out["pos_embed"] = model.pos_embed.clone()
    p, c = model.patch_size, model.in_channels
    for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
        velocity = out[key].reshape(p * p, c, *out[key].shape[1:])
        sigma = torch.randn(velocity.shape, generator=torch.Generator().manual_seed(7))
        out[key] = torch.cat([velocity, sigma], dim=1).reshape(p * p * 2 * c, *out[key].shape[1:])
    return out


def latent_sit(seed=0):
    """A small SiT on 4-channel latents of 4x4 (SD-VAE: 32x32 images), 5 classes."""
    return tiny_sit(depth=3, seed=seed, input_size=4, in_channels=4).eval()


def tiny_vae(folder):
    """A random diffusers AutoencoderKL, 32x32x3 <-> 4x4x4, saved as a --vae folder."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4,
                        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=32)
    vae.save_pretrained(folder)
    return str(folder)


def test_official_weights_give_the_same_velocity_and_blocks():
    model = latent_sit()
    official = official_state_dict(model)
    loaded = L.sit_from_official(official, num_heads=4).eval()
    x, y = batch(model, n=3)
    t = torch.rand(3)
    v, hidden = model(x, t, y, return_layers=(1, 2, 3))
    v_loaded, hidden_loaded = loaded(x, t, y, return_layers=(1, 2, 3))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(hidden, hidden_loaded))  # f^k
    # the official head by its own rule: 2C channels per patch, unpatchified, first C kept
    features = {}
    model.final_layer.linear.register_forward_hook(lambda m, i, o: features.update(x=i[0]))
    model(x, t, y)
    out = features["x"] @ official["final_layer.linear.weight"].T + official[
        "final_layer.linear.bias"]
    n, p, c = 3, model.patch_size, model.in_channels
    out = out.reshape(n, 2, 2, p, p, 2 * c)
    out = torch.einsum("nhwpqc->nchpwq", out).reshape(n, 2 * c, 2 * p, 2 * p)
    assert torch.allclose(v_loaded, out[:, :c], atol=1e-5) and torch.allclose(v_loaded, v,
                                                                              atol=1e-5)


def test_official_weights_refuse_what_they_cannot_map():
    official = official_state_dict(latent_sit())
    with pytest.raises(ValueError, match="pass num_heads="):
        L.sit_from_official(official)  # depth 3, width 32: no preset, so no known head count
    for broken, message in (({"pos_embed": official["pos_embed"] + 0.1}, "sin-cos"),
                            ({"blocks.0.attn.proj.bias": None}, "Missing.*blocks.0.attn.proj"),
                            ({"extra.weight": torch.zeros(1)}, "Unexpected.*extra.weight"),
                            ({"t_embedder.mlp.0.bias": torch.zeros(3)}, "size mismatch.*mlp.0")):
        state = {**official, **broken}
        state = {k: v for k, v in state.items() if v is not None}
        with pytest.raises(ValueError, match=message):
            L.sit_from_official(state, num_heads=4)
    # a preset's shape needs no heads: SiT-S/8 on 32x32 latents, 6 heads
    preset = L.SiT_models["SiT-S/8"](input_size=32, in_channels=4, num_classes=3)
    assert L.sit_from_official(official_state_dict(preset)).blocks[0].attn.num_heads == 6


def test_sample_reads_the_three_kinds_of_checkpoint(image_folder, tmp_path):
    """A train_cifar.py run, a bare official state dict and an official train.py dict (model, ema,
    opt, args as a Namespace); the latent models' samples decoded by a --vae folder."""
    import argparse
    vae = tiny_vae(tmp_path / "vae")
    ema, raw = latent_sit(seed=0), latent_sit(seed=1)
    torch.save(official_state_dict(ema), tmp_path / "bare.pt")
    torch.save({"model": official_state_dict(raw), "ema": official_state_dict(ema), "opt": {},
                "args": argparse.Namespace(model="SiT-XL/2", encoder_depth=1,
                                           gt_encoder_depth=3)}, tmp_path / "trainpy.pt")
    images = {}
    for name, extra in (("bare", []), ("trainpy", []), ("trainpy", ["--no-ema"])):
        npz = tmp_path / f"{name}{len(extra)}.npz"
        sample_script.main(["--ckpt", str(tmp_path / f"{name}.pt"), "--vae", vae, "--n", "5",
                            "--steps", "2", "--npz", str(npz), "--device", "cpu",
                            "--num-heads", "4", *extra])
        images[name, len(extra)] = np.load(npz)["arr_0"]
    assert images["bare", 0].shape == (5, 32, 32, 3)  # 4x4 latents, decoded 8x larger
    assert np.array_equal(images["bare", 0], images["trainpy", 0])  # both the EMA's
    assert not np.array_equal(images["trainpy", 0], images["trainpy", 1])
    train(image_folder, tmp_path / "run", "--steps", "2")  # and a run folder reads its last.pt
    grid = tmp_path / "grid.png"
    sample_script.main(["--ckpt", str(tmp_path / "run"), "--steps", "2", "--grid", str(grid),
                        "--device", "cpu"])
    assert Image.open(grid).size == (8 * 64 + 9 * 2, 3 * 64 + 4 * 2)
    # --probe-data probes a run on another folder (here its own images, from another path)
    other = tmp_path / "other_folder"
    os.symlink(image_folder, other)
    sample_script.main(["--ckpt", str(tmp_path / "run"), "--probe", "--probe-data", str(other),
                        "--probe-csv", str(tmp_path / "run_probe.csv"), "--device", "cpu"])
    assert len(list(csv.DictReader(open(tmp_path / "run_probe.csv")))) == 3 * 2
    # the probe of official weights on an image folder, encoded by the VAE
    csv_path = tmp_path / "probe.csv"
    sample_script.main(["--ckpt", str(tmp_path / "trainpy.pt"), "--vae", vae, "--probe",
                        "--probe-data", image_folder, "--probe-csv", str(csv_path),
                        "--device", "cpu", "--num-heads", "4"])
    rows = list(csv.DictReader(open(csv_path)))
    assert len(rows) == 3 * 2 and {r["block"] for r in rows} == {"1", "2", "3"}
    teacher = [float(r["teacher_cosine"]) for r in rows if r["block"] == "3"]
    assert teacher == pytest.approx([1.0, 1.0], abs=1e-5)  # args' pair 1 <- 3


def test_official_pair_beyond_the_depth_falls_back_to_the_default_pair(image_folder, tmp_path,
                                                                       capsys):
    """An official train.py checkpoint whose args name a block the model lacks (the paper's
    --gt-encoder-depth 16 on a 3-block model): the probe takes the default pair, with a note."""
    import argparse
    ema = official_state_dict(latent_sit())
    torch.save({"model": ema, "ema": ema, "opt": {},
                "args": argparse.Namespace(encoder_depth=8, gt_encoder_depth=16)},
               tmp_path / "deep.pt")
    csv_path = tmp_path / "probe.csv"
    sample_script.main(["--ckpt", str(tmp_path / "deep.pt"), "--vae", tiny_vae(tmp_path / "vae"),
                        "--probe", "--probe-data", image_folder, "--probe-csv", str(csv_path),
                        "--device", "cpu", "--num-heads", "4"])
    assert "note:" in capsys.readouterr().out
    teacher = str(L.default_layersync_pair(3)[1])
    cosines = [float(r["teacher_cosine"]) for r in csv.DictReader(open(csv_path))
               if r["block"] == teacher]
    assert cosines == pytest.approx([1.0, 1.0], abs=1e-5)


def test_sample_refuses_files_it_cannot_read_in_one_line(tmp_path, monkeypatch):
    class Planted:
        def __reduce__(self):  # loading this with pickle would create a file
            return (open, (str(tmp_path / "planted"), "w"))
    torch.save({"model": Planted()}, tmp_path / "code.pt")
    torch.save(latent_sit(), tmp_path / "whole.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    (tmp_path / "metrics.csv").write_text("step,loss\n1,0.5\n")
    torch.save(official_state_dict(latent_sit()), tmp_path / "bare.pt")
    (tmp_path / "empty_vae").mkdir()
    out = ["--npz", str(tmp_path / "s.npz"), "--device", "cpu", "--num-heads", "4"]
    for ckpt, extra, message in (
            ("code.pt", [], "open), so it was not loaded"),
            ("whole.pt", [], "save model.state_dict() instead"),
            ("foreign.pt", [], "holds ['weights']: expected a train_cifar.py checkpoint"),
            ("metrics.csv", [], "is not a torch checkpoint"),
            ("bare.pt", ["--vae", str(tmp_path / "no_vae")], "no such folder"),
            ("bare.pt", ["--vae", str(tmp_path / "empty_vae")], "cannot load it"),
            ("bare.pt", ["--fid"], "ADM evaluation suite"),
            ("bare.pt", ["--probe"], "needs --probe-data FOLDER")):
        error = run_error(["--ckpt", str(tmp_path / ckpt), *out, *extra], sample_script.main)
        assert error.startswith("error: ") and "\n" not in error and message in error, error
    assert not (tmp_path / "planted").exists() and not (tmp_path / "s.npz").exists()
    error = run_error(["--ckpt", str(tmp_path / "bare.pt"), *out[:-2]], sample_script.main)
    assert "no SiT preset" in error and "pass --num-heads N" in error  # 32 wide, 3 deep
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    error = run_error(["--ckpt", str(tmp_path / "bare.pt"), *out], sample_script.main)
    assert "pip install diffusers" in error


def test_record_blocks_on_diffusers_dit():
    """The README's table names diffusers' DiT: the term's gradient reaches blocks 1..k only."""
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  out_channels=4, num_layers=4, sample_size=8, patch_size=2,
                                  num_embeds_ada_norm=10, norm_num_groups=4)
    with torch.no_grad():  # adaLN-Zero starts every block as the identity: move off it
        for name, p in model.named_parameters():
            if "norm1.linear" in name or "emb" in name:
                p.normal_(0, 0.1)
    with L.record_blocks(model.transformer_blocks, [2, 4]) as out:
        model(torch.randn(2, 4, 8, 8), timestep=torch.tensor([1, 2]),
              class_labels=torch.tensor([0, 1]))
    L.layersync_loss(out[2], out[4]).backward()
    touched = [any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
               for block in model.transformer_blocks]
    assert touched == [True, True, False, False]


# ================================================================ 8. torchrun (gloo on the CPU)

def test_two_processes_train_like_one_and_resume_exactly(image_folder, tmp_path):
    straight = torchrun("--data", image_folder, "--out", str(tmp_path / "two"), *TINY, *DDP,
                        "--steps", "20")
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert straight.stdout.count("all 2 ranks hold identical weights") == 1  # by hash, said once
    assert sorted(os.listdir(tmp_path / "two")) == ["ema_0000020.pt", "last.pt", "metrics.csv",
                                                    "run_id.txt", "samples_0000020.png",
                                                    "train.lock"]
    two = [r for r in csv.DictReader(open(tmp_path / "two" / "metrics.csv"))]
    assert [int(r["step"]) for r in two] == [4, 8, 12, 16, 20]  # one writer, no duplicate rows
    # 10 steps, then a resume to 20, under 2 processes: bit-identical to 20 straight
    for steps, extra in (("10", []), ("20", ["--resume"])):
        result = torchrun("--data", image_folder, "--out", str(tmp_path / "resumed"), *TINY, *DDP,
                          "--steps", steps, *extra)
        assert result.returncode == 0, result.stderr[-2000:]
    a = checkpoint(tmp_path / "two")
    b = checkpoint(tmp_path / "resumed")
    ranks = a["rng"]["ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["torch"], ranks[1]["torch"])
    assert_same_training_state(a, b)
    # the same global batch in one process: same data, same start, other noise draws
    train(image_folder, tmp_path / "one", "--steps", "20", *DDP)
    one = [r for r in csv.DictReader(open(tmp_path / "one" / "metrics.csv"))]
    print("fm, 1 process:", [r["fm"] for r in one], "2 processes:", [r["fm"] for r in two])
    for r1, r2 in zip(one, two):
        assert abs(float(r1["fm"]) - float(r2["fm"])) < 0.1 * float(r1["fm"]), (r1, r2)
    for curve in (one, two):  # both learned
        assert float(curve[-1]["fm"]) < 0.9 * float(curve[0]["fm"])
    # a resume with another number of processes continues, and says what changes
    # and keeps the run's id and history
    run_id = (tmp_path / "two" / "run_id.txt").read_text().strip()
    single = run_cli("train_cifar.py", "--out", str(tmp_path / "two"), "--steps", "22", "--resume",
                     "--grad-clip", "0.5", "--device", "cpu")
    assert single.returncode == 0 and "written by 2 process(es), this run has 1" in single.stdout
    history = [{"step": 20, "changes": {"steps": [20, 22], "grad_clip": [1.0, 0.5]}}]
    snapshot = torch.load(tmp_path / "two" / "ema_0000022.pt", weights_only=True)
    assert checkpoint(tmp_path / "two")["config"]["history"] == history
    assert snapshot["config"]["history"] == history
    assert checkpoint(tmp_path / "two")["config"]["run_id"] == run_id
    assert snapshot["config"]["run_id"] == run_id
    assert (tmp_path / "two" / "run_id.txt").read_text().strip() == run_id


@pytest.mark.parametrize("flags,message",
                         [(["--batch-size", "7"], "must divide by the 2 processes"),
                                           (["--grad-clip", "-1"], "--grad-clip -1.0")])
def test_bad_input_stops_every_rank_with_one_message(image_folder, tmp_path, flags, message):
    result = torchrun("--data", image_folder, "--out", str(tmp_path / "x"), *TINY, "--steps", "3",
                      *flags,
                      timeout=60)  # a hang would time out
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and len(ours) == 1 and message in ours[0], result.stderr[-2000:]


def test_sigterm_stops_every_rank_together(image_folder, tmp_path):
    """SIGTERM to torchrun reaches every worker; they agree on a step, save once and exit."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "train_cifar.py"), "--data", image_folder, "--out", str(out), *TINY,
           *DDP, "--steps", "100000", "--log-every", "1"]
    _, stderr = terminate_after_two_logged_steps(cmd, out)
    assert stderr.count("interrupted by SIGTERM") == 1 and "--resume" in stderr, stderr[-2000:]
    stopped = checkpoint(out)["step"]
    assert stopped >= 2 and stopped % train_cifar.STOP_CHECK_EVERY == 0  # the agreed step


def test_a_non_finite_loss_on_one_rank_stops_every_rank(image_folder, tmp_path):
    """Rank 1 alone sees a NaN at step 3: both ranks must stop, with one message and no hang."""
    script = tmp_path / "poisoned_train.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {HERE!r})\n"
        "import train_cifar\n"
        "real, calls = train_cifar.training_loss, []\n"
        "def poisoned(*args, **kwargs):\n"
        "    out = real(*args, **kwargs)\n"
        "    calls.append(1)\n"
        "    if len(calls) == 3 and os.environ['RANK'] == '1':\n"
        "        out['loss'] = out['loss'] * float('nan')\n"
        "    return out\n"
        "train_cifar.training_loss = poisoned\n"
        "train_cifar.main()\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), "--data", image_folder, "--out", str(tmp_path / "run"), *TINY, *DDP,
           "--steps", "8", "--ckpt-every", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and len(ours) == 1, result.stderr[-2000:]
    assert "non-finite at step 3" in ours[0]
    assert checkpoint(tmp_path / "run")["step"] == 2  # the last good state


def test_a_refusal_on_one_rank_alone_stops_every_rank_with_its_message(image_folder, tmp_path):
    """Rank 1 alone cannot read the data (say, its download failed): both ranks stop before any
    work, and the user reads rank 1's one-line message, printed once."""
    script = tmp_path / "one_rank_fails.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {HERE!r})\n"
        "import train_cifar\n"
        "real = train_cifar.load_data\n"
        "def load_data(*args):\n"
        "    if os.environ['RANK'] == '1':\n"
        "        train_cifar.fail('rank 1 could not read the data')\n"
        "    return real(*args)\n"
        "train_cifar.load_data = load_data\n"
        "train_cifar.main()\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), "--data", image_folder, "--out", str(tmp_path / "run"), *TINY, *DDP]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    ours = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode != 0 and ours == ["error: rank 1 could not read the data"], \
        result.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_rank_0_alone_downloads_cifar10(tmp_path):
    """A first run under torchrun: rank 0 downloads CIFAR-10 while the others wait, then they read
    its files. A stand-in download (a copy, slowed down) logs each rank that starts one."""
    write_fake_cifar10(tmp_path / "source")
    script = tmp_path / "download_train.py"
    script.write_text(
        "import os, shutil, sys, time\n"
        f"sys.path.insert(0, {HERE!r})\n"
        "import torchvision.datasets.cifar as cifar\n"
        "import train_cifar\n"
        "cifar.check_integrity = lambda *a, **k: True  # the fake files have other md5 sums\n"
        "def download(self):\n"
        "    target = os.path.join(self.root, 'cifar-10-batches-py')\n"
        "    if os.path.isdir(target):\n"
        "        return  # already there, as torchvision's own check would find\n"
        f"    with open({str(tmp_path / 'log')!r}, 'a') as log:\n"
        "        log.write(os.environ['RANK'] + '\\n')\n"
        "    time.sleep(2)\n"
        f"    shutil.copytree({str(tmp_path / 'source' / 'cifar-10-batches-py')!r}, target)\n"
        "cifar.CIFAR10.download = download\n"
        "train_cifar.main()\n")
    tiny = [a if a != "8" else "32" for a in TINY]  # CIFAR-10 is 32x32
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
           *tiny, *DDP, "--steps", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "log").read_text() == "0\n"  # one download, by rank 0
    assert checkpoint(tmp_path / "run")["config"]["classes"][9] == "truck"

# ================================================================ 9. CUDA, and the prepared GPU run
#
# What only a GPU runs: bf16 autocast, torch.compile with inductor, fused AdamW, the CUDA RNG in a
# resume, sampling, the probe and the benchmark on the device. `bash .ci/gpu` runs these first;
# `bash .ci/gpu --dry-run` (tested last) runs its plumbing on the CPU.

# The marker `cuda` selects these tests (bash .ci/gpu runs `pytest -m cuda`). The project keeps no
# pytest.ini to register it in, so pytest's unknown-marker warning is silenced for this name only.
warnings.filterwarnings("ignore", "Unknown pytest.mark.cuda", pytest.PytestUnknownMarkWarning)


def needs_cuda(test):
    """A CUDA test: marked `cuda`, skipped where no CUDA GPU is visible."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(),
                              reason="CUDA test: no CUDA GPU is visible")
    return pytest.mark.cuda(skip(test))
GPU = torch.device("cuda")


def on_gpu(model, n=32):
    """A small SiT and a batch of its inputs, on the GPU."""
    x, y = batch(model, n=n)
    return model.to(GPU), x.to(GPU), y.to(GPU)


def flat_distance(a: list, b: list) -> float:
    """||a - b|| / ||b|| over lists of tensors."""
    a, b = (torch.cat([t.detach().double().flatten() for t in ts]) for ts in (a, b))
    return float((a - b).norm() / b.norm())


@pytest.fixture
def no_tf32():
    """fp32 matrix products in full precision (train_cifar.main turns TF32 on for CUDA runs)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


@needs_cuda
def test_cuda_bf16_step_is_close_to_fp32():
    model, x, y = on_gpu(tiny_sit(depth=4))
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)  # the same noise, t and label drops on the GPU
        with train_cifar.autocast(GPU, precision):
            losses[precision] = L.training_loss(model, x, y, [(1, 3)], 0.2)
    for key in ("fm", "layersync"):  # bf16 rounds each value to 8 bits: 0.4% relative
        assert torch.isfinite(losses["bf16"][key]), key
        assert losses["bf16"][key].item() == pytest.approx(losses["fp32"][key].item(), rel=2e-2)


@needs_cuda
def test_cuda_compiled_step_matches_eager_without_recompiles(tmp_path, monkeypatch, no_tf32):
    """train_cifar's own compiled step (model, LayerSync, AdamW, EMA): after the first step, 29
    more compile nothing new and break no graph, and the losses follow the eager ones."""
    from torch._dynamo.utils import counters
    import torch._inductor.config
    monkeypatch.setattr(torch._inductor.config, "fallback_random", True)  # eager's label drops
    torch._dynamo.reset()
    counters.clear()
    fm, graphs = {}, []
    for flags in (["--no-compile"], []):
        args = train_cifar.parse_args([*TINY, "--device", "cuda", "--precision", "fp32",
                                       "--out", str(tmp_path), *flags])
        parts = train_cifar.build(args, train_cifar.model_config(args, num_classes=3), GPU)
        x, y = torch.randn(8, 3, 8, 8, device=GPU), torch.arange(8, device=GPU) % 3
        fm[args.compile] = []
        for step in range(30):
            losses, _ = train_cifar.train_step(args, parts, x, y, step)  # pair (1, 2), lambda 0.2
            fm[args.compile].append(losses["fm"])
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[30] > 0 and graphs[30] == graphs[-1], graphs  # compiled once, at step 0
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    eager, compiled = (torch.stack(fm[c]).cpu() for c in (False, True))
    assert torch.allclose(compiled, eager, rtol=1e-3), (compiled, eager)


@needs_cuda
def test_cuda_fused_adamw_equals_the_plain_one():
    model, x, y = on_gpu(tiny_sit())
    torch.manual_seed(0)
    L.training_loss(model, x, y, [(1, 3)], 0.2)["loss"].backward()
    updates = []
    for fused in (True, False):
        copied = copy.deepcopy(model)
        for p, q in zip(copied.parameters(), model.parameters()):
            p.grad = q.grad.clone()  # the same gradients for both
        optimizer = torch.optim.AdamW(copied.parameters(), lr=1e-3, weight_decay=0.01, fused=fused)
        for _ in range(3):  # the moments accumulate over three steps
            optimizer.step()
        updates.append([p - q for p, q in zip(copied.parameters(), model.parameters())])
    assert flat_distance(updates[0], updates[1]) < 1e-5


@needs_cuda
def test_cuda_resume_equals_uninterrupted(image_folder, tmp_path):
    """The default GPU path (bf16, compiled): 5 steps + --resume to 10 against 10 straight steps.
    Bit for bit where two straight runs on this GPU agree bit for bit. Where its kernels are not
    deterministic (atomic adds in a backward), within 10x the distance of two straight runs: a
    lost optimizer state or RNG lands orders of magnitude further."""
    common = ["--device", "cuda", "--log-every", "5", "--sample-every", "100",
              "--ckpt-every", "100", "--probe-every", "0"]
    for name in ("straight", "again"):
        train(image_folder, tmp_path / name, "--steps", "10", *common)
    train(image_folder, tmp_path / "resumed", "--steps", "5", *common)
    train(image_folder, tmp_path / "resumed", "--steps", "10", "--resume", *common)
    a, again, b = (checkpoint(tmp_path / name) for name in ("straight", "again", "resumed"))
    assert a["config"]["precision"] == "bf16" and a["step"] == b["step"] == 10
    assert torch.equal(a["rng"]["ranks"][0]["cuda"], b["rng"]["ranks"][0]["cuda"])
    floor = relative_distance(again, a)
    if max(floor.values()) == 0:  # a deterministic GPU: the resume must be exact
        assert_same_training_state(a, b)
    else:
        distance = relative_distance(b, a)
        assert all(distance[k] <= 10 * floor[k] for k in distance), (distance, floor)


@needs_cuda
def test_cuda_run_reports_mfu_and_peak_memory(image_folder, tmp_path, capsys):
    train(image_folder, tmp_path / "run", "--device", "cuda", "--steps", "4", "--log-every", "2")
    printed = capsys.readouterr()
    known = any(key in torch.cuda.get_device_name() for key in train_cifar.PEAK_BF16_FLOPS)
    assert ("MFU" in printed.err) == known and "peak GPU memory" in printed.out


@needs_cuda
def test_cuda_sample_writes_grid_and_npz(image_folder, tmp_path):
    train(image_folder, tmp_path / "run", "--steps", "2", "--device", "cuda")
    npz, grid = tmp_path / "s.npz", tmp_path / "g.png"
    sample_script.main(["--ckpt", str(tmp_path / "run" / "last.pt"), "--n", "6", "--steps", "2",
                        "--npz", str(npz), "--grid", str(grid), "--device", "cuda"])
    assert np.load(npz)["arr_0"].shape == (6, 8, 8, 3) and Image.open(grid).size[0] > 0


@needs_cuda
def test_cuda_probe_in_bf16_agrees_with_fp32(trained_colour_model):
    model = copy.deepcopy(trained_colour_model).to(GPU)
    probes = {}
    for precision in ("fp32", "bf16"):
        with train_cifar.autocast(GPU, precision):
            probes[precision] = probe_colour_model(model)
    for t, blocks in probes["fp32"].accuracy.items():
        for k, accuracy in blocks.items():  # within 5 points at every block and noise level
            assert abs(probes["bf16"].accuracy[t][k] - accuracy) <= 0.05, (t, k)


# ---------------------------------------------------------------- the CUDA paths, on a CPU
# No GPU has run these paths, and on a CPU every tensor shares one device, so a tensor left on the
# CPU goes unseen. torch's fake tensors carry a device but no data: under FakeTensorMode a model
# on "cuda" runs on a CPU-only machine, and a CPU tensor meeting it raises the GPU's own error
# (FakeTensorDeviceMismatchError). Each test below moves the model as train_cifar.build does and
# keeps the callers' tensors where the scripts keep them. Not covered: the backward and AdamW (the
# fake tensors have no gradients to step), what needs a value (.item(), a grid's pixels, an npz),
# the CUDA RNG state of a checkpoint, torch.compile and DDP.

try:  # torch's private API: the tests that use it skip without it
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
except ImportError:
    FakeTensorMode = None


@pytest.fixture
def fake_cuda(monkeypatch):
    """`with fake_cuda():` fake tensors, on device "cuda" on any machine, with bf16 autocast left
    on there (torch turns it off where no GPU is visible: a check of the machine, not the tensors).
    Models are built before it, as real CPU tensors, and moved inside it."""
    if FakeTensorMode is None:
        pytest.skip("this torch has no torch._subclasses.fake_tensor.FakeTensorMode")
    with FakeTensorMode(allow_non_fake_inputs=True):
        try:
            torch.zeros(1).to("cuda")
        except RuntimeError:  # torch 2.4: a fake tensor's move still starts the CUDA driver
            pytest.skip(f"torch {torch.__version__}'s FakeTensorMode needs a CUDA driver to fake "
                        f"a GPU")
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    return lambda: FakeTensorMode(allow_non_fake_inputs=True)


def reaches_item(run) -> str:
    """run() on fake tensors up to the first value it needs; returns the project's line that
    asked for that value."""
    with pytest.raises(DataDependentOutputException) as needed:
        run()
    ours = [entry for entry in needed.traceback
            if entry.path.name in ("layersync.py", "train_cifar.py", "sample.py")]
    return str(ours[-1].statement)


def test_fake_cuda_training_forward_in_bf16_from_the_device_batches(fake_cuda):
    images, labels = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8), torch.arange(16) % 5
    model = tiny_sit()
    with fake_cuda():
        model.to(GPU)  # SiT(**config).to(device), as train_cifar.build
        batches = train_cifar.DeviceBatches(images, labels, 8, seed=0, device=GPU)  # CPU data in
        x, y = batches.next()
        assert x.device.type == y.device.type == "cuda" and x.dtype == torch.float32
        with train_cifar.autocast(GPU, "bf16"):
            velocity = model(x, torch.rand(8, device=GPU), y)
            losses = L.training_loss(model, x, y, [(1, 3)], 0.2)
    assert velocity.dtype == torch.bfloat16  # autocast really ran in bf16
    for key in ("loss", "fm", "layersync"):  # the loss in fp32, on the device
        assert losses[key].dtype == torch.float32 and losses[key].device.type == "cuda", key


def test_fake_cuda_record_blocks_and_the_loss(fake_cuda):
    model = tiny_sit()
    x, y = batch(model)
    with fake_cuda():
        model.to(GPU)
        with train_cifar.autocast(GPU, "bf16"), L.record_blocks(model.blocks, [1, 3]) as out:
            model(x.to(GPU), torch.rand(len(x), device=GPU), y.to(GPU))
        loss = L.layersync_loss(out[1], out[3])
    assert loss.shape == () and loss.dtype == torch.float32 and loss.device.type == "cuda"


def test_fake_cuda_probe_keeps_labels_where_the_caller_has_them(fake_cuda):
    """linear_probe and train_cifar.run_probe, given probe_split's CPU images and labels, run on
    the device up to the accuracy's value; labels left on the CPU raise a device mismatch."""
    model = tiny_sit(num_classes=4).eval()
    images, labels = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8), torch.arange(40) % 4
    data = train_cifar.probe_split("folder", "", images, labels)
    assert data.fit[0].device.type == data.fit[1].device.type == "cpu"
    with fake_cuda():
        model.to(GPU)
        line = reaches_item(lambda: L.linear_probe(model, data.fit, data.scored, [0.5], 3))
        assert ".item()" in line, line
        line = reaches_item(lambda: train_cifar.run_probe(model, data, [1.0], [(1, 3)], "bf16"))
        assert ".item()" in line, line


def test_fake_cuda_sampling_with_guidance_for_grids_and_sample_py(fake_cuda):
    model = tiny_sit().eval()
    noise, labels = torch.randn(6, 3, 8, 8), torch.arange(6) % 5  # on the CPU, as the scripts draw
    args = argparse.Namespace(seed=0, batch_size=4, steps=2, method="heun", cfg_scale=4.0,
                              device=GPU)
    loaded = sample_script.Loaded(model, 10, "bf16", "step 10", 8, [[1, 3]], "cifar10", None)
    with fake_cuda():
        model.to(GPU)
        x = L.sample(L.guided_velocity(model, labels.to(GPU), cfg_scale=4.0), noise.to(GPU), 2)
        assert x.shape == noise.shape and x.device.type == "cuda"
        pixels = train_cifar.sample_pixels(model, noise.to(GPU), labels.to(GPU), 2, "bf16",
                                           cfg_scale=4.0)  # training's grids
        assert pixels.dtype == torch.uint8 and pixels.device.type == "cuda"
        images = sample_script.generate(args, loaded, labels)  # what --grid and --npz write
        assert images.shape == (6, 8, 8, 3) and images.dtype == torch.uint8
        assert images.device.type == "cpu"
        images[labels.argsort(stable=True)]  # --grid orders them by class, on the CPU


def test_fake_cuda_vae_encodes_cpu_images_and_decodes_on_the_device(fake_cuda, tmp_path,
                                                                      monkeypatch):
    diffusers = pytest.importorskip("diffusers", reason="the VAE path needs diffusers")
    vae = diffusers.AutoencoderKL.from_pretrained(tiny_vae(tmp_path / "vae"))  # real, on the CPU
    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", lambda name: vae)
    with fake_cuda():
        encode, decode = sample_script.load_vae(argparse.Namespace(vae=None, device=GPU))
        latents = encode(torch.rand(3, 3, 32, 32) * 2 - 1)  # the probe's images, on the CPU
        assert latents.shape == (3, 4, 4, 4) and latents.device.type == "cpu"
        images = decode(latents.to(GPU))  # sample_pixels decodes the sampler's output
        assert images.shape == (3, 3, 32, 32) and images.device.type == "cuda"


def test_gpu_script_dry_run_measures_and_projects(tmp_path):
    """bash .ci/gpu --dry-run: the prepared GPU run's plumbing at a tiny scale on the CPU. It brings
    back at most 8 small files; its projection is the arithmetic it prints, on the step time of
    the metrics.csv it wrote; its step-time ratio is that of the two times it prints."""
    result = subprocess.run(["bash", os.path.join(HERE, ".ci", "gpu"), "--dry-run", "--out",
                             str(tmp_path)], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHON=sys.executable))
    assert result.returncode == 0, result.stdout[-3000:]
    brought = list(tmp_path.iterdir())
    assert len(brought) <= 8 and all(f.stat().st_size < 16 * 2**20 for f in brought), brought
    summary = (tmp_path / "summary.txt").read_text()
    for name in ("cuda-tests", "stand-in", "default-run", "B2-run", "step-time"):
        assert f"{name}: exit 0" in summary, summary
    assert re.search(r"default-run, TORCH_LOGS=graph_breaks,recompiles: 0 graph breaks, 0 "
                     r"recompiles", summary), summary
    timing = re.search(r"LayerSync / baseline step time: ([\d.]+) over 3 blocks of 4 steps each "
                       r"\(([\d.]+) ms against ([\d.]+) ms", summary)
    ratio, layersync_ms, baseline_ms = (float(n) for n in timing.groups())
    assert ratio == pytest.approx(layersync_ms / baseline_ms, abs=1e-3)
    assert ("skipped" if not torch.cuda.is_available() else "passed") in summary
    rows = list(csv.DictReader(open(tmp_path / "default-run-metrics.csv")))
    per_step = sorted(8 / float(row["img_per_s"]) for row in rows[1:])  # batch 8
    numbers = re.search(r"projected default run: 50,000 steps x ([\d.]+) s \+ (-?[\d.]+) s \+ "
                        r"10 pauses x ([\d.]+) s = (\d+) s", summary)
    step, warm_up, pause, total = (float(n) for n in numbers.groups())
    assert step == pytest.approx((per_step[0] + per_step[-1]) / 2, abs=1e-5)  # median of two
    assert total == pytest.approx(50_000 * step + warm_up + 10 * pause, abs=3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible")
def test_gpu_script_without_a_gpu_stops_at_once(tmp_path):
    """Real mode without CUDA: exit 1 within a minute, saying so, having run nothing."""
    start = time.monotonic()
    result = subprocess.run(["bash", os.path.join(HERE, ".ci", "gpu"), "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, PYTHON=sys.executable))
    assert result.returncode == 1 and time.monotonic() - start < 60
    summary = (tmp_path / "summary.txt").read_text()
    assert "no CUDA device" in summary and "exit" not in summary, summary
    assert os.listdir(tmp_path) == ["summary.txt"]
