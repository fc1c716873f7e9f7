"""LayerSync in one file: the loss, the SiT it regularises, the objective, samplers and a probe.

LayerSync ("Self-aligning Intermediate Layers", Haghighi et al., ICLR 2026) lets a
diffusion/flow transformer teach itself: the per-token features of a shallow block,
the student k, are pulled towards those of a deeper block of the same forward pass,
the teacher k' > k.
No external encoder, no projection head, no extra parameters, no extra forward.

Read top to bottom:
  1. the LayerSync loss (Eq. 2)                       -> layersync_loss, record_blocks
  2. the SiT it regularises (SiT, Ma et al. 2024)     -> SiT, SiT_models, sit_from_official
  3. the flow-matching objective + LayerSync (Eq. 1, 3, Sec. 3.4)
                                                      -> training_loss, default_layersync_pair
  4. ODE samplers and classifier-free guidance        -> sample, guided_velocity
  5. a linear probe of every block (Sec. 3)           -> linear_probe

Time runs as in SiT: t = 0 is noise x0 ~ N(0, I), t = 1 is data x1,
x_t = t * x1 + (1 - t) * x0, and the model predicts the velocity x1 - x0.
"""

import math
import operator
from collections import namedtuple
from contextlib import contextmanager
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------
# 1. The LayerSync loss (Sec. 3, Eq. 2)
# ---------------------------------------------------------------------------

def layersync_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Eq. 2: minus the mean per-token cosine similarity, with a stop-gradient on the teacher.

    student, teacher: (..., D) features of the same tokens from blocks k < k' of one forward
    pass (e.g. (B, N, D) residual streams); Eq. 2 calls them the weak block f^k and the strong
    block f^{k'}. Returns a scalar in [-1, 1]; -1 means aligned.

    What the term trains: blocks 1..k and what feeds them (in a SiT the patch, time and label
    embeddings). Block k' and every block after k get no gradient from it; they learn from the
    main loss alone.

    To use it in another transformer, keep the outputs of two blocks (per token, no pooling,
    no head; record_blocks below takes them without editing the forward) and add the term:

        student, teacher = hidden[k - 1], hidden[k_teacher - 1]  # blocks k < k', (B, N, D)
        loss = loss + lam * layersync_loss(student, teacher)  # Eq. 3, lam = 0.2 in the paper
    """
    if student.shape != teacher.shape:
        raise ValueError(f"layersync_loss: student {tuple(student.shape)} and teacher "
                         f"{tuple(teacher.shape)} must have the same shape (..., D)")
    teacher = teacher.detach()  # Eq. 2: stopgrad(f^{k'}): only blocks 1..k learn from the term
    # fp32 normalisation: the residual stream may arrive in bf16 under autocast
    student, teacher = F.normalize(student.float(), dim=-1), F.normalize(teacher.float(), dim=-1)
    cosine = (student * teacher).sum(dim=-1)  # Eq. 2: cos(f^k[n], f^{k'}[n]) for each token n
    return -cosine.mean()  # Eq. 2: -(1/N) sum_n, then the expectation over the batch


class RecordedBlocks(dict):
    def __missing__(self, k):  # a clear error for a block that has not run
        raise KeyError(f"block {k} has not run inside this record_blocks(...): call the model "
                       f"first (recorded so far: {sorted(self)})")


@contextmanager
def record_blocks(blocks, block_numbers, pick=None):
    """Eq. 2's f^k from a model whose forward you cannot edit, by forward hooks on chosen blocks.

        with record_blocks(model.encoder.layers, [k, k_teacher]) as out:  # numbered from 1, k < k'
            pred = model(x)
        loss = task_loss + lam * layersync_loss(out[k], out[k_teacher])

    blocks: the blocks in forward order (an nn.ModuleList). pick: output -> tensor, for blocks that
    return a tuple or a dataclass (pick=lambda out: out[0]). `out` holds the last forward's
    outputs. The hooks are removed on leaving the `with`, also when the forward raised.
    """
    blocks, asked = list(blocks), list(block_numbers)
    try:  # any integer type (int, numpy, torch), but not a bool or a float
        numbers = [operator.index(k) for k in asked if not isinstance(k, bool)]
    except TypeError:
        numbers = []
    if not asked or len(numbers) < len(asked) or not all(1 <= k <= len(blocks) for k in numbers):
        raise ValueError(f"record_blocks: block numbers {asked} must be integers in "
                         f"1..{len(blocks)} (blocks are numbered from 1, as in the paper)")
    out = RecordedBlocks()

    def recorder(k):
        def hook(module, inputs, output):
            value = pick(output) if pick else output
            if not isinstance(value, torch.Tensor):  # never a loss on the wrong element
                raise TypeError(f"record_blocks: block {k} returned {type(output).__name__}, not a "
                                f"tensor; pass pick=, e.g. pick=lambda out: out[0]")
            out[k] = value  # (B, N, D), autograd graph attached: Eq. 2's f^k
        return hook

    handles = [blocks[k - 1].register_forward_hook(recorder(k)) for k in dict.fromkeys(numbers)]
    try:
        yield out
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------
# 2. The SiT backbone (Ma et al. 2024) that the paper regularises
# ---------------------------------------------------------------------------

def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Fixed 1D sin-cos embedding, (L,) -> (L, dim): [sin, cos] at periods up to 10000."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double()[:, None] * omega[None]  # (L, dim/2)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2D position embedding (MAE/DiT): half the channels encode the column, half the row."""
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], 1)
    return emb.float()  # (T, dim), token order = row-major patches


class TimestepEmbedder(nn.Module):
    """t in [0, 1] (raw, not t*1000) -> 256 frequencies [cos, sin] -> Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]  # (B, 128)
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1))  # (B, D)


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; row `num_classes` is the null class used for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        # like SiT, the null row exists only when labels are dropped in training
        self.table = nn.Embedding(num_classes + (dropout_prob > 0), hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:  # train the unconditional model too (CFG)
            drop = torch.rand(y.shape[0], device=y.device) < self.dropout_prob
            y = torch.where(drop, torch.full_like(y, self.num_classes), y)
        return self.table(y)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample affine of LayerNorm-ed tokens, (B, N, D) with (B, D) shift/scale."""
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)  # fused q, k, v (with bias)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, D/heads)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning on c = t_emb + y_emb."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))  # (B, N, p*p*C)


class SiT(nn.Module):
    """Scalable Interpolant Transformer predicting the velocity v(x_t, t, y)."""

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16,
                 mlp_ratio: float = 4.0, class_dropout_prob: float = 0.1, num_classes: int = 1000):
        super().__init__()
        if min(input_size, patch_size, hidden_size, depth, num_heads) < 1:
            raise ValueError(f"SiT: input_size {input_size}, patch_size {patch_size}, hidden_size "
                             f"{hidden_size}, depth {depth} and num_heads {num_heads} must all "
                             f"be >= 1")
        for size, divisor, what in ((input_size, patch_size, "input_size"),
                                    (hidden_size, num_heads, "hidden_size"),
                                    (hidden_size, 4, "hidden_size")):  # 4: the 2D sin-cos table
            if size % divisor:
                raise ValueError(f"SiT: {what} {size} must be divisible by {divisor}")
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = input_size // patch_size
        self.register_buffer("pos_embed", sincos_2d(hidden_size, grid)[None], persistent=False)
        self.blocks = nn.ModuleList(SiTBlock(hidden_size, num_heads, mlp_ratio)
                                    for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.weight  # patch embedding initialised like the Linear it is
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        for weight in (self.y_embedder.table.weight, self.t_embedder.mlp[0].weight,
                       self.t_embedder.mlp[2].weight):
            nn.init.normal_(weight, std=0.02)
        # adaLN-Zero: every gate, shift and scale starts at 0, so each block is the identity
        # and the zeroed final linear makes the velocity exactly 0 at init.
        for layer in [block.adaLN_modulation[-1] for block in self.blocks] + [
                self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @property
    def has_null_class(self) -> bool:
        """Whether label row `num_classes` exists (trained with label dropout): CFG, the probe."""
        return self.y_embedder.table.num_embeddings > self.num_classes

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, H, W)."""
        p, c = self.patch_size, self.in_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("bhwpqc->bchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_layers=()):
        """x (B, C, H, W), t (B,) in [0, 1], y (B,) labels.

        Returns the velocity (B, C, H, W); with return_layers=(k, ...) (1-indexed blocks)
        returns (velocity, [h_k, ...]), h_k the (B, N, D) residual stream after block k
        (k = 0: the embedded input tokens, before the first block).
        """
        for k in return_layers:
            if not 0 <= k <= len(self.blocks):
                raise ValueError(f"return_layers: block {k} does not exist; "
                                 f"blocks are numbered 1..{len(self.blocks)} (0: the input tokens)")
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, D) conditioning
        hidden = [x]
        for block in self.blocks:
            x = block(x, c)
            hidden.append(x)  # f^k(x_t) of Eq. 2: the residual stream after block k
        velocity = self.unpatchify(self.final_layer(x, c))  # (B, C, H, W)
        return (velocity, [hidden[k] for k in return_layers]) if return_layers else velocity


# depth, hidden size, heads of SiT-S/B/L/XL; patch 2, 4 or 8. Overrides go as keywords:
# SiT_models["SiT-B/2"](input_size=32, in_channels=3, num_classes=10).
SIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
SiT_models = {f"SiT-{size}/{patch}": partial(SiT, depth=d, hidden_size=h, num_heads=n,
                                              patch_size=patch)
              for size, (d, h, n) in SIT_SIZES.items() for patch in (2, 4, 8)}


# The official SiT code (willisma/SiT models.py), which LayerSync's code (vita-epfl/LayerSync) saves
# too, names a few parameters otherwise; everything else is named as here.
OFFICIAL_NAMES = {"x_embedder.proj.": "x_embedder.",  # timm's PatchEmbed wraps the Conv2d
                  "y_embedder.embedding_table.": "y_embedder.table.",
                  ".mlp.fc1.": ".mlp.0.", ".mlp.fc2.": ".mlp.2."}  # timm's Mlp: fc1, GELU, fc2


def sit_from_official(state_dict: dict, num_heads=None) -> "SiT":
    """This file's SiT holding an official SiT or LayerSync state dict (e.g. SiT-XL-2-256x256.pt).

    The shape comes from the tensors; the heads do not, so they are the preset's for that depth
    and width, or `num_heads`. The label table's last row is taken as the null class (official
    default, class_dropout_prob 0.1). The stored position table must equal sincos_2d and is
    dropped. The official head predicts 2C channels (learn_sigma); only the velocity's C are kept.
    """
    if "x_embedder.proj.weight" not in state_dict or "pos_embed" not in state_dict:
        raise ValueError("sit_from_official: not an official SiT state dict (it has no "
                         "x_embedder.proj.weight and pos_embed)")
    hidden, channels, patch, _ = state_dict["x_embedder.proj.weight"].shape  # (D, C, p, p)
    depth = 1 + max(int(name.split(".")[1]) for name in state_dict if name.startswith("blocks."))
    presets = {(d, h): n for d, h, n in SIT_SIZES.values()}
    if (num_heads or presets.get((depth, hidden))) is None:  # a wrong guess: wrong outputs
        raise ValueError(f"sit_from_official: depth {depth}, width {hidden} is no SiT preset, "
                         f"and the weights do not say the number of heads: pass num_heads=")
    model = SiT(input_size=round(state_dict["pos_embed"].shape[1] ** 0.5) * patch,
                patch_size=patch, in_channels=channels, hidden_size=hidden, depth=depth,
                num_heads=num_heads or presets[(depth, hidden)],
                mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden,
                num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1)
    if not torch.allclose(state_dict["pos_embed"].float(), model.pos_embed, atol=1e-5):
        raise ValueError("sit_from_official: the stored pos_embed is not the fixed 2D sin-cos "
                         "table this SiT uses; these weights belong to another model")
    renamed = {name: tensor for name, tensor in state_dict.items() if name != "pos_embed"}
    for official, ours in OFFICIAL_NAMES.items():  # one official name part at a time
        renamed = {name.replace(official, ours): tensor for name, tensor in renamed.items()}
    head = renamed["final_layer.linear.weight"]
    if head.shape[0] == patch * patch * 2 * channels:  # learn_sigma: rows ordered (p, q, 2C)
        velocity_rows = torch.arange(head.shape[0]) % (2 * channels) < channels
        for key in ("final_layer.linear.weight", "final_layer.linear.bias"):
            renamed[key] = renamed[key][velocity_rows]
    try:
        model.load_state_dict(renamed)
    except RuntimeError as error:  # torch names each missing, unexpected or misshapen weight
        raise ValueError(f"sit_from_official: {' '.join(str(error).split())}") from None
    return model


# ---------------------------------------------------------------------------
# 3. Flow matching with LayerSync (Eq. 1 + Eq. 3; layer choice Sec. 3.4)
# ---------------------------------------------------------------------------

def default_layersync_pair(depth: int) -> tuple:
    """The paper's SiT-XL/2 pair, block 8 learns from block 16 of 28 (Sec. 3.4), scaled to `depth`.

    Sec. 3.4: the student must not be one of the very first blocks, the teacher must sit
    before the last ~20% of blocks (the decoder zone), and the two need a real gap.
    8/28 and 16/28 of the depth keep all three from 8 blocks up: 12 -> (3, 7), 24 -> (7, 14).
    From 5 blocks up the student is block 2 or later and the gap at least 2 (5 and 6 -> (2, 4));
    below 5 no pair keeps all three, and the pair is (1, 2).
    """
    if depth < 2:
        raise ValueError(f"LayerSync needs at least 2 blocks (got depth {depth})")
    if depth < 5:
        return 1, 2
    student = max(2, round(depth * 8 / 28))
    return student, max(student + 2, round(depth * 16 / 28))


def check_layersync_pairs(pairs, depth: int) -> list:
    """Validate (k, k') pairs up front: 1 <= k < k' <= depth, else a ValueError saying why."""
    hint = "needs depth >= 2"
    if depth >= 2:
        k, k_teacher = default_layersync_pair(depth)
        hint = f"e.g. {k}:{k_teacher} for a {depth}-block model"
    checked = []
    for pair in pairs:
        try:  # any integer type (int, numpy or torch integers), but not bools or floats
            if len(pair) != 2 or any(isinstance(k, bool) for k in pair):
                raise TypeError
            k, k_teacher = (operator.index(k) for k in pair)
        except TypeError:
            raise ValueError(f"layersync pair {pair!r}: expected two block numbers (k, k'), "
                             f"{hint}") from None
        if not 1 <= k < k_teacher:
            raise ValueError(f"layersync pair ({k}, {k_teacher}): the student block k must be at "
                             f"least 1 and shallower than the teacher block k' (k < k'), {hint}")
        if k_teacher > depth:
            raise ValueError(f"layersync pair ({k}, {k_teacher}): the model has only {depth} "
                             f"blocks (numbered 1..{depth}), {hint}")
        checked.append((k, k_teacher))
    return checked


def training_loss(model: SiT, x1: torch.Tensor, y: torch.Tensor,
                  layersync_pairs=(), layersync_weight: float = 0.0) -> dict:
    """One Monte-Carlo estimate of Eq. 3 = Eq. 1 + lambda * Eq. 2, from a single forward pass.

    Returns scalar tensors: "loss" (Eq. 3), "fm" (Eq. 1), "layersync" (Eq. 2 averaged over the
    pairs; 0 without pairs). With weight 0 the pairs are only measured (no gradient), so the
    update is exactly the plain SiT baseline's. The inputs' traps are refused first (below).
    """
    pairs = check_objective(model, x1, layersync_pairs, layersync_weight)
    x0 = torch.randn_like(x1)                                    # noise, t = 0
    t = torch.rand(x1.shape[0], device=x1.device, dtype=x1.dtype)  # t ~ U[0, 1)
    t_ = t.view(-1, *([1] * (x1.dim() - 1)))
    xt = t_ * x1 + (1 - t_) * x0   # linear interpolant: alpha_t = t, sigma_t = 1 - t
    target = x1 - x0               # Eq. 1: d(alpha_t)/dt * x1 + d(sigma_t)/dt * x0
    layers = sorted({k for pair in pairs for k in pair})
    velocity, hidden = model(xt, t, y, return_layers=layers) if layers else (model(xt, t, y), [])
    fm = (velocity.float() - target.float()).square().mean()    # Eq. 1
    feature = dict(zip(layers, hidden))
    with torch.set_grad_enabled(torch.is_grad_enabled() and layersync_weight != 0):
        # Eq. 2 for every pair, averaged (the public code keeps only the last pair)
        align = [layersync_loss(feature[k], feature[k_teacher]) for k, k_teacher in pairs]
        sync = torch.stack(align).mean() if align else fm.new_zeros(())
    loss = fm + layersync_weight * sync if layersync_weight != 0 else fm  # Eq. 3
    return {"loss": loss, "fm": fm.detach(), "layersync": sync.detach()}


def check_objective(model: SiT, x1: torch.Tensor, pairs, weight: float) -> list:
    """The pairs, checked against the depth; a ValueError for a weight not finite and >= 0, a weight
    without pairs (silently the baseline: the public code's pitfall), an empty batch."""
    depth = len(getattr(model, "module", model).blocks)  # .module: inside DistributedDataParallel
    pairs = check_layersync_pairs(pairs, depth)
    if not (math.isfinite(weight) and weight >= 0):
        raise ValueError(f"training_loss: layersync_weight must be finite and >= 0, got {weight}")
    if weight and not pairs:
        raise ValueError(f"training_loss: layersync_weight {weight} with no layersync_pairs would "
                         f"train the plain baseline; pass [default_layersync_pair({depth})] or 0")
    if x1.shape[0] == 0:
        raise ValueError("training_loss: the batch is empty (x1 has 0 samples)")
    return pairs


# ---------------------------------------------------------------------------
# 4. Sampling: the ODE dx/dt = v(x, t) from t = 0 to 1 (the paper reports FIDs with Heun)
# ---------------------------------------------------------------------------

@torch.no_grad()
def sample(velocity_fn, noise: torch.Tensor, steps: int = 50, method: str = "heun") -> torch.Tensor:
    """Integrate dx/dt = velocity_fn(x, t) from noise (t = 0) to data (t = 1) in equal steps:
    "euler", first order, `steps` evaluations; "heun", the second-order trapezoid predictor-
    corrector behind the paper's FIDs, 2 * `steps` evaluations. velocity_fn gets t as (B,)."""
    if method not in ("euler", "heun"):
        raise ValueError(f"sample: method must be 'euler' or 'heun', got {method!r}")
    if steps < 1:
        raise ValueError(f"sample: steps must be >= 1, got {steps}")
    times = torch.linspace(0, 1, steps + 1, device=noise.device, dtype=noise.dtype)
    x = noise
    for t, t_next in zip(times[:-1], times[1:]):
        dt = t_next - t
        v = velocity_fn(x, t.expand(x.shape[0]))
        if method == "heun":  # average with the slope at Euler's predicted point: trapezoid rule
            v = 0.5 * (v + velocity_fn(x + dt * v, t_next.expand(x.shape[0])))
        x = x + dt * v
    return x


def guided_velocity(model: SiT, y: torch.Tensor, cfg_scale: float = 1.0):
    """Classifier-free guidance: v = v_uncond + w (v_cond - v_uncond), as a velocity_fn(x, t).

    Both halves share one batched forward; the null class is `num_classes`; every channel is
    guided (DiT's code, and SiT's after it, guide 3 of 4, to match DiT). cfg_scale 1: one forward.
    """
    if model.training:
        raise ValueError("guided_velocity: call model.eval() first (training mode drops labels)")
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, y)
    if not model.has_null_class:
        raise ValueError("guided_velocity: this model has no null class (trained with "
                         "class_dropout_prob=0), so it cannot be guided; use cfg_scale=1")
    y_both = torch.cat([y, torch.full_like(y, model.num_classes)])

    def velocity_fn(x, t):
        v_cond, v_uncond = model(torch.cat([x, x]), torch.cat([t, t]), y_both).chunk(2)
        return v_uncond + cfg_scale * (v_cond - v_uncond)
    return velocity_fn


# ---------------------------------------------------------------------------
# 5. Seeing it: a linear probe of every block (Sec. 3)
# ---------------------------------------------------------------------------
# Sec. 3's case is that blocks differ in how semantic their features are and that LayerSync lifts
# the shallow ones; the paper shows it with a per-layer linear probe. This one is closed-form
# (ridge), so it is deterministic and cheap enough to run during training.

# each {t: {block: value}}; relative_update: ||h_k - h_{k-1}|| / ||h_{k-1}||, block k's write
BlockProbe = namedtuple("BlockProbe", "accuracy teacher_cosine relative_update")
BlockFeatures = namedtuple("BlockFeatures", "features teacher_cosine relative_update")


@torch.no_grad()
def block_features(model: SiT, x1: torch.Tensor, t: float, teacher=None, seed: int = 1234,
                   batch_size: int = 250) -> BlockFeatures:
    """Every block's token-averaged residual stream (Eq. 2's f^k, pooled) on x_t, as (depth, N, D).

    x1: (N, C, H, W) images in [-1, 1]; x_t = t x1 + (1 - t) x0 with noise fixed by `seed`. The
    label is always the null class: a class label reaches every block through adaLN, and the
    probe would read the label instead of the representation. Also, as (depth,): each block's mean
    per-token relative update, and with a teacher block each block's mean per-token cosine to it
    (what Eq. 2 maximises for the student).
    """
    if not model.has_null_class:
        raise ValueError("the probe feeds the null class label, and this model has none "
                         "(trained with class_dropout_prob=0)")
    device, generator = model.pos_embed.device, torch.Generator().manual_seed(seed)
    features, cosine, update, tokens = [], 0, 0, 0
    for x1_batch in x1.split(batch_size):
        x1_batch = x1_batch.to(device)
        x0 = torch.randn(x1_batch.shape, generator=generator).to(device)
        t_batch = torch.full((len(x1_batch),), t, device=device)
        y_null = torch.full((len(x1_batch),), model.num_classes, device=device)
        _, hidden = model(t * x1_batch + (1 - t) * x0, t_batch, y_null,
                          return_layers=range(len(model.blocks) + 1))
        hidden = [h.float() for h in hidden]  # (B, N, D) each, h_0 the input tokens
        features.append(torch.stack([h.mean(dim=1) for h in hidden[1:]]))  # (depth, B, D)
        update = update + torch.stack([((h - before).norm(dim=-1) / before.norm(dim=-1)).sum()
                                       for before, h in zip(hidden, hidden[1:])])
        if teacher:
            ref = F.normalize(hidden[teacher], dim=-1)
            cosine = cosine + torch.stack([(F.normalize(h, dim=-1) * ref).sum()
                                           for h in hidden[1:]])
        tokens += hidden[0].shape[0] * hidden[0].shape[1]
    return BlockFeatures(torch.cat(features, dim=1), cosine / tokens if teacher else None,
                         update / tokens)


def ridge_probe_accuracy(fit_x, fit_y, test_x, test_y, num_classes: int,
                         ridge: float = 1e-3) -> float:
    """Top-1 accuracy of ridge regression onto one-hot targets, on standardised features: closed
    form, so deterministic, nothing to tune, one D x D solve."""
    mean, std = fit_x.double().mean(0), fit_x.double().std(0).clamp_min(1e-6)
    x, z = (fit_x.double() - mean) / std, (test_x.double() - mean) / std
    # the labels follow the features: a caller may keep them on the CPU (train_cifar.probe_split)
    targets = F.one_hot(fit_y.to(x.device).long(), num_classes).double()
    prior = targets.mean(0)  # x is centred, so the bias is the class frequency
    gram = x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    weights = torch.linalg.solve(gram, x.T @ (targets - prior))
    predicted = (z @ weights + prior).argmax(dim=1)
    return (predicted == test_y.to(predicted.device)).double().mean().item()


def linear_probe(model: SiT, fit, scored, ts, teacher=None) -> BlockProbe:
    """Probe every block at every noise level t: fit on `fit` = (x1, labels), score on `scored`.

    Returns BlockProbe(accuracy={t: {block: top-1}}, teacher_cosine={t: {block: cosine}} ({} without
    a teacher), relative_update={t: {block: update}}), blocks numbered from 1, the last two measured
    on the fitted images. The scored images get other noise than the fitted ones: shared noise
    would let the probe match noise to labels.
    """
    probe = BlockProbe({}, {}, {})
    for t in ts:
        fitted = block_features(model, fit[0], t, teacher, seed=1234)
        scored_features = block_features(model, scored[0], t, seed=1235).features
        probe.accuracy[t] = {k + 1: ridge_probe_accuracy(fitted.features[k], fit[1],
                                                         scored_features[k], scored[1],
                                                         model.num_classes)
                             for k in range(len(fitted.features))}
        probe.relative_update[t] = {k + 1: float(u) for k, u in enumerate(fitted.relative_update)}
        if teacher:
            probe.teacher_cosine[t] = {k + 1: float(c) for k, c in enumerate(fitted.teacher_cosine)}
    return probe
