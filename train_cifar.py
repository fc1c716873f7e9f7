"""Train a SiT on CIFAR-10 (or any image folder) with LayerSync; --layersync-weight 0 is the baseline.

    python train_cifar.py --out runs/layersync                         # LayerSync, lambda 0.2
    python train_cifar.py --out runs/baseline --layersync-weight 0     # plain SiT
    python train_cifar.py --bench                                      # timing, no dataset needed
    torchrun --standalone --nproc_per_node=8 train_cifar.py ...        # the same, on 8 GPUs (DDP)

A run writes to --out: metrics.csv, probe.csv (a linear probe of every block), samples_<step>.png
(EMA model, fixed noise, one row per class) and last.pt (model, EMA, optimizer, step, config, RNG
states); --resume continues it. Ctrl-C or SIGTERM saves and stops.
"""

import argparse
import copy
import csv
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from layersync import (SiT, SiT_models, check_layersync_pairs, default_layersync_pair,
                       guided_velocity, sample, training_loss)

# dense bf16 peak FLOP/s from the vendors' data sheets, for MFU; matched against the device name
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
                   "L40S": 362e12, "L4": 121e12, "RTX 4090": 165e12}


def fail(message: str):
    """Stop with a one-line message (no traceback): the user has something to fix."""
    raise SystemExit(f"error: {message}")


# ------------------------------------------------------------------ one process, or several (torchrun)
#
# `python train_cifar.py` is one process and never touches torch.distributed. Under torchrun each
# process trains data-parallel (DDP) on its slice of the same global batch, and rank 0 alone writes
# files. Every decision that could differ between ranks (a bad input, a non-finite loss, a signal,
# a failed save) is agreed through a collective, so no rank is ever left waiting in one.

def rank() -> int:
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def say(*args, **kwargs):
    if is_main():
        tqdm.write(" ".join(map(str, args)), **kwargs)


def init_distributed(device: torch.device):
    """NCCL with one GPU per process (chosen by LOCAL_RANK), or gloo on the CPU."""
    if world_size() == 1:
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def agree(error):
    """Every rank passes its own error message or None; if any rank has one, all stop with it.

    Only rank 0 prints it (main() silences the others), so the user reads it once."""
    if world_size() > 1:
        errors = [None] * world_size()
        dist.all_gather_object(errors, error)
        error = next((e for e in errors if e), None)
    if error:
        raise SystemExit(error)


def agreed(fn, *args):
    """fn(*args) on every rank; a one-line refusal on any rank stops all of them together."""
    if world_size() == 1:
        return fn(*args)
    try:
        result, error = fn(*args), None
    except SystemExit as stop:
        result, error = None, stop.code if isinstance(stop.code, str) else f"error: rank {rank()} stopped"
    agree(error)
    return result


def all_ranks_max(value: int) -> int:
    """The largest of the ranks' values, over the CPU (gloo), so it never waits for the GPU."""
    if world_size() == 1:
        return value
    flag = torch.tensor([value])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=STOP_GROUP[0])
    return int(flag)


STOP_GROUP = [None]  # a gloo group for all_ranks_max; with NCCL the default group is on the GPU


class DistributedSiT(torch.nn.parallel.DistributedDataParallel):
    """DDP that still shows the SiT's attributes: training_loss reads model.blocks."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":  # not registered yet (inside DDP's own __init__)
                raise
            return getattr(self.module, name)


def stream_seed(seed: int, process_rank: int) -> int:
    """The seed of one rank's noise, t and label-dropout stream: distinct for every (seed, rank)."""
    return seed * 1_000_003 + process_rank


# ------------------------------------------------------------------ command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", default="cifar10", help="'cifar10' or a folder with one sub-folder per class")
    d.add_argument("--data-dir", default="./data", help="where CIFAR-10 is (or is downloaded to)")
    d.add_argument("--image-size", type=int, default=32, help="image folders are resized and centre-cropped to it")
    d.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True,
                   help="random horizontal flips (right for CIFAR-10; use --no-hflip where left and right matter)")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="SiT-S/2", choices=sorted(SiT_models), help="SiT preset")
    m.add_argument("--depth", type=int, help="override the preset's number of blocks")
    m.add_argument("--hidden-size", type=int, help="override the preset's width")
    m.add_argument("--num-heads", type=int, help="override the preset's attention heads")
    m.add_argument("--patch-size", type=int, help="override the preset's patch size")
    s = p.add_argument_group("LayerSync")
    s.add_argument("--layersync-weight", type=float, default=0.2, help="lambda of Eq. 3; 0 = SiT baseline")
    s.add_argument("--layersync-pairs", help="'k:k2,...' 1-indexed blocks, student k < teacher k2 "
                                            "(default: 8:16 of 28 scaled to the depth, 3:7 for 12 blocks)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=100_000, help="total optimiser steps")
    o.add_argument("--batch-size", type=int, default=256)
    o.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 = no clipping")
    o.add_argument("--ema-decay", type=float, default=0.9999, help="in [0, 1), reached after a warm-up")
    o.add_argument("--seed", type=int, default=0)
    h = p.add_argument_group("hardware")
    h.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    h.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    h.add_argument("--no-compile", action="store_true", help="skip torch.compile (it is on by default on CUDA)")
    r = p.add_argument_group("outputs")
    r.add_argument("--out", default="runs/layersync", help="output folder")
    r.add_argument("--resume", action="store_true", help="continue from <out>/last.pt up to --steps")
    r.add_argument("--log-every", type=int, default=100)
    r.add_argument("--sample-every", type=int, default=10_000)
    r.add_argument("--sample-steps", type=int, default=50, help="Heun steps for the sample grids")
    r.add_argument("--ckpt-every", type=int, default=5_000)
    r.add_argument("--probe-every", type=int, help="linear probe of every block into <out>/probe.csv "
                                                  "(default: --sample-every; 0 = off)")
    r.add_argument("--probe-t", default="1.0,0.5", help="noise levels of the probe, comma-separated "
                                                       "(t = 1 is clean data)")
    b = p.add_argument_group("benchmark")
    b.add_argument("--bench", action="store_true", help="time baseline and LayerSync steps on synthetic data")
    b.add_argument("--bench-steps", type=int, default=50)
    b.add_argument("--bench-warmup", type=int, default=15)
    if not is_main():  # under torchrun, rank 0 alone reports a bad flag
        p.print_usage = p.print_help = lambda *_, **__: None
        p.exit = lambda status=0, message=None: sys.exit(status)
    args = p.parse_args(argv)
    args.probe_every = args.sample_every if args.probe_every is None else args.probe_every
    args.probe_t = parse_probe_t(args.probe_t)
    check_args(args)
    args.precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    args.compile = args.device.startswith("cuda") and not args.no_compile
    return args


def parse_probe_t(text: str) -> list:
    try:
        ts = [float(item) for item in text.split(",")]
    except ValueError:
        ts = []
    if not ts or not all(0 <= t <= 1 for t in ts):
        fail(f"--probe-t {text}: give noise levels in [0, 1], comma-separated, e.g. 1.0,0.5")
    return ts


def check_range(args, name: str, low: float, high: float = math.inf, low_open=False, high_open=False):
    """One-line refusal unless `low <= --name <= high` (ends excluded when *_open) and finite."""
    value = getattr(args, name)
    inside = (math.isfinite(value) and (value > low if low_open else value >= low)
              and (value < high if high_open else value <= high))
    if not inside:
        left, right = "(" if low_open else "[", ")" if high_open or high == math.inf else "]"
        fail(f"--{name.replace('_', '-')} {value}: must be a finite number in {left}{low}, {high}{right}")


def check_device(name: str) -> torch.device:
    if name == "cuda" and world_size() > 1:
        name = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        fail(f"--device {name}: use cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        fail(f"--device {name} but no CUDA GPU is visible; use --device cpu")
    return device


def check_args(args):
    """Everything a flag can get wrong, refused in one line before any data is read."""
    for name in ("steps", "batch_size", "log_every", "sample_every", "sample_steps", "ckpt_every",
                 "image_size", "bench_steps", "depth", "hidden_size", "num_heads", "patch_size"):
        if getattr(args, name) is not None:
            check_range(args, name, 1)
    check_range(args, "bench_warmup", 0)
    check_range(args, "probe_every", 0)
    check_range(args, "lr", 0, low_open=True)
    check_range(args, "weight_decay", 0)
    check_range(args, "grad_clip", 0)  # 0 turns clipping off (as in nanoGPT); < 0 would flip gradients
    check_range(args, "ema_decay", 0, 1, high_open=True)
    check_range(args, "layersync_weight", 0)
    check_device(args.device)
    if args.batch_size % world_size():
        fail(f"--batch-size {args.batch_size} is the global batch and must divide by the {world_size()} "
             f"processes; use a multiple of {world_size()}")
    if world_size() > 1 and args.device not in ("cpu", "cuda"):
        fail(f"--device {args.device}: under torchrun give cpu or cuda; each process takes GPU LOCAL_RANK")
    try:  # the model's own shape rules (patch divides image, heads divide width), on the meta device
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
            k, kk = default_layersync_pair(depth)
            fail(f"--layersync-pairs: cannot read {item.strip()!r}; write student:teacher block "
                 f"numbers, comma-separated, e.g. {k}:{kk}")
        pairs.append((int(parts[0]), int(parts[1])))
    try:
        return check_layersync_pairs(pairs, depth)
    except ValueError as error:
        fail(f"--layersync-pairs: {error}")


def model_config(args, num_classes: int) -> dict:
    """Every SiT keyword of the run: enough to rebuild the model with SiT(**config)."""
    config = dict(SiT_models[args.model].keywords)
    for key in ("depth", "hidden_size", "num_heads", "patch_size"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    config.update(input_size=args.image_size, in_channels=3, num_classes=num_classes)
    return config


# ------------------------------------------------------------------ data

def load_cifar10(data_dir: str, train: bool = True):
    from torchvision.datasets import CIFAR10
    try:
        data = CIFAR10(data_dir, train=train, download=True)
    except Exception as error:  # offline, a broken archive, a truncated batch file
        fail(f"could not load CIFAR-10 from {os.path.abspath(data_dir)} ({type(error).__name__}: {error}). "
             f"Without internet, download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
             f"and put it in that folder (it is unpacked on first use), or pass --data PATH for an image folder.")
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
            fail(f"{path}: 32-bit integer pixels outside 0..65535; save it as an 8- or 16-bit image")
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
        fail(f"--data {path}: no such folder; give 'cifar10' or a folder with one sub-folder of images per class")
    resize = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size), transforms.PILToTensor()])
    try:  # an empty folder or one without class sub-folders
        data = ImageFolder(path, transform=resize, loader=read_image)
    except (OSError, ValueError) as error:
        fail(f"--data {path}: {error}; it needs one sub-folder per class with images in it")
    images = torch.stack([image for image, _ in tqdm(data, desc="decoding images", leave=False,
                                                     disable=not is_main())])
    return images, torch.tensor(data.targets), data.classes


def load_data(args):
    if args.data == "cifar10":
        if args.image_size != 32:
            fail("CIFAR-10 images are 32x32: drop --image-size or set it to 32")
        return load_cifar10(args.data_dir)
    return load_image_folder(args.data, args.image_size)


class DeviceBatches:
    """The whole dataset as uint8 on the device; shuffling and flips on the device, no loader workers.

    CIFAR-10 is 150 MB as uint8, so it fits on any GPU, and gathering a batch there costs
    microseconds. Epoch order and flips come from a CPU generator whose state is checkpointed.
    Every process draws the same global batch and keeps its own slice of it, so the data order
    is the same for any number of processes.
    """

    def __init__(self, images, labels, batch_size: int, seed: int, device, hflip: bool = True):
        if len(images) < batch_size:
            fail(f"the dataset has {len(images)} images, fewer than --batch-size {batch_size}")
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
        share = self.batch_size // world_size()  # this process's slice of the global batch
        start = self.position + rank() * share
        window = slice(start, start + share)
        self.position += self.batch_size
        index = self.order[window]
        x = self.images[index]
        x = torch.where(self.flip[window, None, None, None], x.flip(-1), x)  # random horizontal flip
        return x.float() / 127.5 - 1, self.labels[index]  # pixels in [-1, 1]

    def state_dict(self):
        return {"epoch_start": self.epoch_start, "position": self.position}

    def load_state_dict(self, state):
        self.generator.set_state(state["epoch_start"])
        self.new_epoch()
        self.position = state["position"]


# ------------------------------------------------------------------ representation probe
#
# The paper's argument (Sec. 3) is that blocks differ in how semantic their features are, and that
# LayerSync lifts the weak ones. The probe measures it: how well a linear classifier reads the
# class from each block's token-averaged residual stream, on real images the classifier did not
# fit. Unlike the paper's protocol (Tiny-ImageNet, trained probes on SiT-XL/2), it is a closed-form
# ridge probe on this run's own dataset, cheap enough to run during training.

PROBE_FIT_IMAGES = 10_000
PROBE_SEED = 1234  # the probe's noise and subset: the same for every run, apart from --seed
CSV_PROBE_FIELDS = ["step", "t", "block", "accuracy", "teacher_cosine"]


def probe_split(data: str, data_dir: str, images, labels):
    """(fit images, fit labels, scored images, scored labels, a description), uint8 on the CPU.

    CIFAR-10: a fixed 10,000-image subset of the training split fits, the 10,000-image test split
    scores. An image folder: every 5th image of each class (in file-name order) scores, the rest
    (at most 10,000) fit; the generator still trains on all of them."""
    if data == "cifar10":
        scored, scored_labels, _ = load_cifar10(data_dir, train=False)
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(PROBE_SEED))[:PROBE_FIT_IMAGES]
        return images[pick], labels[pick], scored, scored_labels, "fit on 10,000 training images, scored on the test split"
    held = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        held[(labels == c).nonzero().flatten()[4::5]] = True
    if not held.any() or held.all():
        fail("the probe needs a class with at least 5 images (every 5th image of a class is held out to "
             "score the probe); add images or pass --probe-every 0")
    fit = (~held).nonzero().flatten()
    if len(fit) > PROBE_FIT_IMAGES:  # a seeded sample, not the first classes in file order
        pick = torch.randperm(len(fit), generator=torch.Generator().manual_seed(PROBE_SEED))
        fit = fit[pick[:PROBE_FIT_IMAGES].sort().values]
    return (images[fit], labels[fit], images[held], labels[held],
            f"fit on {len(fit)} images, scored on every 5th image of each class ({int(held.sum())})")


def null_label(model: SiT) -> int:
    if model.y_embedder.table.num_embeddings == model.num_classes:
        raise ValueError("the probe feeds the null class label, and this model has none (trained with "
                         "class_dropout_prob=0)")
    return model.num_classes


@torch.no_grad()
def block_features(model: SiT, images, t: float, teacher=None, seed: int = PROBE_SEED, batch_size: int = 250):
    """Every block's token-averaged residual stream (Eq. 2's f^k, pooled) on x_t, as (depth, N, D).

    x_t = t x1 + (1 - t) x0 with noise fixed by `seed`. The label is always the null class:
    a class label would reach every block through adaLN, and the probe would read the label
    instead of the representation. With a teacher block, also each block's mean per-token
    cosine to it (what Eq. 2 maximises for the student), as (depth,)."""
    y_null, device = null_label(model), model.pos_embed.device
    generator = torch.Generator().manual_seed(seed)
    blocks = tuple(range(1, len(model.blocks) + 1))
    features, cosine, tokens = [], torch.zeros(len(blocks), device=device), 0
    for start in range(0, len(images), batch_size):
        x1 = images[start:start + batch_size].to(device).float() / 127.5 - 1
        x0 = torch.randn(x1.shape, generator=generator).to(device)
        n = len(x1)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            _, hidden = model(t * x1 + (1 - t) * x0, torch.full((n,), t, device=device),
                              torch.full((n,), y_null, device=device), return_layers=blocks)
        features.append(torch.stack([h.float().mean(dim=1) for h in hidden]))  # (depth, n, D)
        if teacher:
            ref = torch.nn.functional.normalize(hidden[teacher - 1].float(), dim=-1)
            cosine += torch.stack([(torch.nn.functional.normalize(h.float(), dim=-1) * ref).sum(-1).sum()
                                   for h in hidden])
            tokens += hidden[0].shape[0] * hidden[0].shape[1]
    return torch.cat(features, dim=1), (cosine / tokens if teacher else None)


def ridge_probe_accuracy(fit_x, fit_y, test_x, test_y, num_classes: int, ridge: float = 1e-3) -> float:
    """Top-1 accuracy of a linear classifier fitted in closed form: ridge regression of one-hot
    targets on standardised features. Closed form, because it is deterministic, has no learning
    rate or epoch count to tune, and costs one D x D solve, seconds even for D = 1152; a trained
    logistic probe tends to score a little higher, but not to order the blocks differently."""
    mean, std = fit_x.double().mean(0), fit_x.double().std(0).clamp_min(1e-6)
    x, z = (fit_x.double() - mean) / std, (test_x.double() - mean) / std
    targets = torch.nn.functional.one_hot(fit_y.long(), num_classes).double()
    prior = targets.mean(0)  # x is centred, so the bias is the class frequency
    gram = x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    weights = torch.linalg.solve(gram, x.T @ (targets - prior))
    predicted = (z @ weights + prior).argmax(dim=1)
    return (predicted == test_y.to(predicted.device)).double().mean().item()


def run_probe(model: SiT, split, ts, teacher=None) -> list:
    """Rows {t, block, accuracy, teacher_cosine} for every noise level and block (1-indexed)."""
    fit_images, fit_labels, scored_images, scored_labels, _ = split
    rows = []
    for t in ts:
        # other noise for the scored images: shared noise would let the probe match noise to labels
        fit, cosine = block_features(model, fit_images, t, teacher, seed=PROBE_SEED)
        scored, _ = block_features(model, scored_images, t, seed=PROBE_SEED + 1)
        for k in range(len(fit)):
            rows.append({"t": t, "block": k + 1, "teacher_cosine": float(cosine[k]) if teacher else "",
                         "accuracy": ridge_probe_accuracy(fit[k], fit_labels, scored[k], scored_labels,
                                                          model.num_classes)})
    return rows


def probe_summary(rows: list, pairs: list) -> str:
    """One line per noise level: the best block, and the LayerSync student and teacher blocks."""
    parts = []
    for t in dict.fromkeys(row["t"] for row in rows):
        acc = {row["block"]: row["accuracy"] for row in rows if row["t"] == t}
        best = max(acc, key=acc.get)
        text = f"t={t:g}: best block {best} {100 * acc[best]:.1f}%"
        if pairs:
            (k, kk), = pairs[:1]
            text += f", student {k} {100 * acc[k]:.1f}%, teacher {kk} {100 * acc[kk]:.1f}%"
        parts.append(text)
    return "; ".join(parts)


# ------------------------------------------------------------------ the training step

@torch.no_grad()
def update_ema(ema_params, params, step: int, max_decay: float):
    # warm-up: decay (1 + step) / (10 + step), so that short runs still get a usable EMA
    decay = min(max_decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(ema_params, params, 1 - decay)


def train_step(args, forward, optimizer, ema_params, x, y, step, pairs, weight):
    """One AdamW step on Eq. 3, then the EMA. No host sync: what it returns stays on the device."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
        losses = training_loss(forward, x, y, pairs, weight)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    params = optimizer.param_groups[0]["params"]  # the model's parameters, listed once already
    # --grad-clip 0: no clipping, but the norm is still measured for metrics.csv
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or math.inf)
    optimizer.step()
    update_ema(ema_params, params, step, args.ema_decay)
    return losses, grad_norm


def build(args, config, device, data_parallel=True):
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = SiT(**config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # each rank keeps its own, identical EMA
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    net = model
    if data_parallel and world_size() > 1:  # gradients all-reduced in buckets during the backward
        net = DistributedSiT(model, device_ids=[device.index] if device.type == "cuda" else None)
    forward = torch.compile(net) if args.compile else net  # compiled around DDP, so they overlap
    torch.manual_seed(stream_seed(args.seed, rank()))  # then each rank its own noise and t
    return model, ema, optimizer, forward


def setup_device(args):
    device = check_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for whatever still runs in fp32
        torch.backends.cudnn.allow_tf32 = True
    return device


# ------------------------------------------------------------------ checkpoints

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


CHECKPOINT_KEYS = {"model", "ema", "optimizer", "step", "config", "rng"}


def load_checkpoint(path: str) -> dict:
    """A train_cifar.py checkpoint, or a one-line error saying why it is not one."""
    try:  # weights_only: a checkpoint is data and is never allowed to run code
        # mmap: under torchrun every process reads the same file without a copy of its own
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        fail(f"no checkpoint at {path}")
    except Exception as error:
        fail(f"cannot read checkpoint {path} ({type(error).__name__}: {error})")
    if not (isinstance(checkpoint, dict) and CHECKPOINT_KEYS <= checkpoint.keys()
            and isinstance(checkpoint["config"], dict) and "model" in checkpoint["config"]):
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        fail(f"{path} is not a train_cifar.py checkpoint (expected the keys {sorted(CHECKPOINT_KEYS)}, "
             f"found {found})")
    return checkpoint


def rng_state(device, batches) -> dict:
    """The data order (shared) and every rank's own torch/CUDA generators, gathered on all ranks."""
    mine = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(device)
    ranks = [mine]
    if world_size() > 1:
        ranks = [None] * world_size()
        dist.all_gather_object(ranks, mine)
    return {"data": batches.state_dict(), "ranks": ranks}


def restore_rng(state: dict, device, batches, step: int, seed: int):
    """The exact generators when the number of processes is unchanged; otherwise fresh per-rank
    streams (the data order still continues exactly, the noise draws do not)."""
    ranks = state.get("ranks") or [state]  # checkpoints before torchrun support had one state
    if len(ranks) == world_size():
        torch.set_rng_state(ranks[rank()]["torch"])
        if device.type == "cuda" and "cuda" in ranks[rank()]:
            torch.cuda.set_rng_state(ranks[rank()]["cuda"], device)
    else:
        torch.manual_seed(stream_seed(seed, rank()) + 7919 * step)
        say(f"note: the checkpoint was written by {len(ranks)} process(es), this run has {world_size()}: "
            f"the data order and the global batch continue unchanged, the noise and t streams are "
            f"reseeded, so the run is not bit-identical to an uninterrupted one")
    batches.load_state_dict(state["data"])


def check_resume_config(old: dict, new: dict, path: str):
    """Model, data and class list must match (labels would shift otherwise); the rest may change."""
    same_classes = old.get("classes") == new["classes"]
    if old["model"] != new["model"] or old["data"] != new["data"] or not same_classes:
        diff = [f"{k}: {old['model'].get(k)} in the checkpoint, {new['model'].get(k)} now"
                for k in sorted(set(old["model"]) | set(new["model"])) if old["model"].get(k) != new["model"].get(k)]
        if old["data"] != new["data"]:
            diff.append(f"data: {old['data']} in the checkpoint, {new['data']} now")
        if not same_classes:
            diff.append(f"classes: {old.get('classes')} in the checkpoint, {new['classes']} now")
        fail(f"{path} belongs to another configuration ({'; '.join(diff)}); "
             f"resume with the same model and data flags, or start a new run in another --out")
    changed = [f"{k} {old[k]} -> {new[k]}" for k in new if k in old and old[k] != new[k]]
    if changed:
        say("resuming with changed settings: " + ", ".join(changed))


# ------------------------------------------------------------------ logging and samples

CSV_FIELDS = ["step", "loss", "fm", "layersync", "grad_norm", "img_per_s", "elapsed_s"]


def csv_row(row: dict) -> dict:
    return {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}


def read_csv_rows(path: str, fields: list, resume_step: int, key=("step",)) -> list:
    """The rows of a CSV up to `resume_step`, one per `key`; unreadable rows (a line cut by a
    kill, a hand edit) are dropped with a note instead of stopping the resume."""
    rows, seen, dropped = [], set(), 0
    if resume_step and os.path.exists(path):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                try:
                    step = int(row["step"])
                    [float(row[name]) for name in fields if row[name] != ""]
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


def open_csv(path: str, fields: list, resume_step: int, key=("step",)):
    """A CSV log, keeping only rows up to the step a resumed run restarts from, one per key."""
    rows = read_csv_rows(path, fields, resume_step, key)
    f = open(path, "w", newline="")
    writer = csv.DictWriter(f, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    f.flush()
    return f, writer


def fixed_grid_inputs(config: dict, device, columns: int = 8):
    """The same noise and labels at every step of every run (seeded apart from --seed)."""
    rows = min(config["num_classes"], 20)
    size, channels = config["input_size"], config["in_channels"]
    noise = torch.randn(rows * columns, channels, size, size, generator=torch.Generator().manual_seed(2026))
    labels = torch.arange(rows).repeat_interleave(columns)
    return noise.to(device), labels.to(device), columns


def save_grid(ema, grid, path, steps, precision):
    from torchvision.utils import save_image
    noise, labels, columns = grid
    with torch.autocast(noise.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        images = sample(guided_velocity(ema, labels), noise, steps=steps, method="heun")
    save_image((images.float().clamp(-1, 1) + 1) / 2, path, nrow=columns)  # one row per class


# ------------------------------------------------------------------ training

def data_identity(data: str) -> str:
    """'cifar10', or the folder's resolved path: ./imgs and /home/me/imgs are the same data."""
    return data if data == "cifar10" else os.path.realpath(data)


def describe_model(args, config: dict) -> str:
    """The model that actually runs: the preset's name, which flags changed it, and its shape."""
    preset = SiT_models[args.model].keywords
    changed = [f"--{k.replace('_', '-')}" for k in ("depth", "hidden_size", "num_heads", "patch_size")
               if config[k] != preset[k]]
    shape = (f"depth {config['depth']}, width {config['hidden_size']}, {config['num_heads']} heads, "
             f"patch {config['patch_size']}, {config['input_size']}x{config['input_size']} images")
    return f"{args.model}{' changed by ' + ' '.join(changed) if changed else ''}: {shape}"


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (SLURM and most schedulers) finish the step, save and stop.

    A second signal of the same kind acts at once, with the default behaviour."""

    def __init__(self):
        self.received = None
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, _frame):
        self.received = self.received or signum
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


STOP_CHECK_EVERY = 10  # under torchrun, steps between agreeing on a Ctrl-C or SIGTERM


def prepare(args, pairs):
    """Everything that can refuse the run, before the model is built; None: nothing to do."""
    ckpt_path = os.path.join(args.out, "last.pt")
    checkpoint = None
    if args.resume:
        checkpoint = load_checkpoint(ckpt_path)
        if checkpoint["step"] >= args.steps:
            say(f"{ckpt_path} is at step {checkpoint['step']} >= --steps {args.steps}: nothing to do")
            return None
    elif os.path.exists(ckpt_path):
        fail(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    images, labels, classes = load_data(args)
    probe_data = probe_split(args.data, args.data_dir, images, labels) if args.probe_every else None
    config = {"model": model_config(args, len(classes)), "data": data_identity(args.data),
              "classes": list(classes), "hflip": args.hflip,
              "layersync_pairs": [list(p) for p in pairs], "layersync_weight": args.layersync_weight,
              "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay,
              "grad_clip": args.grad_clip, "ema_decay": args.ema_decay, "seed": args.seed,
              "precision": args.precision}
    if checkpoint is not None:  # before building anything: a mismatch costs no time
        checkpoint["config"]["data"] = data_identity(checkpoint["config"]["data"])
        check_resume_config(checkpoint["config"], config, ckpt_path)
    if is_main():
        os.makedirs(args.out, exist_ok=True)
    return checkpoint, images, labels, classes, probe_data, config


def weights_digest(model) -> str:
    import hashlib
    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def train(args):
    device = setup_device(args)
    depth = args.depth or SiT_models[args.model].keywords["depth"]
    pairs = parse_pairs(args.layersync_pairs, depth, args.layersync_weight)  # bad pairs stop before any work
    ckpt_path = os.path.join(args.out, "last.pt")
    prepared = agreed(prepare, args, pairs)
    if prepared is None:
        return
    checkpoint, images, labels, classes, probe_data, config = prepared
    model, ema, optimizer, forward = build(args, config["model"], device)
    batches = DeviceBatches(images, labels, args.batch_size, args.seed, device, args.hflip)
    step = 0
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        ema.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        for group in optimizer.param_groups:
            group["lr"] = args.lr
        step = checkpoint["step"]
        restore_rng(checkpoint["rng"], device, batches, step, args.seed)
    processes = f", {world_size()} processes" if world_size() > 1 else ""
    say(f"{describe_model(args, config['model'])}, {sum(p.numel() for p in model.parameters()):,} parameters; "
        f"LayerSync {'off (baseline)' if args.layersync_weight == 0 else f'lambda {args.layersync_weight}'}, "
        f"pairs {pairs}; {len(images)} images in {len(classes)} classes, flips {'on' if args.hflip else 'off'}; "
        f"{device.type} {args.precision}{processes}")

    if is_main():  # rank 0 alone writes files
        metrics_file, metrics = open_csv(os.path.join(args.out, "metrics.csv"), CSV_FIELDS, step)
        if probe_data:
            probe_file, probe_csv = open_csv(os.path.join(args.out, "probe.csv"), CSV_PROBE_FIELDS, step,
                                             key=("step", "t", "block"))
    teacher = pairs[0][1] if pairs else None
    grid = fixed_grid_inputs(config["model"], device)
    ema_params = list(ema.parameters())

    def save():
        check_finite()
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                 "step": step, "config": config, "rng": rng_state(device, batches)}
        error = None
        if is_main():
            try:
                save_checkpoint(ckpt_path, state)
            except OSError as problem:  # a full disk, a quota, a vanished mount
                error = (f"error: could not write {ckpt_path} at step {step} ({problem}); the previous "
                         f"checkpoint there is intact. Free some space and rerun with --resume.")
        agree(error)

    first_bad = torch.zeros((), dtype=torch.long, device=device)  # first step with a non-finite loss

    def check_finite():
        bad = first_bad
        if world_size() > 1:  # the earliest bad step of any rank; 0 (none) must not win the MIN
            never = torch.iinfo(torch.long).max
            bad = torch.where(bad == 0, never, bad)
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
            bad = torch.where(bad == never, 0, bad)
        bad = int(bad)
        if bad:
            fail(f"the loss became non-finite at step {bad}; stopped without saving, so {ckpt_path} "
                 f"keeps the last good state. Try a lower --lr, --precision fp32 or a smaller --grad-clip.")

    stop, stop_signal = StopSignals(), 0
    totals = torch.zeros(4, device=device)  # loss, fm, layersync, grad norm since the last log
    last_log_step, last_log_time, start = step, time.perf_counter(), time.perf_counter()
    bar = tqdm(total=args.steps, initial=step, dynamic_ncols=True, disable=not is_main())
    try:
        while step < args.steps:
            x, y = batches.next()
            losses, grad_norm = train_step(args, forward, optimizer, ema_params, x, y, step,
                                           pairs, args.layersync_weight)
            step += 1
            first_bad = torch.where((first_bad == 0) & ~torch.isfinite(losses["loss"]), step, first_bad)
            totals += torch.stack([losses["loss"].detach(), losses["fm"], losses["layersync"], grad_norm])
            bar.update(1)
            if step % args.log_every == 0 or step == args.steps:
                check_finite()
                if world_size() > 1:
                    dist.all_reduce(totals)  # the logged losses are means over all ranks
                    totals /= world_size()
                mean = (totals / (step - last_log_step)).tolist()  # the only host sync, once per log
                now = time.perf_counter()
                images_per_s = args.batch_size * (step - last_log_step) / (now - last_log_time)
                row = dict(zip(CSV_FIELDS, [step, *mean, images_per_s, now - start]))
                if is_main():
                    metrics.writerow(csv_row(row))
                    metrics_file.flush()
                bar.set_postfix(loss=f"{mean[0]:.4f}", fm=f"{mean[1]:.4f}", sync=f"{mean[2]:.3f}",
                                img_s=f"{row['img_per_s']:.0f}")
                totals.zero_()
                last_log_step, last_log_time = step, now
            pause = time.perf_counter()
            if world_size() == 1 or step % STOP_CHECK_EVERY == 0 or step == args.steps:
                stop_signal = all_ranks_max(stop.received or 0)  # every rank stops at the same step
            # the checkpoint first: nothing that follows it can lose the run
            if step % args.ckpt_every == 0 or step == args.steps or stop_signal:
                save()
            if step % args.sample_every == 0 or step == args.steps:
                check_finite()
                path = os.path.join(args.out, f"samples_{step:07d}.png")
                try:
                    if is_main():
                        save_grid(ema, grid, path, args.sample_steps, args.precision)
                except OSError as error:  # a grid is worth a warning, never the run
                    say(f"warning: could not write {path} ({error})")
            if probe_data and is_main() and (step % args.probe_every == 0 or step == args.steps):
                rows = run_probe(ema, probe_data, args.probe_t, teacher)
                probe_csv.writerows(csv_row({"step": step, **row}) for row in rows)
                probe_file.flush()
                say(f"probe at step {step}: {probe_summary(rows, pairs)}")
            last_log_time += time.perf_counter() - pause  # img_per_s counts training time only
            if stop_signal:
                break
    finally:
        bar.close()
        if is_main():
            metrics_file.close()
            if probe_data:
                probe_file.close()
        stop.restore()
    if stop_signal:
        say(f"interrupted by {signal.Signals(stop_signal).name}: saved step {step} of {args.steps} to "
            f"{ckpt_path}; rerun the same command with --resume to continue", file=sys.stderr)
        raise SystemExit(128 + stop_signal)  # the shell's code for "killed by this signal"
    if world_size() > 1:  # DDP keeps the ranks in step; check it rather than trust it
        digests = [None] * world_size()
        dist.all_gather_object(digests, weights_digest(model))
        if len(set(digests)) > 1:
            fail(f"the {world_size()} ranks ended with different weights; please report this")
        say(f"all {world_size()} ranks hold identical weights (sha256 {digests[0][:16]})")


# ------------------------------------------------------------------ benchmark

def forward_macs_per_image(config: dict) -> int:
    """Multiply-adds of one SiT forward: depth * (12 T H^2 + 2 T^2 H), plus the patch in/out layers."""
    tokens = (config["input_size"] // config["patch_size"]) ** 2
    h = config["hidden_size"]
    patch_io = 2 * tokens * h * config["patch_size"] ** 2 * config["in_channels"]
    return config["depth"] * (12 * tokens * h * h + 2 * tokens * tokens * h) + patch_io


def time_steps(args, config: dict, device, pairs, weight, data_parallel=True) -> tuple:
    """(seconds per training step, peak GiB or None) on synthetic data, warm-up excluded."""
    model, ema, optimizer, forward = build(args, config, device, data_parallel)
    ema_params = list(ema.parameters())
    size, share = config["input_size"], args.batch_size // world_size()  # this process's slice
    x = torch.randn(share, 3, size, size, device=device)
    y = torch.randint(0, 10, (share,), device=device)
    for step in range(args.bench_warmup + args.bench_steps):
        if step == args.bench_warmup:  # compile and allocator warm-up excluded
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
        losses, _ = train_step(args, forward, optimizer, ema_params, x, y, step, pairs, weight)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / args.bench_steps
    agree(None if torch.isfinite(losses["loss"]) else "error: bench: the loss became non-finite")
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    del model, ema, optimizer, forward, ema_params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds, memory


def bench(args):
    """Time training steps on synthetic data: the SiT baseline, then LayerSync; under torchrun,
    also one process alone at the same per-process batch, for the scaling efficiency."""
    device = setup_device(args)
    config = model_config(args, num_classes=10)
    weight = args.layersync_weight or 0.2
    pairs = parse_pairs(args.layersync_pairs, config["depth"], weight)
    train_flops = 3 * 2 * forward_macs_per_image(config)  # backward = 2x forward; 2 FLOPs per MAC
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = next((f for key, f in PEAK_BF16_FLOPS.items() if key in name), None)
    shape = ", ".join(f"{k} {config[k]}" for k in ("depth", "hidden_size", "num_heads", "patch_size", "input_size"))
    processes = f" x {world_size()} processes" if world_size() > 1 else ""
    say(f"{args.model} ({shape}) on {name}{processes}, global batch {args.batch_size}, {args.precision}, "
        f"compile {args.compile}, {train_flops / 1e9:.1f} GFLOP per training image")
    say(f"{'run':<10} {'ms/step':>9} {'img/s':>9} {'TFLOP/s':>8} {'MFU':>6} {'peak GB':>8}")
    times = {}
    for label, run_pairs, run_weight in (("baseline", [], 0.0), ("layersync", pairs, weight)):
        seconds, memory = time_steps(args, config, device, run_pairs, run_weight)
        times[label] = seconds
        images_per_s = args.batch_size / seconds  # all processes together
        tflops = images_per_s * train_flops / 1e12
        mfu = f"{100 * tflops * 1e12 / (peak * world_size()):.1f}%" if peak and args.precision == "bf16" else "n/a"
        say(f"{label:<10} {1e3 * seconds:>9.2f} {images_per_s:>9.1f} {tflops:>8.2f} {mfu:>6} "
            f"{'n/a' if memory is None else f'{memory:.2f}':>8}")
    say(f"LayerSync / baseline step time: {times['layersync'] / times['baseline']:.3f} "
        f"(lambda {weight}, pairs {pairs})")
    if world_size() > 1:
        alone, _ = time_steps(args, config, device, pairs, weight, data_parallel=False)
        times["one_process"] = alone
        share = args.batch_size // world_size()
        total = args.batch_size / times["layersync"]
        say(f"{world_size()} processes: {total / world_size():.1f} img/s per process, {total:.1f} img/s in total; "
            f"one process alone at batch {share}: {share / alone:.1f} img/s; scaling efficiency "
            f"{100 * alone / times['layersync']:.1f}%")
    if args.probe_every and is_main():  # in training, too, rank 0 alone probes
        times["probe_per_image"] = bench_probe(args, config, device, pairs)
        probe_images = 2 * PROBE_FIT_IMAGES  # CIFAR-10: 10,000 fitted + the 10,000-image test split
        cost = probe_images * times["probe_per_image"] / (args.probe_every * times["layersync"])
        say(f"probe: {1e3 * times['probe_per_image']:.3f} ms per image (all {len(args.probe_t)} noise levels, "
            f"ridge fits included); a CIFAR-10 probe ({probe_images:,} images) every {args.probe_every:,} "
            f"steps of batch {args.batch_size} would add {100 * cost:.2f}% to the training time")
    return times


def bench_probe(args, config: dict, device, pairs) -> float:
    """Seconds per probed image of run_probe (forwards at every noise level and the ridge fits)."""
    model = SiT(**config).to(device).eval()
    n = 4 * args.batch_size
    images = torch.randint(0, 256, (n, 3, config["input_size"], config["input_size"]), dtype=torch.uint8)
    labels = torch.arange(n) % config["num_classes"]
    half = n // 2
    split = (images[:half], labels[:half], images[half:], labels[half:], "synthetic")
    teacher = pairs[0][1] if pairs else None
    run_probe(model, split, args.probe_t, teacher)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run_probe(model, split, args.probe_t, teacher)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / n


def main(argv=None):
    try:
        args = parse_args(argv)
        device = check_device(args.device)
        init_distributed(device)
        if world_size() > 1 and device.type == "cuda":
            STOP_GROUP[0] = dist.new_group(backend="gloo")  # signals are agreed on the CPU
        return bench(args) if args.bench else train(args)
    except SystemExit as stop:
        if not is_main() and isinstance(stop.code, str):
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
