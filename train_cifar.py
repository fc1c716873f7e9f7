"""Train a SiT on CIFAR-10 or an image folder with LayerSync; --layersync-weight 0: the baseline.

    python train_cifar.py --out runs/layersync                         # LayerSync, lambda 0.2
    python train_cifar.py --out runs/baseline --layersync-weight 0     # plain SiT
    python train_cifar.py --out runs/layersync --resume                # continue from last.pt
    torchrun --standalone --nproc_per_node=8 train_cifar.py ...        # the same, on 8 GPUs (DDP)

A run writes to --out: metrics.csv, probe.csv (a linear probe of every block), samples_<step>.png,
ema_<step>.pt (EMA snapshots, for FID over training) and last.pt (the whole state). Read in order:
the flags, the data, the training step (one AdamW step on Eq. 3) and train(); then the run folder
(RunFolder, and RunFiles for the files: what keeps a run whole on disk); what a first reading can
skip comes last.
"""

import argparse
import copy
import csv
import datetime
import errno
import fcntl
import glob
import hashlib
import io
import math
import os
import pickle
import re
import shutil
import signal
import socket
import sys
import time
import uuid
import zipfile
from collections import namedtuple
from contextlib import ExitStack, contextmanager
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from layersync import (SiT, SiT_models, check_layersync_pairs, default_layersync_pair,
                       guided_velocity, linear_probe, sample, training_loss)

# the official train.py's flags (plain values) load with weights_only=True (torch 2.4 and later)
torch.serialization.add_safe_globals([argparse.Namespace])

# One process, or several under torchrun: plain facts, set once (as in nanoGPT). Each process trains
# data-parallel on its slice of the same global batch; the master process alone writes files.
ddp_world_size = int(os.environ.get("WORLD_SIZE", 1))
ddp = ddp_world_size > 1
ddp_rank = int(os.environ.get("RANK", 0))
ddp_local_rank = int(os.environ.get("LOCAL_RANK", 0))
master_process = ddp_rank == 0
STOP_CHECK_EVERY = 10  # under torchrun, steps between agreeing on a Ctrl-C or SIGTERM
NEVER = torch.iinfo(torch.long).max  # the step of the first non-finite loss, while there is none


def fail(message: str):
    """Stop with a one-line message (no traceback): the user has something to fix."""
    raise SystemExit(f"error: {message}")


def say(*args, **kwargs):
    if master_process:
        tqdm.write(" ".join(map(str, args)), **kwargs)


# ------------------------------------------------------------------ command line
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", default="cifar10", help="'cifar10', 'sklearn-digits' (offline: "
                   "scikit-learn's 1,797 digits) or a folder with one sub-folder per class")
    d.add_argument("--data-dir", default="./data", help="where CIFAR-10 is (or is downloaded to)")
    d.add_argument("--image-size", type=int, default=32, help="a folder's, centre-cropped")
    d.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True, help="flips")
    m = p.add_argument_group("model")
    m.add_argument("--model", default="SiT-S/2", choices=sorted(SiT_models), help="SiT preset")
    for name in OVERRIDES:
        m.add_argument(f"--{name.replace('_', '-')}", type=int, help="override the preset's value")
    s = p.add_argument_group("LayerSync")
    s.add_argument("--layersync-weight", type=float, default=0.2, help="lambda of Eq. 3; 0: none")
    s.add_argument("--layersync-pairs", help="'k:k2,...' 1-indexed blocks, student k < teacher k2 "
                   "(default: 8:16 of 28 scaled to the depth, 3:7 for 12 blocks)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=int, default=50_000, help="total optimiser steps")
    o.add_argument("--batch-size", type=int, default=256, help="the global batch")
    o.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate")
    o.add_argument("--weight-decay", type=float, default=0.0)
    o.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm; 0 = none")
    o.add_argument("--ema-decay", type=float, default=0.9999, help="reached after a warm-up")
    o.add_argument("--seed", type=int, default=0)
    h = p.add_argument_group("hardware")
    h.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else
                   "cpu")
    h.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 on CUDA, else fp32")
    h.add_argument("--no-compile", action="store_true", help="no torch.compile (default: on CUDA)")
    r = p.add_argument_group("outputs")
    r.add_argument("--out", default="runs/layersync", help="output folder")
    r.add_argument("--resume", action="store_true", help="continue <out>/last.pt up to --steps; "
                   "a flag not given is the checkpoint's")
    r.add_argument("--log-every", type=int, default=100)
    r.add_argument("--sample-every", type=int, default=10_000)
    r.add_argument("--sample-steps", type=int, default=50, help="Heun steps for the sample grids")
    r.add_argument("--ckpt-every", type=int, default=5_000)
    r.add_argument("--keep-every", type=int, default=5_000, help="keep the EMA weights as "
                   "<out>/ema_<step>.pt, for sample.py --fid RUN_DIR (0 = none)")
    r.add_argument("--probe-every", type=int, help="linear probe of every block into "
                   "<out>/probe.csv (default: --sample-every; 0 = off)")
    r.add_argument("--probe-t", type=probe_levels, default="1.0,0.5", help="its noise levels")
    if not master_process:  # under torchrun, rank 0 alone reports a bad flag
        p.print_usage = p.print_help = lambda *_, **__: None
        p.exit = lambda status=0, message=None: sys.exit(status)
    args = p.parse_args(argv)
    changed = {}
    if args.resume:  # a flag not given is the checkpoint's
        args, changed = flags_from_checkpoint(p, argv, args.out)
    args.changed = changed
    args.probe_every = args.sample_every if args.probe_every is None else args.probe_every
    args.precision = args.precision or ("bf16" if args.device.type == "cuda" else "fp32")
    args.compile = args.device.type == "cuda" and not args.no_compile
    check_args(args)
    return args


OVERRIDES = ("depth", "hidden_size", "num_heads", "patch_size")  # flags that change the preset
BUILT_IN_DATA = ("cifar10", "sklearn-digits")  # --data: these names, or an image folder
# what defines a run; its checkpoint keeps them, so that `--out DIR --resume` alone continues it
RUN_FLAGS = ("data", "data_dir", "image_size", "hflip", "model", *OVERRIDES, "layersync_weight",
             "layersync_pairs", "steps", "batch_size", "lr", "weight_decay", "grad_clip",
             "ema_decay", "seed", "precision", "log_every", "sample_every", "sample_steps",
             "ckpt_every", "keep_every", "probe_every", "probe_t")
# every number a flag takes, checked in one place: (the rule, as the message states it, its test)
AT_LEAST_1 = (">= 1", lambda v: v >= 1)
LIMITS = {**dict.fromkeys(("image_size", *OVERRIDES, "steps", "batch_size", "log_every",
                           "sample_every", "sample_steps", "ckpt_every"), AT_LEAST_1),
          **dict.fromkeys(("layersync_weight", "weight_decay", "grad_clip", "keep_every",
                           "probe_every"), (">= 0", lambda v: v >= 0)),
          "lr": ("> 0", lambda v: v > 0), "ema_decay": ("in [0, 1)", lambda v: 0 <= v < 1)}


def device_arg(text: str) -> torch.device:
    """--device: cpu, cuda or cuda:N; under torchrun, cuda is this process's GPU (LOCAL_RANK)."""
    name = f"cuda:{ddp_local_rank}" if text == "cuda" and ddp else text
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        fail(f"--device {name}: use cpu, cuda or cuda:N")
    if name != "cpu" and not torch.cuda.is_available():
        fail(f"--device {name} but no CUDA GPU is visible; use --device cpu")
    if ddp and text not in ("cpu", "cuda"):
        fail(f"--device {text}: under torchrun give cpu or cuda; each process takes GPU LOCAL_RANK")
    return torch.device(name)


def probe_levels(text: str) -> list:
    try:
        ts = [float(item) for item in text.split(",")]
    except ValueError:
        ts = []
    if not ts or not all(0 <= t <= 1 for t in ts):
        fail(f"--probe-t {text}: give noise levels in [0, 1], comma-separated, e.g. 1.0,0.5")
    return ts


def check_args(args):
    """What argparse cannot check, refused in one line before any data is read."""
    for name, (rule, ok) in LIMITS.items():
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and ok(value)):
            fail(f"--{name.replace('_', '-')} {value}: must be {rule}")
    if args.batch_size % ddp_world_size:
        fail(f"--batch-size {args.batch_size} is the global batch and must divide by the "
             f"{ddp_world_size} processes; use a multiple of {ddp_world_size}")
    config = model_config(args, num_classes=1)
    try:  # the model's own shape rules (patch divides image, heads divide width), on meta
        with torch.device("meta"):
            SiT(**config)
    except ValueError as error:
        fail(f"--model {args.model} with these overrides cannot be built: {error}")
    parent = existing_parent(args.out)
    if not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
        fail(f"--out {args.out}: {parent} is not a writable folder")
    if shutil.disk_usage(parent).total == 0:  # /proc, /sys: no storage, not a full disk
        fail(f"--out {args.out}: {parent} is a virtual filesystem that stores no files; choose a "
             f"folder on a disk")
    args.pairs = parse_pairs(args.layersync_pairs, config["depth"], args.layersync_weight)


def parse_pairs(text, depth: int, weight: float) -> list:
    """'3:7,2:9' -> [(3, 7), (2, 9)], validated against the depth (one-line error otherwise)."""
    if depth < 2:  # a 1-block baseline is fine; LayerSync needs a student and a teacher block
        if weight == 0 and text is None:
            return []
        fail(f"LayerSync needs at least 2 blocks (--depth {depth}); use --layersync-weight 0 "
             f"without --layersync-pairs to train a {depth}-block baseline")
    if text is None:
        return [default_layersync_pair(depth)]
    try:
        pairs = [tuple(int(k) for k in item.split(":")) for item in text.split(",")]
    except ValueError:  # not numbers: check_layersync_pairs says what a pair must be
        pairs = [text]
    try:
        return check_layersync_pairs(pairs, depth)
    except ValueError as error:
        fail(f"--layersync-pairs {text}: {error}")


def model_config(args, num_classes: int) -> dict:
    """Every SiT keyword of the run: enough to rebuild the model with SiT(**config)."""
    config = dict(SiT_models[args.model].keywords)
    config.update({k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None})
    config.update(input_size=args.image_size, in_channels=3, num_classes=num_classes)
    return config


def autocast(device: torch.device, precision: str):
    """The one precision rule, for the step, the grids and the probe: bf16 autocast iff bf16."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# ------------------------------------------------------------------ data
def from_pixels(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 -> floats in [-1, 1], the model's data range (sample_pixels: back)."""
    return pixels.float() / 127.5 - 1


def load_data(data: str, data_dir: str, image_size: int):
    """(uint8 images (N, 3, H, W), labels, class names); the readers: "data formats" below."""
    if data == "cifar10":
        if image_size != 32:
            fail("CIFAR-10 images are 32x32: drop --image-size or set it to 32")
        return load_cifar10(data_dir)
    if data == "sklearn-digits":
        return load_digits(image_size)
    return load_image_folder(data, image_size)


class DeviceBatches:
    """The whole dataset as uint8 on the device (CIFAR-10: 150 MB); shuffles and flips there, no
    loader workers. Order and flips come from a CPU generator whose state is checkpointed; every
    process draws the same global batch and keeps its slice, so any number of processes sees the
    same data order."""

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
        window = slice(self.position + ddp_rank * share, self.position + (ddp_rank + 1) * share)
        self.position += self.batch_size
        x, y = self.images[self.order[window]], self.labels[self.order[window]]
        return from_pixels(torch.where(self.flip[window, None, None, None], x.flip(-1), x)), y

    def state_dict(self):
        return {"epoch_start": self.epoch_start, "position": self.position}

    def load_state_dict(self, state):  # redraw the epoch, then go to the position
        self.generator.set_state(state["epoch_start"])
        self.new_epoch()
        self.position = state["position"]


# ------------------------------------------------------------------ the training step
@torch.no_grad()
def update_ema(ema_params, params, step: int, max_decay: float):
    # warm-up: decay (1 + step) / (10 + step), so that short runs still get a usable EMA
    decay = min(max_decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(ema_params, params, 1 - decay)


def train_step(args, parts, x, y, step: int):
    """One AdamW step on Eq. 3, then the EMA. No host sync: what it returns stays on the device."""
    with autocast(x.device, args.precision):
        losses = training_loss(parts.forward, x, y, args.pairs, args.layersync_weight)
    parts.optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    params = parts.optimizer.param_groups[0]["params"]  # the model's parameters, listed once
    # --grad-clip 0: no clipping, but the norm is still measured for metrics.csv
    grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or math.inf)
    parts.optimizer.step()
    update_ema(parts.ema_params, params, step, args.ema_decay)
    return losses, grad_norm


def build(args, config: dict, device) -> SimpleNamespace:
    """The SiT, its EMA, AdamW, and `forward`: the model as the step calls it (DDP, compiled)."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = SiT(**config).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # per rank, identical on every rank
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    forward = model
    if ddp:  # gradients all-reduced in buckets during the backward
        device_ids = [device.index] if device.type == "cuda" else None
        forward = DistributedDataParallel(model, device_ids=device_ids)
    if args.compile:
        forward = torch.compile(forward)  # compiled around DDP, so they overlap
    torch.manual_seed(args.seed * 1_000_003 + ddp_rank)  # then each rank its own noise, t, dropout
    return SimpleNamespace(model=model, ema=ema, optimizer=optimizer, forward=forward,
                           ema_params=list(ema.parameters()))


# ------------------------------------------------------------------ training
def train(args):
    with RunFolder(args) as run:  # --out held by this run alone; every refusal comes first
        if run.nothing_to_do:  # last.pt is already at --steps
            return
        parts = build(args, run.config["model"], args.device)
        batches = DeviceBatches(run.images, run.labels, args.batch_size, args.seed, args.device,
                                args.hflip)
        step = run.restore(parts, batches)  # on --resume: last.pt's state and step; else 0
        while step < args.steps and not run.stop_signal:
            x, y = batches.next()
            losses, grad_norm = train_step(args, parts, x, y, step)  # Eq. 3, AdamW, the EMA
            step += 1
            run.after_step(step, losses, grad_norm)  # logs, snapshots, probe, last.pt, grids
        run.finish(step)  # after a signal: its exit code; else the ranks' agreement, peak memory


# ========================== the run folder: what keeps a run whole on disk
class RunFolder:
    """--out of one training run, behind one door: train() enters it (lock, refusals, identity,
    resume, disk), restores it, hands it each step, finishes it and leaves it (lock released)."""

    def __init__(self, args):
        self.args, self.ckpt_path = args, os.path.join(args.out, "last.pt")
        self.stop_signal = 0  # the signal that stops the run (0: none)
        self.locked = False  # whether rank 0 holds --out's lock yet
        self.held = ExitStack()  # the lock, then the signal handlers and the bar: released on exit

    def __enter__(self):
        """prepare() on every rank, CIFAR-10 on rank 0 first (it alone downloads it); a refusal on
        any rank stops them all. Rank 0 locks --out before reading it; --out is made only then."""
        # a download can outlast NCCL's 10-minute timeout: the others wait on the CPU, up to 2 hours
        group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=2)) if ddp else None
        prepared = error = None  # stays None: stop_together raises on any rank's error
        turns = (master_process, not master_process) if self.args.data == "cifar10" else (True,)
        with self.held:  # released here on a refusal; kept (pop_all) once the run is open
            for my_turn in turns:
                if my_turn:
                    try:
                        self.hold_out()
                        prepared = prepare(self.args)
                    except SystemExit as refusal:
                        error = str(refusal.code)
                stop_together(error, group)
            self.nothing_to_do = prepared is None
            if prepared:
                vars(self).update(prepared)  # checkpoint, images, labels, classes, probe, config
                on_rank_0(self.make_out)
            self.held = self.held.pop_all()
        return self

    def __exit__(self, *error):
        self.held.close()

    def hold_out(self):
        """Rank 0 locks --out, once it exists, while the run is open: one trainer per folder."""
        out = self.args.out
        if master_process and os.path.isdir(out) and not self.locked:
            self.held.enter_context(RunFiles.lock(
                os.path.join(out, LOCK_FILE), f"--out {out}: another trainer is running in this "
                "folder", "wait for it to end, stop it (Ctrl-C saves), or choose another --out"))
            self.locked = True

    def make_out(self):
        """--out, held, and in it the run's id: at the start, or for a last.pt moved alone into a
        folder."""
        args, marker = self.args, os.path.join(self.args.out, RUN_ID_FILE)
        with failing_write(args.out):
            os.makedirs(args.out, exist_ok=True)
        self.hold_out()  # a new run: a second one started at once on the folder is refused here
        snapshots = glob.glob(SNAPSHOTS, root_dir=args.out)
        if not args.resume and (os.path.exists(self.ckpt_path) or snapshots):  # made meanwhile
            fail(f"--out {args.out}: another run wrote into it while this one prepared; choose "
                 f"another --out")
        for stale in glob.glob("*.pt.*.tmp", root_dir=args.out):  # a killed trainer's half-save
            os.remove(os.path.join(args.out, stale))
        if not (args.resume and os.path.exists(marker)):
            RunFiles.write(marker, lambda f: f.write(f"{self.config['run_id']}\n".encode()))

    def restore(self, parts, batches) -> int:
        """On --resume, last.pt's state; then the logs (kept up to that step), the progress bar and
        the Ctrl-C and SIGTERM handlers (StopSignals), until the run is left. Returns the step."""
        args, checkpoint = self.args, self.checkpoint
        self.parts, self.batches = parts, batches
        self.step = resume(checkpoint, parts, batches, args) if checkpoint else 0
        elapsed = checkpoint["elapsed_s"] if checkpoint else 0
        self.checkpoint = None  # its tensors are copied into the model, EMA and optimizer: freed
        say(describe_run(args, self, parts.model))
        self.metrics = CsvLog(os.path.join(args.out, "metrics.csv"), METRICS_FIELDS, self.step)
        self.probes = self.probe_data and CsvLog(os.path.join(args.out, "probe.csv"),
                                                 PROBE_FIELDS, self.step)
        # the first step whose loss was not finite, kept on the device: no host sync per step
        self.first_non_finite = torch.full((), NEVER, device=args.device)
        self.interval = Interval(self.step, args, elapsed)
        self.outputs = (args.ckpt_every, args.keep_every, args.sample_every, args.probe_every)
        self.signals = StopSignals(args.device)
        self.held.callback(self.signals.restore)
        self.bar = self.held.enter_context(tqdm(total=args.steps, initial=self.step,
                                                dynamic_ncols=True, disable=not master_process))
        return self.step

    def after_step(self, step: int, losses: dict, grad_norm: torch.Tensor):
        """What is due after `step`, in this order: the log, a signal, the non-finite check, the
        EMA snapshot, the probe, last.pt, the sample grid."""
        args, parts = self.args, self.parts
        due = lambda every: every and (step % every == 0 or step == args.steps)  # noqa: E731
        bad_now = self.first_non_finite.clamp(max=step)  # steps only grow: the minimum is the first
        finite = losses["loss"].isfinite()
        self.first_non_finite = torch.where(finite, self.first_non_finite, bad_now)
        self.interval.add(losses, grad_norm)
        self.bar.update(1)
        if due(args.log_every):  # the mean losses since the last log: the only host sync
            self.check_finite()
            self.bar.set_postfix_str(self.interval.write(self.metrics, step, args))
        pause = time.perf_counter()
        self.stop_signal = self.signals.agreed(step, args.steps)  # every rank stops at one step
        if self.stop_signal or any(map(due, self.outputs)):
            self.check_finite()  # nothing is saved, drawn or probed from non-finite weights
        if due(args.keep_every):  # an EMA snapshot kept for good: FID over training
            save_snapshot(os.path.join(args.out, f"ema_{step:07d}.pt"), parts, step, self.config)
        if self.probes and due(args.probe_every):  # every block, on rank 0 only
            on_rank_0(probe_into, self.probes, parts.ema, self.probe_data, args, step)
        # last.pt after this step's snapshot and probe rows: if one of them cannot be written,
        # the resume starts before this step and writes it again
        if due(args.ckpt_every) or self.stop_signal:
            save_checkpoint(self.ckpt_path, parts, step, self.config, self.batches,
                            time.perf_counter() - self.interval.start)
        if due(args.sample_every) and master_process:  # EMA samples, the same noise each time
            png = os.path.join(args.out, f"samples_{step:07d}.png")
            sample_grid(parts.ema, self.config["model"], png, args.sample_steps, args.precision)
        self.interval.time += time.perf_counter() - pause  # img_per_s counts training time only

    def check_finite(self):
        """A non-finite loss stops every rank in one line, before anything is saved."""
        if ddp:  # the earliest bad step of any rank: a NaN spreads to all ranks in one step
            dist.all_reduce(self.first_non_finite, op=dist.ReduceOp.MIN)
        if (bad := int(self.first_non_finite)) != NEVER:
            fail(f"the loss became non-finite at step {bad}; nothing saved: {self.ckpt_path} keeps "
                 f"the last good state. Try a lower --lr or --grad-clip, or --precision fp32.")

    def finish(self, step: int):
        args = self.args
        if self.stop_signal:
            say(f"interrupted by {signal.Signals(self.stop_signal).name}: saved step {step} of "
                f"{args.steps} to {self.ckpt_path}; rerun with --out {args.out} --resume to "
                f"continue", file=sys.stderr)
            raise SystemExit(128 + self.stop_signal)  # the shell's code for "killed by this signal"
        if ddp:
            check_ranks_agree(self.parts.model)
        if args.device.type == "cuda":
            say(f"peak GPU memory {torch.cuda.max_memory_allocated(args.device) / 2**30:.2f} GiB")


class RunFiles:
    """The files of any run, the trainer's and sample.py's alike: read as data, never as code
    (read, load_checkpoint), written whole or not at all (write, append, write_grid; a failure
    raises WriteFailed), one run per folder (check_one_run), the space they need (check_space)."""

    class WriteFailed(Exception):
        """A file could not be written (a full disk, a quota, a size limit): which, and why."""

        def __init__(self, path: str, cause: OSError):
            super().__init__(f"could not write {path} ({cause.strerror or cause})")
            self.path, self.errno = path, cause.errno

    @staticmethod
    def read(path: str, mmap: bool = True):
        """torch.load(path) as data, never as code, or one line saying what the file is instead. A
        folder reads its last.pt."""
        path = os.path.join(path, "last.pt") if os.path.isdir(path) else path
        if not os.path.isfile(path):
            fail(f"no checkpoint at {path}")
        if not zipfile.is_zipfile(path):  # a CSV, a PNG: torch's message would say to re-save it
            fail(f"{path} is not a torch checkpoint (torch.save writes a zip archive)")
        try:  # weights_only: the file is data; mmap: under torchrun the processes share one copy
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as error:  # refused before anything in it ran
            needs = (re.search(r"GLOBAL ([\w.]+)", str(error)) or [None, "a pickled object"])[1]
            fail(f"{path} needs code to load ({needs}), so it was not loaded; a model saved whole "
                 f"with torch.save(model) holds its code: save model.state_dict() instead")
        except Exception as error:
            fail(f"cannot read checkpoint {path} ({type(error).__name__}: {error})")

    @staticmethod
    def load_checkpoint(path: str, mmap: bool = True) -> dict:
        """A train_cifar.py last.pt, or a one-line error saying why it is not one."""
        checkpoint = RunFiles.read(path, mmap)
        saved = checkpoint.keys() if isinstance(checkpoint, dict) else set()
        saves = {"model", "ema", "optimizer", "step", "config", "rng", "elapsed_s"}
        missing = sorted(saves - saved)
        if "config" in saved:  # and in it, what identifies the run
            config = checkpoint["config"] if isinstance(checkpoint["config"], dict) else {}
            missing += sorted({"flags", "run_id", "history"} - config.keys())
        if missing:
            fail(f"{path} is not a checkpoint of this train_cifar.py: it holds {sorted(saved)[:8]} "
                 f"and lacks {', '.join(missing)} (an earlier version or another program wrote "
                 f"it); start a new run in another --out")
        return checkpoint

    @staticmethod
    def write(path: str, write):
        """write(file) into this process's own temporary file, then renamed onto `path`: a failed
        write or a kill leaves `path` as it was; a failed write leaves no temporary file either."""
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with failing_write(path):
                with open(tmp, "wb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())  # on disk before the rename makes it the file
                os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @staticmethod
    def append(path: str, fields: list, rows: list):
        """CSV rows appended whole or not at all (a new file is written with its header): a failed
        write cuts the file back to the complete rows it had."""
        if not os.path.exists(path):
            return RunFiles.write(path, lambda f: f.write(csv_text(fields, rows, header=True)))
        with failing_write(path), open(path, "ab", buffering=0) as f:
            end = f.tell()
            unwritten = memoryview(csv_text(fields, rows))
            try:  # unbuffered: a write that fills the disk stops short, and the next one fails
                while unwritten:
                    unwritten = unwritten[f.write(unwritten):]
            except OSError:
                f.truncate(end)
                raise

    @staticmethod
    def write_grid(pixels: torch.Tensor, path: str, columns: int):
        """uint8 images (N, 3, H, W) as one PNG/JPEG grid, `columns` to a row; images under 64
        pixels are enlarged (nearest neighbour), so that a sample can be judged by eye."""
        from PIL import Image
        from torchvision.utils import make_grid
        scale = max(1, 64 // pixels.shape[-1])
        pixels = pixels.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
        image = Image.fromarray(make_grid(pixels.cpu(), nrow=columns).permute(1, 2, 0).numpy())
        image_format = Image.registered_extensions()[os.path.splitext(path)[1].lower()]
        RunFiles.write(path, lambda f: image.save(f, format=image_format))

    @staticmethod
    def check_one_run(folder: str, flag: str):
        """A folder whose files name more than one run (a last.pt or snapshots copied in from
        another) is refused by --resume, --fid RUN_DIR and --compare: it would join two runs."""
        ids = {}  # {file: the id of the run that wrote it}; None: written before run ids existed
        for name in ["last.pt", *sorted(glob.glob(SNAPSHOTS, root_dir=folder))]:
            if os.path.isfile(os.path.join(folder, name)):
                config = RunFiles.read(os.path.join(folder, name)).get("config", {})
                ids[name] = config.get("run_id")
        if os.path.isfile(os.path.join(folder, RUN_ID_FILE)):  # it speaks for the logs
            with open(os.path.join(folder, RUN_ID_FILE)) as f:
                ids[RUN_ID_FILE] = f.read().strip()
        if len(set(ids.values())) > 1:
            runs = ", ".join(f"{name}: {run_id}" for name, run_id in ids.items())
            fail(f"{flag} {folder}: its files come from different runs ({runs}); one folder holds "
                 f"one run: a copied last.pt goes alone into a new folder, to --resume there")

    @staticmethod
    def check_space(path: str, need: int, what: str, advice: str):
        """`what` takes `need` bytes where `path` goes: refused in one line (ending with `advice`)
        if they cannot fit, a warning if they would leave under a fifth of the space free there."""
        folder = existing_parent(path)
        free = shutil.disk_usage(folder).free
        what = f"{what} take about {in_units(need)} in {folder}"
        if need > free:
            fail(f"{what}, but only {in_units(free)} are free there: {advice}")
        if free - need < free / 5:
            say(f"warning: {what}, leaving {in_units(free - need)} of the {in_units(free)} free "
                f"there")

    @staticmethod
    @contextmanager
    def lock(path: str, refusal: str, advice: str):
        """The lock file `path` (made empty if missing) held for the `with`, by one process at a
        time; another is refused in one line: `refusal`, its holder, `advice`. flock: the operating
        system releases it when the holder exits, however it dies: nothing is left to clean up."""
        try:
            held = open(path, "ab")  # never written: a refused process changes nothing
        except OSError as error:
            fail(f"cannot open the lock file {path} ({error.strerror or error})")
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(held)
            held.close()
            fail(f"{refusal} ({holder}); {advice}")
        except OSError as error:  # a filesystem without flock (e.g. Lustre without -o flock)
            say(f"warning: cannot lock {path} ({error.strerror}): nothing stops a second process "
                f"on this folder")
        with held:
            yield


# ------------------------------------------------------------------ opening a run
def prepare(args):
    """Everything that can refuse the run, before the model is built; None: nothing to do."""
    ckpt_path = os.path.join(args.out, "last.pt")
    if not args.resume and os.path.exists(ckpt_path):
        fail(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    if not args.resume and glob.glob(SNAPSHOTS, root_dir=args.out):  # a run stopped before last.pt
        fail(f"{args.out} holds snapshots (ema_<step>.pt) of an earlier run that saved no last.pt "
             f"to resume: remove them, or choose another --out")
    # read whole, not memory-mapped: a mapped last.pt would keep its disk space once replaced
    checkpoint = RunFiles.load_checkpoint(ckpt_path, mmap=False) if args.resume else None
    if checkpoint is not None:  # before anything is written
        RunFiles.check_one_run(args.out, "--resume")
    images, labels, classes = load_data(args.data, args.data_dir, args.image_size)
    if len(images) < args.batch_size:  # before --out is made
        fail(f"the dataset has {len(images)} images, fewer than --batch-size {args.batch_size}")
    flags = {name: getattr(args, name) for name in RUN_FLAGS}
    flags.update(data=args.data if args.data in BUILT_IN_DATA else os.path.realpath(args.data),
                 data_dir=os.path.abspath(args.data_dir))
    config = {k: flags[k] for k in ("hflip", "layersync_weight", "batch_size", "lr", "weight_decay",
                                    "grad_clip", "ema_decay", "seed", "precision", "data")}
    config.update(model=model_config(args, len(classes)), classes=list(classes),
                  layersync_pairs=[list(p) for p in args.pairs], flags=flags)
    # The run's identity, kept in last.pt and every snapshot: an id made once, at its start (under
    # torchrun each rank makes one, and rank 0's is the one written), and the settings that its
    # resumes changed, with the step of each change
    config.update(run_id=uuid.uuid4().hex[:12], history=[])
    if checkpoint is not None:  # before building anything: a mismatch costs no time
        check_resume_config(checkpoint["config"], config, ckpt_path)
        history = checkpoint["config"]["history"]
        if args.changed:
            history = [*history, {"step": checkpoint["step"], "changes": args.changed}]
        config.update(run_id=checkpoint["config"]["run_id"], history=history)
        if checkpoint["step"] >= args.steps:
            say(f"{ckpt_path} is at step {checkpoint['step']} >= --steps {args.steps}: "
                f"nothing to do; give a larger --steps to train on")
            return None
    check_disk_space(args, config["model"], checkpoint["step"] if checkpoint else 0)
    probe = probe_split(args.data, args.data_dir, images, labels) if args.probe_every else None
    return dict(checkpoint=checkpoint, images=images, labels=labels, classes=classes,
                probe_data=probe, config=config)


def check_disk_space(args, model_config: dict, step: int):
    """What the run will still write into --out, against the space free there (RunFiles.
    check_space). From the model's own sizes: last.pt holds the weights, the EMA and AdamW's two
    moments per parameter, and is written twice while it is replaced; a snapshot holds the EMA; a
    grid is at most its raw pixels."""
    with torch.device("meta"):  # sizes without memory
        model = SiT(**model_config)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    moments = 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    checkpoint = 2 * weights + moments
    snapshots = writes_between(step, args.steps, args.keep_every)
    grids = writes_between(step, args.steps, args.sample_every)
    side = max(64, model_config["input_size"]) + 2  # enlarged to 64 pixels (write_grid), a border
    grid = min(model_config["num_classes"], 20) * 8 * 3 * side * side
    resumed = step > 0  # its last.pt is on the disk already: one more copy while it is replaced
    need = checkpoint * (1 if resumed else 2) + snapshots * weights + grids * grid
    what = (f"the files this run will still write (last.pt of {in_units(checkpoint)} "
            f"{'once more' if resumed else 'twice'} while it is replaced, {snapshots} "
            f"ema_<step>.pt of {in_units(weights)}, {grids} grids)")
    RunFiles.check_space(args.out, need, what, "pass --keep-every 0 (no snapshots) or a larger "
                         "--keep-every, another --out, or free some space")


def writes_between(start: int, end: int, every: int) -> int:
    """How many of the steps start+1..end write an output that comes every `every` steps and at the
    end (0: never)."""
    return end // every - start // every + (end % every != 0) if every and end > start else 0


def in_units(size: float) -> str:
    """A number of bytes as people read it: 1234567 -> '1.23 MB'."""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if size < 1000:
            break
        size /= 1000
    return f"{size:.3g} {unit}"


def existing_parent(path: str) -> str:
    """The folder itself, or the nearest folder above it that exists (--out is made later)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def describe_run(args, run, model) -> str:
    """The model that runs (preset, what changed it, shape), LayerSync, the data, the device."""
    c, preset = run.config["model"], SiT_models[args.model].keywords
    changed = [f"--{k.replace('_', '-')}" for k in OVERRIDES if c[k] != preset[k]]
    name = f"{args.model} changed by {' '.join(changed)}" if changed else args.model
    shape = (f"depth {c['depth']}, width {c['hidden_size']}, {c['num_heads']} heads, patch "
             f"{c['patch_size']}, {c['input_size']}x{c['input_size']} images")
    size = (f"{sum(p.numel() for p in model.parameters()):,} parameters, "
            f"{train_flops_per_image(c) / 1e9:.3g} GFLOP per training image")
    layersync = f"LayerSync lambda {args.layersync_weight}" if args.layersync_weight else (
        "LayerSync off (baseline)")
    data = (f"{len(run.images)} images in {len(run.classes)} classes, flips "
            f"{'on' if args.hflip else 'off'}")
    device = f"{args.device.type} {args.precision}"
    if ddp:
        device += f", {ddp_world_size} processes"
    return f"{name}: {shape}, {size}; {layersync}, pairs {args.pairs}; {data}; {device}"


def flags_from_checkpoint(parser, argv, out: str) -> tuple:
    """--resume: the checkpoint's run flags become the parser's defaults, so that a flag not given
    is the checkpoint's and a given one changes that setting. Returns the flags and the changes,
    {flag: [old, new]}, to be listed and kept in the run's history (check_resume_config refuses
    a change of the model, the data or the LayerSync arm)."""
    path = os.path.join(out, "last.pt")
    if not os.path.exists(path):  # prepare() says so
        return parser.parse_args(argv), {}
    stored = RunFiles.load_checkpoint(path)["config"]["flags"]
    parser.set_defaults(**stored)
    args = parser.parse_args(argv)
    changes = {}
    # data and pairs as typed: prepare() compares the resolved ones (and refuses other pairs)
    for name, old in stored.items():
        if name not in ("data", "data_dir", "layersync_pairs") and getattr(args, name) != old:
            changes[name] = [old, getattr(args, name)]
    return args, changes


def resume(checkpoint: dict, parts, batches, args) -> int:
    """Model, EMA, optimizer, data order and RNG streams as saved; returns the step."""
    step, ranks = checkpoint["step"], checkpoint["rng"]["ranks"]
    parts.model.load_state_dict(checkpoint["model"])
    parts.ema.load_state_dict(checkpoint["ema"])
    parts.optimizer.load_state_dict(checkpoint["optimizer"])
    for group in parts.optimizer.param_groups:  # the settings a resume may change
        group["lr"], group["weight_decay"] = args.lr, args.weight_decay
    if len(ranks) == ddp_world_size:  # the exact generators
        torch.set_rng_state(ranks[ddp_rank]["torch"])
        if args.device.type == "cuda" and "cuda" in ranks[ddp_rank]:
            torch.cuda.set_rng_state(ranks[ddp_rank]["cuda"], args.device)
    else:
        torch.manual_seed(args.seed * 1_000_003 + ddp_rank + 7919 * step)  # new per-rank streams
        say(f"note: the checkpoint was written by {len(ranks)} process(es), this run has "
            f"{ddp_world_size}: the data order and the global batch continue unchanged, the noise "
            f"and t streams are reseeded, so the run is not bit-identical to an uninterrupted one")
    batches.load_state_dict(checkpoint["rng"]["data"])
    changes = [f"--{name.replace('_', '-')} {old} -> {new}" for name, (old, new) in
               args.changed.items()]
    say(f"resumed at step {step} of {args.steps}; settings changed: {', '.join(changes) or 'none'}")
    return step


def check_resume_config(old: dict, new: dict, path: str):
    """Model, data, classes (labels would shift), seed (resumed streams ignore it) and the LayerSync
    arm (a baseline continued with LayerSync would be neither arm) must match."""
    fixed = ("data", "classes", "seed", "layersync_weight", "layersync_pairs")  # and the model
    old = {**old["model"], **{key: old.get(key) for key in fixed}}
    new = {**new["model"], **{key: new.get(key) for key in fixed}}
    diff = [f"{k}: {old.get(k)} in the checkpoint, {new.get(k)} now" for k in sorted(old | new)
            if old.get(k) != new.get(k)]
    if diff:
        fail(f"{path} belongs to another configuration ({'; '.join(diff)}); resume with the same "
             f"model, data, seed and LayerSync flags, or start a new run in another --out")


SNAPSHOTS = "ema_*.pt"  # EMA snapshots kept for good, ema_<step>.pt
RUN_ID_FILE = "run_id.txt"  # the id of the run that writes the folder, made at its start
LOCK_FILE = "train.lock"  # locked by the one trainer of the folder (flock), never written


# ------------------------------------------------------------------ checkpoints and snapshots
def save_checkpoint(path: str, parts, step: int, config: dict, batches, elapsed_s: float):
    """last.pt: the whole training state, enough to continue bit for bit, and the run's seconds
    (for metrics.csv). Rank 0 writes; a failed write stops every rank in one line."""
    generators = {"torch": torch.get_rng_state()}  # this rank's own noise, t and dropout streams
    if batches.device.type == "cuda":
        generators["cuda"] = torch.cuda.get_rng_state(batches.device)
    ranks = [generators] * ddp_world_size  # under torchrun, filled by the gather below
    if ddp:
        dist.all_gather_object(ranks, generators)
    state = {"model": parts.model.state_dict(), "ema": parts.ema.state_dict(),
             "optimizer": parts.optimizer.state_dict(), "step": step, "config": config,
             "rng": {"data": batches.state_dict(), "ranks": ranks}, "elapsed_s": elapsed_s}
    on_rank_0(RunFiles.write, path, lambda f: torch.save(state, f))  # torch writes through f


def save_snapshot(path: str, parts, step: int, config: dict):
    """ema_<step>.pt, kept for good: the EMA weights, the step and the config, for FID over
    training (sample.py --fid RUN_DIR)."""
    state = {"ema": parts.ema.state_dict(), "step": step, "config": config}
    on_rank_0(RunFiles.write, path, lambda f: torch.save(state, f))


# ------------------------------------------------------------------ the log line and metrics.csv
class Interval:
    """Sums of the losses on the device since the last log, and the training time they took; the
    log line spells out Eq. 3 and, on a GPU of known peak, the model FLOPs utilisation (MFU)."""

    def __init__(self, step: int, args, elapsed: float):  # elapsed: before a resume
        self.totals = torch.zeros(4, device=args.device)  # loss, fm, layersync, grad norm
        self.step, self.time, self.start = step, time.perf_counter(), time.perf_counter() - elapsed
        name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else ""
        peak = next((f for key, f in PEAK_BF16_FLOPS.items() if key in name), None)
        self.peak = peak * ddp_world_size if peak and args.precision == "bf16" else None
        self.flops_per_image = train_flops_per_image(model_config(args, 10))

    def add(self, losses: dict, grad_norm):
        self.totals += torch.stack([losses["loss"].detach(), losses["fm"], losses["layersync"],
                                    grad_norm])

    def write(self, metrics, step: int, args) -> str:
        if ddp:  # the logged losses are means over all ranks
            dist.all_reduce(self.totals)
            self.totals /= ddp_world_size
        mean = (self.totals / (step - self.step)).tolist()
        now = time.perf_counter()
        images_per_s = args.batch_size * (step - self.step) / (now - self.time)
        row = dict(zip(METRICS_FIELDS, [step, *mean, images_per_s, now - self.start]))
        on_rank_0(metrics.write, [row])
        self.totals.zero_()
        self.step, self.time = step, now
        # Eq. 3 spelled out: the total is fm + lambda * (-cosine), so it can go below 0
        lam, fm, sync = args.layersync_weight, f"fm {mean[1]:.4f}", f"layersync {mean[2]:.3f}"
        terms = f"{fm} + {lam:g} x {sync} = {mean[0]:.4f}" if lam else f"{fm}, {sync}"
        mfu = images_per_s * self.flops_per_image / self.peak if self.peak else None  # all ranks
        return f"{terms}, {images_per_s:.0f} img/s" + (f", MFU {100 * mfu:.1f}%" if mfu else "")


# dense bf16 peak FLOP/s from the vendors' data sheets, for MFU; matched against the device name
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12,
                   "L40S": 362e12, "L4": 121e12, "RTX 4090": 165e12}


def train_flops_per_image(config: dict) -> float:
    """3 forwards (the backward costs two) of depth * (12 T H^2 + 2 T^2 H) multiply-adds for T
    tokens of width H, plus patch in and out; 2 FLOPs per multiply-add."""
    tokens, h = (config["input_size"] // config["patch_size"]) ** 2, config["hidden_size"]
    patch_io = 2 * tokens * h * config["patch_size"] ** 2 * config["in_channels"]
    return 6 * (config["depth"] * (12 * tokens * h * h + 2 * tokens * tokens * h) + patch_io)


# ------------------------------------------------------------------ CSV logs that survive a resume
METRICS_FIELDS = ["step", "loss", "fm", "layersync", "grad_norm", "img_per_s", "elapsed_s"]
PROBE_FIELDS = ["step", "t", "block", "accuracy", "teacher_cosine", "relative_update"]


class CsvLog:
    """A CSV that rank 0 alone writes (on_rank_0), rows whole or not at all; a resume keeps its
    readable rows up to the restart step."""

    def __init__(self, path: str, fields: list, resume_step: int = 0):
        self.path, self.fields = path, fields
        on_rank_0(self.restart, resume_step)

    def restart(self, resume_step: int):
        rows = []
        if resume_step and os.path.exists(self.path):
            with open(self.path, newline="") as f:
                rows = [row for row in csv.DictReader(f) if readable(row, resume_step)]
        # read back as text, written unchanged; the file is replaced whole, so a failure keeps it
        RunFiles.write(self.path, lambda f: f.write(csv_text(self.fields, rows, header=True)))

    def write(self, rows: list):
        RunFiles.append(self.path, self.fields, rows)


def csv_text(fields: list, rows: list, header: bool = False) -> bytes:
    """Rows as CSV (floats to 6 significant digits), after the header if asked."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields)
    if header:
        writer.writeheader()
    writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()}
                     for row in rows)
    return text.getvalue().encode()


def readable(row: dict, resume_step: int) -> bool:
    """A CSV row up to the resume step, neither cut short by a kill nor spoiled by a hand edit."""
    try:
        [float(value) for value in row.values() if value != ""]  # None (cut short) or text: no
        return None not in row and int(row["step"]) <= resume_step
    except (TypeError, ValueError):
        return False


def lock_holder(held) -> str:
    """Who holds the flock of the open file `held`: 'pid N on HOST', read from Linux's /proc/locks
    (a line per lock: ... pid major:minor:inode ...)."""
    info = os.fstat(held.fileno())
    key = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        with open("/proc/locks") as locks:
            pids = [line.split()[4] for line in locks if "->" not in line and key in line.split()]
    except OSError:  # not Linux
        pids = []
    if not pids:  # on a network filesystem the holder may be another machine
        return "held by a process that this machine cannot name"
    return f"held by pid {pids[0]} on {socket.gethostname()}"


@contextmanager
def failing_write(path: str):
    """A failed write to `path` raised as WriteFailed. torch's zip writer reports it as a
    RuntimeError raised while handling the OSError: that is caught too, and nothing else is."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        cause = error if isinstance(error, OSError) else error.__context__
        if not isinstance(cause, OSError):
            raise
        raise RunFiles.WriteFailed(path, cause) from None


# ========================== what a first reading can skip: formats, probe, grids, torchrun, signals
# ------------------------------------------------------------------ data formats
def load_cifar10(data_dir: str, train: bool = True):
    from torchvision.datasets import CIFAR10
    existed = os.path.exists(data_dir)
    try:
        data = CIFAR10(data_dir, train=train, download=True)
    except Exception as error:  # offline, a broken archive, a truncated batch file
        if not (existed or ddp):  # the failed download made it: a refusal leaves nothing behind
            shutil.rmtree(data_dir, ignore_errors=True)
        fail(f"could not load CIFAR-10 from {os.path.abspath(data_dir)} ({type(error).__name__}: "
             f"{error}). Without internet, download cifar-10-python.tar.gz from "
             f"https://www.cs.toronto.edu/~kriz/cifar.html and put it in that folder (it is "
             f"unpacked on first use), or pass --data PATH for an image folder.")
    images = torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous()  # (N, 3, 32, 32) uint8
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


def read_image(path: str):
    """ImageFolder's loader: any image Pillow opens, decoded now (so a corrupt file is named here),
    as 8-bit RGB. Pillow's convert("RGB") clips 16-bit values (mid-grey turns white): rescaled."""
    import numpy as np
    from PIL import Image
    try:
        with Image.open(path) as opened:
            image = opened.copy()  # decoded: still usable once the file is closed
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        fail(f"cannot read image {path} ({type(error).__name__}: {error}); fix or remove that file")
    if image.mode.startswith("I"):  # I;16* (16-bit PNG/TIFF) or I (how older Pillows open them)
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            fail(f"{path}: integer pixels outside 0..65535; save it as an 8- or 16-bit image")
        image = Image.fromarray(np.round(values / 257.0).astype(np.uint8), "L")  # 65535 -> 255
    elif image.mode == "F":
        fail(f"{path}: floating-point pixels have no fixed range; save it as an 8- or 16-bit image")
    elif image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        # transparent pixels become white, as on a page, not the arbitrary colour hidden under alpha
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def load_image_folder(path: str, size: int):
    from torchvision import transforms
    from torchvision.datasets import ImageFolder
    if not os.path.isdir(path):
        fail(f"--data {path}: no such folder; give a folder with one sub-folder of images per "
             f"class, or a built-in dataset: {', '.join(BUILT_IN_DATA)}")
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


# ------------------------------------------------------------------ the probe's data
# The model side is layersync.linear_probe; here: which real images fit the classifier and which
# score it (the paper: Tiny-ImageNet and trained probes; here: closed form on the run's own data).
PROBE_FIT_IMAGES = 10_000
PROBE_SEED = 1234  # the fitted subset: the same for every run, apart from --seed
ProbeData = namedtuple("ProbeData", "fit scored description")  # fit, scored: (x1, labels)


def probe_split(data: str, data_dir: str, images, labels, encode=None) -> ProbeData:
    """On the CPU. CIFAR-10: a fixed 10,000-image subset of the training split fits, the
    10,000-image test split scores. An image folder: every 5th image of each class (in file-name
    order) scores, the rest (at most 10,000) fit; the generator still trains on all of them.
    encode: what the model reads, of images in [-1, 1] (a VAE's latents; default: the images)."""
    encode = encode or (lambda x: x)

    def to_input(pixels):  # in chunks: a VAE's float input of all images would not fit at once
        return torch.cat([encode(from_pixels(part)) for part in pixels.split(256)])
    if data == "cifar10":
        scored, scored_labels, _ = load_cifar10(data_dir, train=False)
        seeded = torch.Generator().manual_seed(PROBE_SEED)
        pick = torch.randperm(len(images), generator=seeded)[:PROBE_FIT_IMAGES]
        return ProbeData((to_input(images[pick]), labels[pick]), (to_input(scored), scored_labels),
                         "fit on 10,000 training images, scored on the test split")
    held = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        held[(labels == c).nonzero().flatten()[4::5]] = True
    if not held.any():  # never all: a class of n images holds n // 5 of them
        fail("the probe needs a class with at least 5 images (every 5th image of a class is held "
             "out to score the probe); add images or pass --probe-every 0")
    fit = (~held).nonzero().flatten()
    if len(fit) > PROBE_FIT_IMAGES:  # a seeded sample, not the first classes in file order
        pick = torch.randperm(len(fit), generator=torch.Generator().manual_seed(PROBE_SEED))
        fit = fit[pick[:PROBE_FIT_IMAGES].sort().values]
    scored = f"every 5th image of each class ({int(held.sum())})"
    return ProbeData((to_input(images[fit]), labels[fit]), (to_input(images[held]), labels[held]),
                     f"fit on {len(fit)} images, scored on {scored}")


def run_probe(model: SiT, data: ProbeData, ts: list, pairs: list, precision: str,
              csv_path=None, step: int = 0):
    """layersync.linear_probe at the run's precision, cosines to the first pair's teacher block (a
    baseline's too, without gradient); given csv_path, its rows go there too (sample.py --probe)."""
    teacher = pairs[0][1] if pairs else None
    with autocast(model.pos_embed.device, precision):
        probe = linear_probe(model, data.fit, data.scored, ts, teacher)
    if csv_path:  # the whole file or none
        rows = probe_rows(step, probe)
        RunFiles.write(csv_path, lambda f: f.write(csv_text(PROBE_FIELDS, rows, header=True)))
    return probe


def probe_into(log, model, data: ProbeData, args, step: int):
    """During training: the probe of every block, its rows into probe.csv and a summary line."""
    probe = run_probe(model, data, args.probe_t, args.pairs, args.precision)
    log.write(probe_rows(step, probe))
    say(f"probe at step {step}: {probe_summary(probe, args.pairs)}")


def probe_summary(probe, pairs: list) -> str:
    """Per noise level: the best block, and the LayerSync student and teacher blocks."""
    def line(t, acc):
        roles = [("best block", max(acc, key=acc.get)),
                 *zip(("student", "teacher"), pairs[0] if pairs else ())]
        return f"t={t:g}: " + ", ".join(f"{role} {k} {100 * acc[k]:.1f}%" for role, k in roles)
    return "; ".join(line(t, acc) for t, acc in probe.accuracy.items())


def probe_rows(step: int, probe) -> list:
    """layersync.BlockProbe -> probe.csv rows (teacher_cosine is empty without a teacher)."""
    return [{"step": step, "t": t, "block": k, "accuracy": accuracy,
             "teacher_cosine": probe.teacher_cosine.get(t, {}).get(k, ""),
             "relative_update": probe.relative_update[t][k]}
            for t, blocks in probe.accuracy.items() for k, accuracy in blocks.items()]


# ------------------------------------------------------------------ sample grids
def sample_pixels(model, noise, labels, steps: int, precision: str, method: str = "heun",
                  cfg_scale: float = 1.0, decode=None) -> torch.Tensor:
    """uint8 images (N, 3, H, W) by the ODE sampler (training's grids and sample.py's images);
    decode: the model's output -> images in [-1, 1] (a latent model's VAE)."""
    with autocast(noise.device, precision):
        x = sample(guided_velocity(model, labels, cfg_scale), noise, steps, method)
    x = decode(x) if decode else x  # outside autocast: the VAE in fp32, as the official code
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [-1, 1] -> 0..255


def sample_grid(ema, config: dict, path: str, steps: int, precision: str):
    """EMA samples, a row of 8 per class (at most 20 rows), from the same noise and labels at every
    step of every run; a grid is worth a warning, never the run."""
    rows, size, device = min(config["num_classes"], 20), config["input_size"], ema.pos_embed.device
    noise = torch.randn(rows * 8, config["in_channels"], size, size,
                        generator=torch.Generator().manual_seed(2026))
    labels = torch.arange(rows).repeat_interleave(8)
    try:
        pixels = sample_pixels(ema, noise.to(device), labels.to(device), steps, precision)
        RunFiles.write_grid(pixels, path, columns=8)
    except RunFiles.WriteFailed as error:
        say(f"warning: {error}")


# ------------------------------------------------------------------ agreement between processes
# A decision that could differ between ranks (a non-finite loss, a signal, a failed save) is made
# by a collective, so no rank waits alone in one; bad input needs none (every rank refuses alike).
def stop_together(error, group=None):
    """Every rank passes its own error message or None; if any rank has one, all stop with it.
    Only rank 0 prints it (main() silences the others), so the user reads it once."""
    if ddp:
        errors = [None] * ddp_world_size
        dist.all_gather_object(errors, error, group=group)
        error = next((e for e in errors if e), None)
    if error:
        raise SystemExit(error)


def on_rank_0(write, *args):
    """write(*args) on rank 0, which alone writes files; every rank learns whether it failed, and
    if so all stop with its one line: none is left waiting in a collective or in a traceback."""
    failure = None
    if master_process:
        try:
            write(*args)
        except SystemExit as refusal:  # e.g. another trainer took the new folder first
            failure = str(refusal.code)
        except RunFiles.WriteFailed as error:
            fix = "make room" if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else (
                "fix that")
            if os.path.exists(os.path.join(os.path.dirname(error.path), "last.pt")):
                advice = f"last.pt holds the last saved state: {fix}, then rerun with --resume"
            else:
                advice = f"no last.pt was saved yet: {fix}, then start the run again"
            failure = f"error: {error}; the files written before it are whole, and {advice}"
    stop_together(failure)


def check_ranks_agree(model):
    """DDP keeps the ranks in step; check it at the end rather than trust it."""
    weights = b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())
    digests = [None] * ddp_world_size
    dist.all_gather_object(digests, hashlib.sha256(weights).hexdigest())
    if len(set(digests)) > 1:
        fail(f"the {ddp_world_size} ranks ended with different weights; please report this")
    say(f"all {ddp_world_size} ranks hold identical weights (sha256 {digests[0][:16]})")


# ------------------------------------------------------------------ signals
class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM (SLURM and most schedulers) finish the step, save and stop; a
    second signal of the same kind acts at once, with the default behaviour."""

    def __init__(self, device):
        # agreed on the CPU: with NCCL, the default group would wait for the GPU
        self.group = dist.new_group(backend="gloo") if ddp and device.type == "cuda" else None
        self.received = 0
        self.previous = {sig: signal.signal(sig, self.handle)
                         for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, _frame):
        self.received = self.received or signum
        default = signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL
        signal.signal(signum, default)

    def agreed(self, step: int, last_step: int) -> int:
        """The signal to stop for (0: none): the largest rank's, every STOP_CHECK_EVERY steps."""
        if not ddp or (step % STOP_CHECK_EVERY and step != last_step):  # one process, or not due:
            return 0 if ddp else self.received  # its own signal, or none yet
        flag = torch.tensor([self.received])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def main(argv=None):
    try:
        args = parse_args(argv)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if ddp:  # NCCL with one GPU per process (chosen by LOCAL_RANK), or gloo on the CPU
            if args.device.type == "cuda":
                torch.cuda.set_device(args.device)
            dist.init_process_group("nccl" if args.device.type == "cuda" else "gloo")
        return train(args)
    except SystemExit as stop:
        if not master_process and isinstance(stop.code, str):
            # rank 0 prints the message; the others stop quietly, and a moment later, because
            # torchrun kills every worker as soon as one exits, rank 0 included
            time.sleep(2)
            raise SystemExit(1) from None
        raise
    finally:
        if dist.is_initialized():
            time.sleep(0.1)  # hand the GIL to gloo's workers: torch < 2.8 can hang (pytorch#154976)
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

