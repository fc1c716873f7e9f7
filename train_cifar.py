"""Train a SiT on CIFAR-10 or an image folder with LayerSync; --layersync-weight 0: the baseline.

    python train_cifar.py --out runs/layersync                         # LayerSync, lambda 0.2
    python train_cifar.py --out runs/baseline --layersync-weight 0     # plain SiT
    python train_cifar.py --bench                                      # timing, no dataset needed
    torchrun --standalone --nproc_per_node=8 train_cifar.py ...        # the same, on 8 GPUs (DDP)

A run writes to --out: metrics.csv, probe.csv (a linear probe of every block), samples_<step>.png
(EMA model, fixed noise, one row per class), ema_<step>.pt (EMA snapshots, for FID over training)
and last.pt (model, EMA, optimizer, step, config, RNG states); --resume continues it. Ctrl-C or
SIGTERM saves and stops.

Read in order: the flags, the data, the training step, train(), the checkpoints. To see how
LayerSync is trained, jump to the section "the training step": train_step is one AdamW step on
Eq. 3 (layersync.training_loss), and train() is the loop around it. What a first reading can
skip (torchrun agreement, signals, CSV repair on resume, the benchmark) comes last.
"""

import argparse
import copy
import csv
import math
import os
import pickle
import re
import shutil
import signal
import sys
import time
import zipfile
from collections import namedtuple
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from layersync import (SiT, SiT_models, check_layersync_pairs, default_layersync_pair,
                       guided_velocity, linear_probe, sample, training_loss)

# One process, or several under torchrun: plain facts, set once (as in nanoGPT). Each process trains
# data-parallel on its slice of the same global batch; the master process alone writes files.
ddp_world_size = int(os.environ.get("WORLD_SIZE", 1))
ddp = ddp_world_size > 1
ddp_rank = int(os.environ.get("RANK", 0))
ddp_local_rank = int(os.environ.get("LOCAL_RANK", 0))
master_process = ddp_rank == 0


def fail(message: str):
    """Stop with a one-line message (no traceback): the user has something to fix."""
    raise SystemExit(f"error: {message}")


def say(*args, **kwargs):
    if master_process:
        tqdm.write(" ".join(map(str, args)), **kwargs)


# ------------------------------------------------------------------ command line

def in_range(flag: str, kind, low: float, high: float = math.inf, low_open=False, high_open=False):
    """An argparse type: `kind`(text), refused in one line unless finite and in the range."""
    def parse(text: str):
        value = kind(text)
        inside = (math.isfinite(value) and (value > low if low_open else value >= low)
                  and (value < high if high_open else value <= high))
        if not inside:
            left, right = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
            fail(f"{flag} {value}: must be a finite number in {left}{low}, {high}{right}")
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return parse


def count(flag: str):
    return in_range(flag, int, 1)


def device_arg(text: str) -> torch.device:
    """--device: cpu, cuda or cuda:N; under torchrun, cuda is this process's GPU (LOCAL_RANK)."""
    name = f"cuda:{ddp_local_rank}" if text == "cuda" and ddp else text
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        fail(f"--device {name}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name} but no CUDA GPU is visible; use --device cpu")
    if ddp and text not in ("cpu", "cuda"):
        fail(f"--device {text}: under torchrun give cpu or cuda; each process takes GPU LOCAL_RANK")
    return device


def probe_levels(text: str) -> list:
    """--probe-t: noise levels in [0, 1], comma-separated."""
    try:
        ts = [float(item) for item in text.split(",")]
    except ValueError:
        ts = []
    if not ts or not all(0 <= t <= 1 for t in ts):
        fail(f"--probe-t {text}: give noise levels in [0, 1], comma-separated, e.g. 1.0,0.5")
    return ts


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", default="cifar10",
                   help="'cifar10', 'sklearn-digits' (offline: scikit-learn's 1,797 digits) or a "
                        "folder with one sub-folder per class")
    d.add_argument("--data-dir", default="./data", help="where CIFAR-10 is (or is downloaded to)")
    d.add_argument("--image-size", type=count("--image-size"), default=32,
                   help="image folders are resized and centre-cropped to it")
    d.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flips (right for CIFAR-10; use --no-hflip where left "
                        "and right matter)")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="SiT-S/2", choices=sorted(SiT_models), help="SiT preset")
    m.add_argument("--depth", type=count("--depth"), help="override the preset's number of blocks")
    m.add_argument("--hidden-size", type=count("--hidden-size"), help="override the preset's width")
    m.add_argument("--num-heads", type=count("--num-heads"), help="override the preset's heads")
    m.add_argument("--patch-size", type=count("--patch-size"), help="override the preset's patch")
    s = p.add_argument_group("LayerSync")
    s.add_argument("--layersync-weight", type=in_range("--layersync-weight", float, 0), default=0.2,
                   help="lambda of Eq. 3; 0 = SiT baseline")
    s.add_argument("--layersync-pairs", help="'k:k2,...' 1-indexed blocks, student k < teacher k2 "
                   "(default: 8:16 of 28 scaled to the depth, 3:7 for 12 blocks)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=count("--steps"), default=100_000, help="total optimiser steps")
    o.add_argument("--batch-size", type=count("--batch-size"), default=256)
    o.add_argument("--lr", type=in_range("--lr", float, 0, low_open=True), default=1e-4,
                   help="AdamW learning rate")
    o.add_argument("--weight-decay", type=in_range("--weight-decay", float, 0), default=0.0)
    # 0 turns clipping off (as in nanoGPT); < 0 would flip the gradients
    o.add_argument("--grad-clip", type=in_range("--grad-clip", float, 0), default=1.0,
                   help="max gradient norm; 0 = no clipping")
    o.add_argument("--ema-decay", type=in_range("--ema-decay", float, 0, 1, high_open=True),
                   default=0.9999, help="in [0, 1), reached after a warm-up")
    o.add_argument("--seed", type=int, default=0)
    h = p.add_argument_group("hardware")
    h.add_argument("--device", type=device_arg,
                   default="cuda" if torch.cuda.is_available() else "cpu")
    h.add_argument("--precision", choices=["bf16", "fp32"],
                   help="default: bf16 on CUDA, fp32 on CPU")
    h.add_argument("--no-compile", action="store_true",
                   help="skip torch.compile (it is on by default on CUDA)")
    r = p.add_argument_group("outputs")
    r.add_argument("--out", default="runs/layersync", help="output folder")
    r.add_argument("--resume", action="store_true",
                   help="continue from <out>/last.pt up to --steps")
    r.add_argument("--log-every", type=count("--log-every"), default=100)
    r.add_argument("--sample-every", type=count("--sample-every"), default=10_000)
    r.add_argument("--sample-steps", type=count("--sample-steps"), default=50,
                   help="Heun steps for the sample grids")
    r.add_argument("--ckpt-every", type=count("--ckpt-every"), default=5_000)
    r.add_argument("--keep-every", type=in_range("--keep-every", int, 0), default=10_000,
                   help="keep the EMA weights as <out>/ema_<step>.pt, for sample.py --fid RUN_DIR "
                        "(0 = none)")
    r.add_argument("--probe-every", type=in_range("--probe-every", int, 0),
                   help="linear probe of every block into <out>/probe.csv "
                        "(default: --sample-every; 0 = off)")
    r.add_argument("--probe-t", type=probe_levels, default="1.0,0.5",
                   help="noise levels of the probe, comma-separated (t = 1 is clean data)")
    b = p.add_argument_group("benchmark")
    b.add_argument("--bench", action="store_true",
                   help="time baseline and LayerSync steps on synthetic data")
    b.add_argument("--bench-steps", type=count("--bench-steps"), default=50)
    b.add_argument("--bench-warmup", type=in_range("--bench-warmup", int, 0), default=15)
    if not master_process:  # under torchrun, rank 0 alone reports a bad flag
        p.print_usage = p.print_help = lambda *_, **__: None
        p.exit = lambda status=0, message=None: sys.exit(status)
    args = p.parse_args(argv)
    if args.resume:
        flags_from_checkpoint(p, argv, args)
    args.probe_every = args.sample_every if args.probe_every is None else args.probe_every
    args.precision = args.precision or ("bf16" if args.device.type == "cuda" else "fp32")
    args.compile = args.device.type == "cuda" and not args.no_compile
    check_args(args)
    return args


# what defines a run; its checkpoint keeps them, so that `--out DIR --resume` alone continues it
RUN_FLAGS = ("data", "data_dir", "image_size", "hflip", "model", "depth", "hidden_size",
             "num_heads", "patch_size", "layersync_weight", "layersync_pairs", "steps",
             "batch_size", "lr", "weight_decay", "grad_clip", "ema_decay", "seed", "precision",
             "log_every", "sample_every", "sample_steps", "ckpt_every", "keep_every", "probe_every",
             "probe_t")


def flags_from_checkpoint(parser, argv, args):
    """--resume: every run flag not given on this command line is the checkpoint's. A given one
    stays: it changes a setting, or is refused later if it contradicts the model or the data."""
    path = os.path.join(args.out, "last.pt")
    if not os.path.exists(path):
        return  # prepare() says so
    stored = load_checkpoint(path)["config"].get("flags", {})  # none before they were stored
    for action in parser._actions:  # parse again, keeping only what the command line gave
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(argv))
    for name, value in stored.items():
        if name not in given:
            setattr(args, name, value)


def check_args(args):
    """What no single flag can check, refused in one line before any data is read."""
    if args.batch_size % ddp_world_size:
        fail(f"--batch-size {args.batch_size} is the global batch and must divide by the "
             f"{ddp_world_size} processes; use a multiple of {ddp_world_size}")
    try:  # the model's own shape rules (patch divides image, heads divide width), on meta
        with torch.device("meta"):
            SiT(**model_config(args, num_classes=1))
    except ValueError as error:
        fail(f"--model {args.model} with these overrides cannot be built: {error}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        fail(f"--out {args.out} is a file; give a folder")
    parent = os.path.abspath(args.out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
        fail(f"--out {args.out}: {parent} is not a writable folder")


def parse_pairs(text, depth: int, weight: float) -> list:
    """'3:7,2:9' -> [(3, 7), (2, 9)], validated against the depth (one-line error otherwise)."""
    if depth < 2:  # a 1-block baseline is fine; LayerSync needs a student and a teacher block
        if weight == 0 and text is None:
            return []
        fail(f"LayerSync needs at least 2 blocks (--depth {depth}); use --layersync-weight 0 "
             f"without --layersync-pairs to train a {depth}-block baseline")
    if text is None:
        return [default_layersync_pair(depth)]
    pairs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            k, k_teacher = default_layersync_pair(depth)
            fail(f"--layersync-pairs: cannot read {item.strip()!r}; write student:teacher block "
                 f"numbers, comma-separated, e.g. {k}:{k_teacher}")
        pairs.append((int(parts[0]), int(parts[1])))
    try:
        return check_layersync_pairs(pairs, depth)
    except ValueError as error:
        fail(f"--layersync-pairs: {error}")


OVERRIDES = ("depth", "hidden_size", "num_heads", "patch_size")  # flags that change the preset


def model_config(args, num_classes: int) -> dict:
    """Every SiT keyword of the run: enough to rebuild the model with SiT(**config)."""
    config = dict(SiT_models[args.model].keywords)
    for key in OVERRIDES:
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    config.update(input_size=args.image_size, in_channels=3, num_classes=num_classes)
    return config


def describe_model(args, config: dict) -> str:
    """The model that actually runs: the preset's name, which flags changed it, and its shape."""
    preset = SiT_models[args.model].keywords
    changed = [f"--{k.replace('_', '-')}" for k in OVERRIDES if config[k] != preset[k]]
    changed_by = f" changed by {' '.join(changed)}" if changed else ""
    size = config["input_size"]
    shape = (f"depth {config['depth']}, width {config['hidden_size']}, "
             f"{config['num_heads']} heads, patch {config['patch_size']}, {size}x{size} images")
    return f"{args.model}{changed_by}: {shape}"


def autocast(device: torch.device, precision: str):
    """The one precision rule, for the step, the grids and the probe: bf16 autocast iff bf16."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# ------------------------------------------------------------------ data

def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 -> floats in [-1, 1], the model's data range."""
    return pixels.float() / 127.5 - 1


def to_pixels(x: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] -> uint8 pixels 0..255."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def load_cifar10(data_dir: str, train: bool = True):
    from torchvision.datasets import CIFAR10
    existed = os.path.exists(data_dir)
    try:
        data = CIFAR10(data_dir, train=train, download=True)
    except Exception as error:  # offline, a broken archive, a truncated batch file
        if not existed:  # the failed download made it: a refusal leaves nothing behind
            shutil.rmtree(data_dir, ignore_errors=True)
        fail(f"could not load CIFAR-10 from {os.path.abspath(data_dir)} ({type(error).__name__}: "
             f"{error}). Without internet, download cifar-10-python.tar.gz from "
             f"https://www.cs.toronto.edu/~kriz/cifar.html and put it in that folder (it is "
             f"unpacked on first use), or pass --data PATH for an image folder.")
    images = torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8
    return images, torch.tensor(data.targets), data.classes


def pil_to_rgb8(image, path: str):
    """Any image Pillow opens, as 8-bit RGB. Pillow's own convert("RGB") clips 16-bit values to
    255 (a mid-grey 16-bit PNG turns white), so deep grey levels are rescaled here instead."""
    import numpy as np
    from PIL import Image
    if image.mode.startswith("I"):  # I;16* (16-bit PNG/TIFF) or I (how older Pillows open them)
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            fail(f"{path}: 32-bit integer pixels outside 0..65535; save it as an 8- or 16-bit "
                 f"image")
        image = Image.fromarray(np.round(values / 257.0).astype(np.uint8), "L")  # 65535 -> 255
    elif image.mode == "F":
        fail(f"{path}: floating-point pixels have no fixed range; save it as an 8- or 16-bit image")
    elif image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        # transparent pixels become white, as on a page, not the arbitrary colour hidden under alpha
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def read_image(path: str):
    """ImageFolder's loader: decode fully now, so a corrupt or truncated file is named here."""
    from PIL import Image
    try:
        with Image.open(path) as image:
            image.load()
            return pil_to_rgb8(image, path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        fail(f"cannot read image {path} ({type(error).__name__}: {error}); fix or remove that file")


def load_image_folder(path: str, size: int):
    from torchvision import transforms
    from torchvision.datasets import ImageFolder
    if not os.path.isdir(path):
        fail(f"--data {path}: no such folder; give 'cifar10' or a folder with one sub-folder of "
             f"images per class")
    resize = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size),
                                 transforms.PILToTensor()])
    try:  # an empty folder or one without class sub-folders
        data = ImageFolder(path, transform=resize, loader=read_image)
    except (OSError, ValueError) as error:
        fail(f"--data {path}: {str(error).rstrip('.')}; it needs one sub-folder per class with "
             f"images in it")
    decoded = tqdm(data, desc="decoding images", leave=False, disable=not master_process)
    images = torch.stack([image for image, _ in decoded])
    return images, torch.tensor(data.targets), data.classes


def load_digits(size: int):
    """scikit-learn's 1,797 handwritten 8x8 digits (UCI; shipped with the package, so offline),
    grey levels 0..16 scaled to 0..255, resized to `size`, as RGB."""
    try:
        from sklearn.datasets import load_digits as digits_of_sklearn
    except ImportError:
        fail("--data sklearn-digits needs the optional extra scikit-learn: "
             "pip install scikit-learn")
    digits = digits_of_sklearn()
    grey = torch.from_numpy(digits.images).float()[:, None] * (255 / 16)  # (N, 1, 8, 8)
    grey = torch.nn.functional.interpolate(grey, size=(size, size), mode="bilinear")
    images = grey.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return images, torch.from_numpy(digits.target), [str(d) for d in range(10)]


BUILT_IN_DATA = ("cifar10", "sklearn-digits")


def load_data(data: str, data_dir: str, image_size: int):
    """(uint8 images (N, 3, H, W), labels, class names) of a built-in dataset or an image folder."""
    if data == "cifar10":
        if image_size != 32:
            fail("CIFAR-10 images are 32x32: drop --image-size or set it to 32")
        return load_cifar10(data_dir)
    if data == "sklearn-digits":
        return load_digits(image_size)
    return load_image_folder(data, image_size)


class DeviceBatches:
    """The whole dataset as uint8 on the device; shuffles and flips there, no loader workers.

    CIFAR-10 is 150 MB as uint8, so it fits on any GPU, and gathering a batch there costs
    microseconds. Epoch order and flips come from a CPU generator whose state is checkpointed.
    Every process draws the same global batch and keeps its own slice of it, so the data order
    is the same for any number of processes.
    """

    def __init__(self, images, labels, batch_size: int, seed: int, device, hflip: bool = True):
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch_size, self.device, self.hflip = batch_size, device, hflip
        self.generator = torch.Generator().manual_seed(seed)
        self.new_epoch()

    def new_epoch(self):
        self.epoch_start = self.generator.get_state()  # enough to redraw this epoch on resume
        n = len(self.images)
        self.order = torch.randperm(n, generator=self.generator).to(self.device)
        # the coins are drawn even without flips, so --no-hflip keeps the same image order
        coins = torch.rand(n, generator=self.generator) < 0.5
        self.flip = (coins & self.hflip).to(self.device)
        self.position = 0

    def next(self):
        if self.position + self.batch_size > len(self.order):
            self.new_epoch()  # drop the last partial batch of each epoch
        share = self.batch_size // ddp_world_size  # this process's slice of the global batch
        start = self.position + ddp_rank * share
        window = slice(start, start + share)
        self.position += self.batch_size
        index = self.order[window]
        x = self.images[index]
        x = torch.where(self.flip[window, None, None, None], x.flip(-1), x)  # horizontal flips
        return to_unit(x), self.labels[index]

    def state_dict(self):
        return {"epoch_start": self.epoch_start, "position": self.position}

    def load_state_dict(self, state):
        self.generator.set_state(state["epoch_start"])
        self.new_epoch()
        self.position = state["position"]


# The probe's data side (the model side is layersync.linear_probe): which real images the
# classifier fits, and which it is scored on. It differs from the paper's protocol (Tiny-ImageNet,
# trained probes on SiT-XL/2): a closed-form probe on this run's own dataset, during training.

PROBE_FIT_IMAGES = 10_000
PROBE_SEED = 1234  # the fitted subset: the same for every run, apart from --seed
ProbeData = namedtuple("ProbeData", "fit scored description")  # fit, scored: (x1, labels)


def probe_split(data: str, data_dir: str, images, labels, to_input=to_unit) -> ProbeData:
    """On the CPU. CIFAR-10: a fixed 10,000-image subset of the training split fits, the
    10,000-image test split scores. An image folder: every 5th image of each class (in file-name
    order) scores, the rest (at most 10,000) fit; the generator still trains on all of them.
    to_input: uint8 images -> what the model reads (pixels in [-1, 1], or a VAE's latents)."""
    if data == "cifar10":
        scored, scored_labels, _ = load_cifar10(data_dir, train=False)
        seeded = torch.Generator().manual_seed(PROBE_SEED)
        pick = torch.randperm(len(images), generator=seeded)[:PROBE_FIT_IMAGES]
        return ProbeData((to_input(images[pick]), labels[pick]), (to_input(scored), scored_labels),
                         "fit on 10,000 training images, scored on the test split")
    held = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        held[(labels == c).nonzero().flatten()[4::5]] = True
    if not held.any() or held.all():
        fail("the probe needs a class with at least 5 images (every 5th image of a class is held "
             "out to score the probe); add images or pass --probe-every 0")
    fit = (~held).nonzero().flatten()
    if len(fit) > PROBE_FIT_IMAGES:  # a seeded sample, not the first classes in file order
        pick = torch.randperm(len(fit), generator=torch.Generator().manual_seed(PROBE_SEED))
        fit = fit[pick[:PROBE_FIT_IMAGES].sort().values]
    scored = f"every 5th image of each class ({int(held.sum())})"
    return ProbeData((to_input(images[fit]), labels[fit]),
                     (to_input(images[held]), labels[held]),
                     f"fit on {len(fit)} images, scored on {scored}")


def probe_data(config: dict, data_dir: str) -> ProbeData:
    """The probe images of a run, from its checkpoint config (for sample.py --probe)."""
    images, labels, _ = load_data(config["data"], data_dir, config["model"]["input_size"])
    return probe_split(config["data"], data_dir, images, labels)


def run_probe(model: SiT, data: ProbeData, ts: list, pairs: list, precision: str):
    """layersync.linear_probe on the run's probe images, at the run's precision; the cosines are
    measured against the first pair's teacher block (also in a baseline, without a gradient)."""
    teacher = pairs[0][1] if pairs else None
    with autocast(model.pos_embed.device, precision):
        return linear_probe(model, data.fit, data.scored, ts, teacher)


def probe_summary(probe, pairs: list) -> str:
    """One line per noise level: the best block, and the LayerSync student and teacher blocks."""
    parts = []
    for t, accuracy in probe.accuracy.items():
        best = max(accuracy, key=accuracy.get)
        text = f"t={t:g}: best block {best} {100 * accuracy[best]:.1f}%"
        for role, k in zip(("student", "teacher"), pairs[0] if pairs else ()):
            text += f", {role} {k} {100 * accuracy[k]:.1f}%"
        parts.append(text)
    return "; ".join(parts)


# ------------------------------------------------------------------ the training step

@torch.no_grad()
def update_ema(ema_params, params, step: int, max_decay: float):
    # warm-up: decay (1 + step) / (10 + step), so that short runs still get a usable EMA
    decay = min(max_decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(ema_params, params, 1 - decay)


def train_step(args, parts, x, y, step: int, pairs: list, weight: float):
    """One AdamW step on Eq. 3, then the EMA. No host sync: what it returns stays on the device."""
    with autocast(x.device, args.precision):
        losses = training_loss(parts.forward, x, y, pairs, weight)
    parts.optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    params = parts.optimizer.param_groups[0]["params"]  # the model's parameters, listed once
    # --grad-clip 0: no clipping, but the norm is still measured for metrics.csv
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or math.inf)
    parts.optimizer.step()
    update_ema(parts.ema_params, params, step, args.ema_decay)
    return losses, grad_norm


Parts = namedtuple("Parts", "model ema optimizer forward ema_params")


def build(args, config: dict, device, data_parallel: bool = True) -> Parts:
    """The SiT, its EMA, AdamW, and `forward`: the model as the step calls it (DDP, compiled)."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = SiT(**config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # per rank, identical on every rank
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    forward = model
    if data_parallel and ddp:  # gradients all-reduced in buckets during the backward
        device_ids = [device.index] if device.type == "cuda" else None
        forward = DistributedDataParallel(model, device_ids=device_ids)
    if args.compile:
        forward = torch.compile(forward)  # compiled around DDP, so they overlap
    torch.manual_seed(stream_seed(args.seed, ddp_rank))  # then each rank its own noise and t
    return Parts(model, ema, optimizer, forward, list(ema.parameters()))


GridInputs = namedtuple("GridInputs", "noise labels columns")


def grid_inputs(config: dict, device, columns: int = 8) -> GridInputs:
    """The same noise and labels at every step of every run (seeded apart from --seed)."""
    rows = min(config["num_classes"], 20)
    size, channels = config["input_size"], config["in_channels"]
    seeded = torch.Generator().manual_seed(2026)
    noise = torch.randn(rows * columns, channels, size, size, generator=seeded)
    labels = torch.arange(rows).repeat_interleave(columns)
    return GridInputs(noise.to(device), labels.to(device), columns)


def save_grid(pixels: torch.Tensor, path: str, columns: int):
    """uint8 images (N, 3, H, W) as one PNG/JPEG grid, `columns` to a row; images under 64 pixels
    are enlarged (nearest neighbour), so that a sample can be judged by eye."""
    from PIL import Image
    from torchvision.utils import make_grid
    scale = max(1, 64 // pixels.shape[-1])
    pixels = pixels.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    Image.fromarray(make_grid(pixels.cpu(), nrow=columns).permute(1, 2, 0).numpy()).save(path)


def sample_grid(ema, grid: GridInputs, path: str, steps: int, precision: str):
    with autocast(grid.noise.device, precision):
        images = sample(guided_velocity(ema, grid.labels), grid.noise, steps=steps, method="heun")
    save_grid(to_pixels(images), path, grid.columns)  # one row per class


# ------------------------------------------------------------------ training

def train(args):
    depth = args.depth or SiT_models[args.model].keywords["depth"]
    pairs = parse_pairs(args.layersync_pairs, depth, args.layersync_weight)  # before any work
    run = agreed(prepare, args, pairs)
    if run is None:
        return
    device, ckpt_path = args.device, os.path.join(args.out, "last.pt")
    parts = build(args, run.config["model"], device)
    batches = DeviceBatches(run.images, run.labels, args.batch_size, args.seed, device, args.hflip)
    step = resume(run.checkpoint, parts, batches, args) if run.checkpoint else 0
    say(describe_run(args, run, parts.model, pairs))
    metrics = CsvLog(os.path.join(args.out, "metrics.csv"), METRICS_FIELDS, step)
    probes = run.probe_data and CsvLog(os.path.join(args.out, "probe.csv"), PROBE_FIELDS, step)
    grid = grid_inputs(run.config["model"], device)
    non_finite = NonFiniteWatch(device, ckpt_path)
    signals, stop_signal = StopSignals(), 0
    totals = torch.zeros(4, device=device)  # loss, fm, layersync, grad norm since the last log
    last_log_step, last_log_time, start = step, time.perf_counter(), time.perf_counter()
    bar = tqdm(total=args.steps, initial=step, dynamic_ncols=True, disable=not master_process)

    def due(every: int) -> bool:
        return step % every == 0 or step == args.steps

    try:
        while step < args.steps:
            x, y = batches.next()
            losses, grad_norm = train_step(args, parts, x, y, step, pairs, args.layersync_weight)
            step += 1
            non_finite.record(losses["loss"], step)
            totals += torch.stack([losses["loss"].detach(), losses["fm"], losses["layersync"],
                                   grad_norm])
            bar.update(1)
            # log the mean losses since the last log (the only host sync, once per log)
            if due(args.log_every):
                non_finite.check()
                mean = (all_ranks_mean(totals) / (step - last_log_step)).tolist()
                now = time.perf_counter()
                images_per_s = args.batch_size * (step - last_log_step) / (now - last_log_time)
                row = dict(zip(METRICS_FIELDS, [step, *mean, images_per_s, now - start]))
                metrics.write([row])
                # Eq. 3 spelled out: the total is fm + lambda * (-cosine), so it can go below 0
                lam = args.layersync_weight
                fm, sync = f"fm {mean[1]:.4f}", f"layersync {mean[2]:.3f}"
                terms = f"{fm} + {lam:g} x {sync} = {mean[0]:.4f}" if lam else f"{fm}, {sync}"
                bar.set_postfix_str(f"{terms}, {images_per_s:.0f} img/s")
                totals.zero_()
                last_log_step, last_log_time = step, now
            pause = time.perf_counter()
            stop_signal = signals.agreed(step, args.steps)  # every rank stops at the same step
            # the checkpoint first: nothing that follows it can lose the run
            if due(args.ckpt_every) or stop_signal:
                non_finite.check()
                save(ckpt_path, parts, step, run.config, batches)
            # an EMA snapshot kept for good: FID over training (sample.py --fid RUN_DIR)
            if args.keep_every and due(args.keep_every):
                save(os.path.join(args.out, f"ema_{step:07d}.pt"), parts, step, run.config)
            # a grid of EMA samples, the same noise and labels every time
            if due(args.sample_every):
                non_finite.check()
                path = os.path.join(args.out, f"samples_{step:07d}.png")
                try:
                    if master_process:
                        sample_grid(parts.ema, grid, path, args.sample_steps, args.precision)
                except OSError as error:  # a grid is worth a warning, never the run
                    say(f"warning: could not write {path} ({error})")
            # the linear probe of every block of the EMA model (rank 0 only)
            if probes and master_process and due(args.probe_every):
                probe = run_probe(parts.ema, run.probe_data, args.probe_t, pairs, args.precision)
                probes.write(probe_rows(step, probe))
                say(f"probe at step {step}: {probe_summary(probe, pairs)}")
            last_log_time += time.perf_counter() - pause  # img_per_s counts training time only
            if stop_signal:
                break
    finally:
        bar.close()
        for log in (metrics, probes):
            if log:
                log.close()
        signals.restore()
    if stop_signal:
        name = signal.Signals(stop_signal).name
        say(f"interrupted by {name}: saved step {step} of {args.steps} to {ckpt_path}; rerun the "
            f"same command with --resume to continue", file=sys.stderr)
        raise SystemExit(128 + stop_signal)  # the shell's code for "killed by this signal"
    check_ranks_agree(parts.model)


def prepare(args, pairs):
    """Everything that can refuse the run, before the model is built; None: nothing to do."""
    ckpt_path = os.path.join(args.out, "last.pt")
    checkpoint = None
    if args.resume:
        checkpoint = load_checkpoint(ckpt_path)
        if checkpoint["step"] >= args.steps:
            say(f"{ckpt_path} is at step {checkpoint['step']} >= --steps {args.steps}: "
                f"nothing to do")
            return None
    elif os.path.exists(ckpt_path):
        fail(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    images, labels, classes = load_data(args.data, args.data_dir, args.image_size)
    if len(images) < args.batch_size:  # before --out is made
        fail(f"the dataset has {len(images)} images, fewer than --batch-size {args.batch_size}")
    probe = probe_split(args.data, args.data_dir, images, labels) if args.probe_every else None
    config = {"model": model_config(args, len(classes)), "data": data_identity(args.data),
              "classes": list(classes), "hflip": args.hflip,
              "layersync_pairs": [list(p) for p in pairs],
              "layersync_weight": args.layersync_weight, "batch_size": args.batch_size,
              "lr": args.lr, "weight_decay": args.weight_decay, "grad_clip": args.grad_clip,
              "ema_decay": args.ema_decay, "seed": args.seed, "precision": args.precision,
              "flags": {name: getattr(args, name) for name in RUN_FLAGS}}
    config["flags"].update(data=data_identity(args.data), data_dir=os.path.abspath(args.data_dir))
    if checkpoint is not None:  # before building anything: a mismatch costs no time
        checkpoint["config"]["data"] = data_identity(checkpoint["config"]["data"])
        check_resume_config(checkpoint["config"], config, ckpt_path)
    if master_process:
        os.makedirs(args.out, exist_ok=True)
    return SimpleNamespace(checkpoint=checkpoint, images=images, labels=labels, classes=classes,
                           probe_data=probe, config=config)


def data_identity(data: str) -> str:
    """A built-in name, or the folder's resolved path: ./imgs and /home/me/imgs are one folder."""
    return data if data in BUILT_IN_DATA else os.path.realpath(data)


def describe_run(args, run, model, pairs: list) -> str:
    parameters = sum(p.numel() for p in model.parameters())
    weight = args.layersync_weight
    strength = "off (baseline)" if weight == 0 else f"lambda {weight}"
    layersync = f"LayerSync {strength}, pairs {pairs}"
    data = (f"{len(run.images)} images in {len(run.classes)} classes, "
            f"flips {'on' if args.hflip else 'off'}")
    processes = f", {ddp_world_size} processes" if ddp else ""
    return (f"{describe_model(args, run.config['model'])}, {parameters:,} parameters; {layersync}; "
            f"{data}; {args.device.type} {args.precision}{processes}")


# ------------------------------------------------------------------ checkpoints

CHECKPOINT_KEYS = {"model", "ema", "optimizer", "step", "config", "rng"}
SNAPSHOT_KEYS = {"ema", "step", "config"}


def save(path: str, parts: Parts, step: int, config: dict, batches=None):
    """The whole training state, or without `batches` an EMA snapshot (ema, step, config), written
    by rank 0; a failed write stops every rank, in one line."""
    state = {"ema": parts.ema.state_dict(), "step": step, "config": config}
    if batches is not None:
        state.update(model=parts.model.state_dict(), optimizer=parts.optimizer.state_dict(),
                     rng=rng_state(batches))
    error = None
    if master_process:
        try:
            save_checkpoint(path, state)
        except OSError as problem:  # a full disk, a quota, a vanished mount
            error = (f"error: could not write {path} at step {step} ({problem}); the previous "
                     f"checkpoint there is intact. Free some space and rerun with --resume.")
    agree(error)


def save_checkpoint(path: str, state: dict):
    """Write to a temporary file, then rename: a kill during saving never breaks `path`."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_torch_file(path: str):
    """torch.load(path) as data, never as code, or one line saying what the file is instead. A
    folder reads its last.pt. argparse.Namespace (plain values) is allowed: the official SiT and
    LayerSync train.py store their flags in one."""
    path = os.path.join(path, "last.pt") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}")
    if not zipfile.is_zipfile(path):  # a CSV, a PNG: torch's own message would say to re-save it
        fail(f"{path} is not a torch checkpoint (torch.save writes a zip archive)")
    try:  # weights_only: the file is data; mmap: under torchrun the processes share one copy
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:  # refused before anything in it ran
        needs = re.search(r"GLOBAL ([\w.]+)", str(error))
        fail(f"{path} needs code to load ({needs[1] if needs else 'a pickled object'}), so it was "
             f"not loaded; a model saved whole with torch.save(model) holds its code: save "
             f"model.state_dict() instead")
    except Exception as error:
        fail(f"cannot read checkpoint {path} ({type(error).__name__}: {error})")


def load_checkpoint(path: str) -> dict:
    """A train_cifar.py checkpoint, or a one-line error saying why it is not one."""
    checkpoint = read_torch_file(path)
    if not is_run_checkpoint(checkpoint):
        is_dict = isinstance(checkpoint, dict)
        found = sorted(checkpoint)[:8] if is_dict else type(checkpoint).__name__
        fail(f"{path} is not a train_cifar.py checkpoint (expected the keys "
             f"{sorted(CHECKPOINT_KEYS)}, found {found})")
    return checkpoint


def is_run_checkpoint(checkpoint, keys=CHECKPOINT_KEYS) -> bool:
    """keys=SNAPSHOT_KEYS: a checkpoint or an EMA snapshot."""
    return (isinstance(checkpoint, dict) and keys <= checkpoint.keys()
            and isinstance(checkpoint["config"], dict) and "model" in checkpoint["config"])


def resume(checkpoint: dict, parts: Parts, batches, args) -> int:
    """Model, EMA, optimizer, data order and RNG streams as saved; returns the step."""
    parts.model.load_state_dict(checkpoint["model"])
    parts.ema.load_state_dict(checkpoint["ema"])
    parts.optimizer.load_state_dict(checkpoint["optimizer"])
    for group in parts.optimizer.param_groups:
        group["lr"] = args.lr
    restore_rng(checkpoint["rng"], args.device, batches, checkpoint["step"], args.seed)
    return checkpoint["step"]


def check_resume_config(old: dict, new: dict, path: str):
    """Model, data and class list must match (labels would shift otherwise); the rest may change."""
    same_classes = old.get("classes") == new["classes"]
    if old["model"] != new["model"] or old["data"] != new["data"] or not same_classes:
        keys = sorted(set(old["model"]) | set(new["model"]))
        diff = [f"{k}: {old['model'].get(k)} in the checkpoint, {new['model'].get(k)} now"
                for k in keys if old["model"].get(k) != new["model"].get(k)]
        if old["data"] != new["data"]:
            diff.append(f"data: {old['data']} in the checkpoint, {new['data']} now")
        if not same_classes:
            diff.append(f"classes: {old.get('classes')} in the checkpoint, {new['classes']} now")
        fail(f"{path} belongs to another configuration ({'; '.join(diff)}); "
             f"resume with the same model and data flags, or start a new run in another --out")
    changed = [f"{k} {old[k]} -> {new[k]}" for k in new
               if k in old and old[k] != new[k] and k != "flags"]
    if changed:
        say("resuming with changed settings: " + ", ".join(changed))


# ==================================================================================================
# What a first reading can skip: agreement between torchrun processes, signals, CSV files that
# survive a resume, and the benchmark.
# ==================================================================================================

# ------------------------------------------------------------------ agreement between processes
#
# Every decision that could differ between ranks (a bad input, a non-finite loss, a signal, a
# failed save) is agreed through a collective, so no rank is ever left waiting in one.

STOP_GROUP = [None]  # a gloo group for signals; with NCCL the default group is on the GPU
STOP_CHECK_EVERY = 10  # under torchrun, steps between agreeing on a Ctrl-C or SIGTERM


def init_distributed(device: torch.device):
    """NCCL with one GPU per process (chosen by LOCAL_RANK), or gloo on the CPU."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        STOP_GROUP[0] = dist.new_group(backend="gloo")  # signals are agreed on the CPU


def agree(error):
    """Every rank passes its own error message or None; if any rank has one, all stop with it.

    Only rank 0 prints it (main() silences the others), so the user reads it once."""
    if ddp:
        errors = [None] * ddp_world_size
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise SystemExit(error)


def agreed(fn, *args):
    """fn(*args) on every rank; a one-line refusal on any rank stops all of them together."""
    if not ddp:
        return fn(*args)
    try:
        result, error = fn(*args), None
    except SystemExit as stop:
        error = stop.code if isinstance(stop.code, str) else f"error: rank {ddp_rank} stopped"
        result = None
    agree(error)
    return result


def all_ranks_mean(values: torch.Tensor) -> torch.Tensor:
    """In place: the mean of `values` over the ranks."""
    if ddp:
        dist.all_reduce(values)  # the logged losses are means over all ranks
        values /= ddp_world_size
    return values


def stream_seed(seed: int, process_rank: int) -> int:
    """The seed of one rank's noise, t and label-dropout stream: distinct for every (seed, rank)."""
    return seed * 1_000_003 + process_rank


class NonFiniteWatch:
    """Remembers, on the device and without a host sync, the first step whose loss was not finite;
    check() stops every rank with one message, before anything is saved."""

    def __init__(self, device, ckpt_path: str):
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)
        self.ckpt_path = ckpt_path

    def record(self, loss: torch.Tensor, step: int):
        first = (self.first_bad == 0) & ~torch.isfinite(loss)
        self.first_bad = torch.where(first, step, self.first_bad)

    def check(self):
        bad = self.first_bad
        if ddp:  # the earliest bad step of any rank; 0 (none) must not win the MIN
            never = torch.iinfo(torch.long).max
            bad = torch.where(bad == 0, never, bad)
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
            bad = torch.where(bad == never, 0, bad)
        bad = int(bad)
        if bad:
            fail(f"the loss became non-finite at step {bad}; stopped without saving, so "
                 f"{self.ckpt_path} keeps the last good state. Try a lower --lr, --precision fp32 "
                 f"or a smaller --grad-clip.")


def rng_state(batches) -> dict:
    """The data order (shared) and every rank's own torch/CUDA generators, gathered on all ranks."""
    mine = {"torch": torch.get_rng_state()}
    if batches.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(batches.device)
    ranks = [mine]
    if ddp:
        ranks = [None] * ddp_world_size
        dist.all_gather_object(ranks, mine)
    return {"data": batches.state_dict(), "ranks": ranks}


def restore_rng(state: dict, device, batches, step: int, seed: int):
    """The exact generators when the number of processes is unchanged; otherwise fresh per-rank
    streams (the data order still continues exactly, the noise draws do not)."""
    ranks = state.get("ranks") or [state]  # checkpoints before torchrun support had one state
    if len(ranks) == ddp_world_size:
        torch.set_rng_state(ranks[ddp_rank]["torch"])
        if device.type == "cuda" and "cuda" in ranks[ddp_rank]:
            torch.cuda.set_rng_state(ranks[ddp_rank]["cuda"], device)
    else:
        torch.manual_seed(stream_seed(seed, ddp_rank) + 7919 * step)
        say(f"note: the checkpoint was written by {len(ranks)} process(es), this run has "
            f"{ddp_world_size}: the data order and the global batch continue unchanged, the noise "
            f"and t streams are reseeded, so the run is not bit-identical to an uninterrupted one")
    batches.load_state_dict(state["data"])


def check_ranks_agree(model):
    """DDP keeps the ranks in step; check it at the end rather than trust it."""
    if not ddp:
        return
    import hashlib
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().numpy().tobytes())
    digests = [None] * ddp_world_size
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) > 1:
        fail(f"the {ddp_world_size} ranks ended with different weights; please report this")
    say(f"all {ddp_world_size} ranks hold identical weights (sha256 {digests[0][:16]})")


# ------------------------------------------------------------------ signals

class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (SLURM and most schedulers) finish the step, save and stop.

    A second signal of the same kind acts at once, with the default behaviour."""

    def __init__(self):
        self.received = None
        self.previous = {sig: signal.signal(sig, self.handle)
                         for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, _frame):
        self.received = self.received or signum
        default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        signal.signal(signum, default)

    def agreed(self, step: int, last_step: int) -> int:
        """The signal to stop for (0: none), the same on every rank: the largest rank's value,
        agreed over the CPU (gloo) every STOP_CHECK_EVERY steps, so it never waits for the GPU."""
        if not ddp:
            return self.received or 0
        if step % STOP_CHECK_EVERY and step != last_step:
            return 0
        flag = torch.tensor([self.received or 0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=STOP_GROUP[0])
        return int(flag)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------ CSV logs that survive a resume

METRICS_FIELDS = ["step", "loss", "fm", "layersync", "grad_norm", "img_per_s", "elapsed_s"]
PROBE_FIELDS = ["step", "t", "block", "accuracy", "teacher_cosine", "relative_update"]


class CsvLog:
    """A CSV that rank 0 alone writes. On a resume, the rows up to the restart step are kept, one
    per (step, t, block) or step; later rows, and rows cut by a kill, are dropped."""

    def __init__(self, path: str, fields: list, resume_step: int = 0):
        self.fields, self.file = fields, None
        if not master_process:
            return
        key = [k for k in ("step", "t", "block") if k in fields]
        rows = read_csv_rows(path, fields, resume_step, key)
        self.file = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=fields)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()

    def write(self, rows):
        if self.file:
            self.writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v
                                   for k, v in row.items()} for row in rows)
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


def probe_rows(step: int, probe) -> list:
    """layersync.BlockProbe -> probe.csv rows (teacher_cosine is empty without a teacher)."""
    return [{"step": step, "t": t, "block": k, "accuracy": accuracy,
             "teacher_cosine": probe.teacher_cosine.get(t, {}).get(k, ""),
             "relative_update": probe.relative_update[t][k]}
            for t, blocks in probe.accuracy.items() for k, accuracy in blocks.items()]


def write_probe_csv(path: str, step: int, probe):
    log = CsvLog(path, PROBE_FIELDS)
    log.write(probe_rows(step, probe))
    log.close()


def read_csv_rows(path: str, fields: list, resume_step: int, key: list) -> list:
    """The rows of a CSV up to `resume_step`, one per `key`; unreadable rows (a line cut by a
    kill, a hand edit) are dropped with a note instead of stopping the resume."""
    rows, seen, dropped = [], set(), 0
    if not (resume_step and os.path.exists(path)):
        return rows
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            try:
                step = int(row["step"])
                for name in fields:  # a column that an older version did not write is empty
                    if row.setdefault(name, "") != "":
                        float(row[name])  # None (a row cut short) or text: unreadable
            except (TypeError, ValueError, KeyError):
                dropped += 1
                continue
            ident = tuple(row[k] for k in key)
            if step <= resume_step and ident not in seen:
                seen.add(ident)
                rows.append({name: row[name] for name in fields})
    if dropped:
        say(f"{path}: dropped {dropped} unreadable row(s)")
    return rows


# ------------------------------------------------------------------ benchmark

# dense bf16 peak FLOP/s from the vendors' data sheets, for MFU; matched against the device name
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
                   "L40S": 362e12, "L4": 121e12, "RTX 4090": 165e12}


def forward_macs_per_image(config: dict) -> int:
    """Multiply-adds of one SiT forward: depth * (12 T H^2 + 2 T^2 H), plus patch in and out."""
    tokens = (config["input_size"] // config["patch_size"]) ** 2
    h = config["hidden_size"]
    patch_io = 2 * tokens * h * config["patch_size"] ** 2 * config["in_channels"]
    return config["depth"] * (12 * tokens * h * h + 2 * tokens * tokens * h) + patch_io


def timed(device, fn, repeats: int = 1) -> float:
    """Seconds per call of fn(), with the GPU's queue drained before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats


def time_steps(args, config: dict, pairs, weight, data_parallel=True) -> tuple:
    """(seconds per training step, peak GiB or None) on synthetic data, warm-up excluded."""
    device, parts = args.device, build(args, config, args.device, data_parallel)
    size, share = config["input_size"], args.batch_size // ddp_world_size  # this process's slice
    x = torch.randn(share, 3, size, size, device=device)
    y = torch.randint(0, 10, (share,), device=device)
    steps = iter(range(args.bench_warmup + args.bench_steps))
    last = {}

    def one_step():
        last["losses"], _ = train_step(args, parts, x, y, next(steps), pairs, weight)

    for _ in range(args.bench_warmup):  # compile and allocator warm-up excluded
        one_step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = timed(device, one_step, args.bench_steps)
    finite = torch.isfinite(last.pop("losses")["loss"])
    agree(None if finite else "error: bench: the loss became non-finite")
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    parts = None  # free the model before the next one is built
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds, memory


def bench(args):
    """Time training steps on synthetic data: the SiT baseline, then LayerSync; under torchrun,
    also one process alone at the same per-process batch, for the scaling efficiency."""
    device = args.device
    config = model_config(args, num_classes=10)
    weight = args.layersync_weight or 0.2
    pairs = parse_pairs(args.layersync_pairs, config["depth"], weight)
    train_flops = 3 * 2 * forward_macs_per_image(config)  # backward = 2x forward; 2 FLOPs per MAC
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = next((f for key, f in PEAK_BF16_FLOPS.items() if key in name), None)
    shape = ", ".join(f"{k} {config[k]}" for k in (*OVERRIDES, "input_size"))
    processes = f" x {ddp_world_size} processes" if ddp else ""
    say(f"{args.model} ({shape}) on {name}{processes}, global batch {args.batch_size}, "
        f"{args.precision}, compile {args.compile}, {train_flops / 1e9:.1f} GFLOP per training "
        f"image")
    say(f"{'run':<10} {'ms/step':>9} {'img/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GB':>8}")
    times = {}
    for label, run_pairs, run_weight in (("baseline", [], 0.0), ("layersync", pairs, weight)):
        seconds, memory = time_steps(args, config, run_pairs, run_weight)
        times[label] = seconds
        images_per_s = args.batch_size / seconds  # all processes together
        tflops = images_per_s * train_flops / 1e12
        use_mfu = peak and args.precision == "bf16"
        mfu = f"{100 * tflops * 1e12 / (peak * ddp_world_size):.1f}%" if use_mfu else "n/a"
        peak_gb = "n/a" if memory is None else f"{memory:.2f}"
        say(f"{label:<10} {1e3 * seconds:>9.2f} {images_per_s:>9.1f} {tflops:>8.2f} {mfu:>6} "
            f"{peak_gb:>8}")
    say(f"LayerSync / baseline step time: {times['layersync'] / times['baseline']:.3f} "
        f"(lambda {weight}, pairs {pairs})")
    if ddp:
        alone, _ = time_steps(args, config, pairs, weight, data_parallel=False)
        times["one_process"] = alone
        share = args.batch_size // ddp_world_size
        total = args.batch_size / times["layersync"]
        say(f"{ddp_world_size} processes: {total / ddp_world_size:.1f} img/s per process, "
            f"{total:.1f} img/s in total; one process alone at batch {share}: "
            f"{share / alone:.1f} img/s; scaling efficiency "
            f"{100 * alone / times['layersync']:.1f}%")
    if args.probe_every and master_process:  # in training, too, rank 0 alone probes
        times["probe_per_image"] = bench_probe(args, config, pairs)
        # CIFAR-10: 10,000 fitted + the 10,000-image test split; a folder: 4/5 (<= 10,000) + 1/5
        cifar = args.data == "cifar10" and args.image_size == 32
        probe_images = 2 * PROBE_FIT_IMAGES if cifar else PROBE_FIT_IMAGES
        which = "a CIFAR-10 probe (20,000 images)" if cifar else "10,000 probed images"
        cost = probe_images * times["probe_per_image"] / (args.probe_every * times["layersync"])
        say(f"probe: {1e3 * times['probe_per_image']:.3f} ms per image (all {len(args.probe_t)} "
            f"noise levels, ridge fits included); {which} every "
            f"{args.probe_every:,} steps of batch {args.batch_size} would add {100 * cost:.2f}% to "
            f"the training time")
    return times


def bench_probe(args, config: dict, pairs) -> float:
    """Seconds per probed image of run_probe (forwards at every noise level and the ridge fits)."""
    model = SiT(**config).to(args.device).eval()
    n = 4 * args.batch_size
    size, half = config["input_size"], n // 2
    images = torch.rand(n, 3, size, size) * 2 - 1
    labels = torch.arange(n) % config["num_classes"]
    data = ProbeData((images[:half], labels[:half]), (images[half:], labels[half:]), "synthetic")
    probe = lambda: run_probe(model, data, args.probe_t, pairs, args.precision)  # noqa: E731
    probe()  # warm-up
    return timed(args.device, probe) / n


def main(argv=None):
    try:
        args = parse_args(argv)
        if args.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for whatever still runs in fp32
            torch.backends.cudnn.allow_tf32 = True
        if ddp:
            init_distributed(args.device)
        return bench(args) if args.bench else train(args)
    except SystemExit as stop:
        if not master_process and isinstance(stop.code, str):
            # rank 0 prints the message; the others stop quietly, and a moment later, because
            # torchrun kills every worker as soon as one exits, rank 0 included
            time.sleep(2)
            raise SystemExit(1) from None
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        STOP_GROUP[0] = None


if __name__ == "__main__":
    main()
