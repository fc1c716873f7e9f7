"""Sample from a train_cifar.py checkpoint (PNG grid, ADM-format .npz, FID), probe its blocks,
or compare several runs in one figure.

    python sample.py --ckpt runs/layersync/last.pt --grid grid.png
    python sample.py --ckpt runs/layersync/last.pt --n 10000 --npz samples.npz --fid
    python sample.py --ckpt runs/layersync/last.pt --probe             # per-block linear probe
    python sample.py --compare runs/baseline runs/layersync --figure compare.png

The checkpoint's config rebuilds the model, so no model flags are needed. Labels are balanced
over the classes (i % num_classes) unless --class-label fixes one.
"""

import argparse
import csv
import glob
import math
import os
import sys
from collections import namedtuple

import numpy as np
import torch
from tqdm import tqdm

from layersync import SiT, guided_velocity, linear_probe, sample
# the trainer's own formats (checkpoint, data, CSV, pixels, precision) and its flag checks
from train_cifar import (autocast, device_arg, fail, load_checkpoint, load_data, probe_data,
                         probe_levels, to_pixels, write_probe_csv)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="a last.pt written by train_cifar.py")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--method", choices=["heun", "euler"], default="heun")
    p.add_argument("--steps", type=int, default=50, help="ODE steps (Heun: 2 evaluations each)")
    p.add_argument("--cfg-scale", type=float, default=1.0,
                   help="classifier-free guidance; 1 = none")
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--class-label", type=int, help="sample only this class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grid", help="write a PNG grid here")
    p.add_argument("--npz", help="write arr_0 (uint8 N,H,W,3) and arr_1 (labels) here, the ADM "
                                 "format")
    p.add_argument("--fid", action="store_true",
                   help="FID against the CIFAR-10 training set (needs torch-fidelity)")
    p.add_argument("--data-dir", default="./data", help="where CIFAR-10 is, for --fid and --probe")
    p.add_argument("--probe", action="store_true",
                   help="linear probe of every block: print a table, write a CSV")
    p.add_argument("--probe-t", default="1.0,0.5",
                   help="noise levels of the probe (t = 1 is clean data)")
    p.add_argument("--probe-csv",
                   help="where --probe writes its rows (default: probe_<step>.csv beside --ckpt)")
    p.add_argument("--compare", nargs="+", metavar="RUN",
                   help="run folders of train_cifar.py to compare")
    p.add_argument("--figure", default="compare.png", help="the PNG that --compare writes")
    args = p.parse_args(argv)
    if args.compare:
        if args.ckpt:
            p.error("--compare reads run folders; give it without --ckpt")
        check_output_path("--figure", args.figure, (".png",))
        return args
    if not args.ckpt:
        p.error("give --ckpt PATH (or --compare RUN ...)")
    if not (args.grid or args.npz or args.fid or args.probe):
        p.error("nothing to write: give --grid PATH, --npz PATH, --fid and/or --probe")
    args.probe_t = probe_levels(args.probe_t)
    check_args(args)
    return args


def check_output_path(flag: str, path: str, extensions: tuple):
    if not path.lower().endswith(extensions):
        fail(f"{flag} {path}: the file name must end with {' or '.join(extensions)}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        fail(f"{flag} {path}: the folder {folder} does not exist; create it first")
    if os.path.isdir(path) or not os.access(folder, os.W_OK):
        fail(f"{flag} {path}: cannot write a file there")


def check_args(args):
    """All that can be checked before loading the model or drawing a sample, one line each."""
    for name in ("n", "steps", "batch_size"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if not math.isfinite(args.cfg_scale):
        fail(f"--cfg-scale {args.cfg_scale}: must be a finite number (1 = no guidance)")
    args.device = device_arg(args.device)
    if args.grid:
        check_output_path("--grid", args.grid, (".png", ".jpg", ".jpeg"))
    if args.npz:  # numpy would silently append .npz to any other name
        check_output_path("--npz", args.npz, (".npz",))
    if args.probe_csv:
        check_output_path("--probe-csv", args.probe_csv, (".csv",))


Loaded = namedtuple("Loaded", "model config step precision")


def load_model(args) -> Loaded:
    """The checkpoint's SiT (EMA weights unless --no-ema), at the run's precision: bf16 autocast
    on CUDA if the run trained in bf16, fp32 otherwise."""
    checkpoint = load_checkpoint(args.ckpt)
    config = checkpoint["config"]
    model = SiT(**config["model"])
    model.load_state_dict(checkpoint["model" if args.no_ema else "ema"])
    bf16 = args.device.type == "cuda" and config.get("precision", "bf16") == "bf16"
    precision = "bf16" if bf16 else "fp32"
    return Loaded(model.to(args.device).eval(), config, checkpoint["step"], precision)


@torch.no_grad()
def generate(args, loaded: Loaded, labels) -> torch.Tensor:
    """uint8 images (N, H, W, 3); the noise comes from a CPU generator, so --seed gives the same
    images whatever the device and batch size."""
    model, size = loaded.model, loaded.config["model"]["input_size"]
    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(len(labels), model.in_channels, size, size, generator=generator)
    out = []
    for start in tqdm(range(0, len(labels), args.batch_size), desc="sampling", unit="batch"):
        x = noise[start:start + args.batch_size].to(args.device)
        y = labels[start:start + args.batch_size].to(args.device)
        with autocast(args.device, loaded.precision):
            images = sample(guided_velocity(model, y, args.cfg_scale), x, args.steps, args.method)
        out.append(to_pixels(images).permute(0, 2, 3, 1).cpu())
    return torch.cat(out)


class UInt8Images(torch.utils.data.Dataset):
    """(N, H, W, 3) uint8 -> items (3, H, W) uint8, what torch-fidelity reads."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i].permute(2, 0, 1).contiguous()


def prepare_fid(model_config: dict, data_dir: str):
    """Before sampling: the extra is installed, the samples can be compared with CIFAR-10, the
    reference images and the Inception weights are there. Returns the reference images."""
    try:
        import torch_fidelity
    except ImportError:
        fail("--fid needs the optional extra torch-fidelity: pip install torch-fidelity")
    shape = (model_config["input_size"], model_config["in_channels"])
    if shape != (32, 3):
        fail(f"--fid compares with CIFAR-10 (32x32 RGB), but this model makes "
             f"{shape[0]}x{shape[0]} images with {shape[1]} channels")
    reference, _, _ = load_data("cifar10", data_dir, 32)  # (N, 3, 32, 32) uint8; downloads
    try:  # torch-fidelity downloads these weights on first use
        torch_fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    except Exception as error:
        fail(f"--fid: torch-fidelity could not load its Inception weights "
             f"({type(error).__name__}: {error}). Run once with internet access (they are cached "
             f"under ~/.cache/torch), or write --npz "
             f"and compute FID elsewhere")
    return UInt8Images(reference.permute(0, 2, 3, 1))


def compute_fid(images: torch.Tensor, reference, device) -> float:
    """FID of the samples against the 50,000 CIFAR-10 training images (torch-fidelity)."""
    import torch_fidelity
    metrics = torch_fidelity.calculate_metrics(
        input1=UInt8Images(images), input2=reference, input2_cache_name="layersync-cifar10-train",
        fid=True, cuda=device.type == "cuda", verbose=False)
    return metrics["frechet_inception_distance"]


# ------------------------------------------------------------------ the probe of one checkpoint

def probe_checkpoint(args, loaded: Loaded):
    """Every block's probe accuracy on the checkpoint's own data, as a table and a CSV."""
    model, config, step = loaded.model, loaded.config, loaded.step
    if not model.has_null_class:
        fail("--probe: the probe feeds the null class label, and this model has none (trained with "
             "class_dropout_prob=0)")
    data = probe_data(config, args.data_dir)
    pairs = config.get("layersync_pairs") or []
    teacher = pairs[0][1] if pairs else None
    with autocast(args.device, loaded.precision):
        probe = linear_probe(model, data.fit, data.scored, args.probe_t, teacher)
    role = {k: "student" for k, _ in pairs} | {k_teacher: "teacher" for _, k_teacher in pairs}
    weights = "raw" if args.no_ema else "EMA"
    print(f"probe of {args.ckpt} at step {step} ({weights} weights), {data.description}; "
          f"chance {100 / model.num_classes:.1f}%")
    first_t = args.probe_t[0]
    cosine_header = f"  cos to block {teacher} (t={first_t:g})" if teacher else ""
    print(f"{'block':>9} " + " ".join(f"{f't={t:g}':>8}" for t in args.probe_t) + cosine_header)
    for k in range(1, len(model.blocks) + 1):
        accuracies = " ".join(f"{100 * probe.accuracy[t][k]:>7.1f}%" for t in args.probe_t)
        cosine = f"  {probe.teacher_cosine[first_t][k]:>8.3f}" if teacher else ""
        print(f"{role.get(k, ''):>7} {k:>2} {accuracies}{cosine}")
    folder = os.path.dirname(os.path.abspath(args.ckpt))
    path = args.probe_csv or os.path.join(folder, f"probe_{step:07d}.csv")
    write_probe_csv(path, step, probe)
    print(f"probe rows: {path}")


# ------------------------------------------------------------------ comparing runs

def read_run(folder: str) -> dict:
    """What the comparison needs from a train_cifar.py run folder."""
    metrics_path, ckpt_path = os.path.join(folder, "metrics.csv"), os.path.join(folder, "last.pt")
    if not (os.path.isfile(metrics_path) and os.path.isfile(ckpt_path)):
        fail(f"--compare {folder}: not a train_cifar.py run folder (it needs metrics.csv and last.pt)")
    with open(metrics_path, newline="") as f:
        metrics = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    probe = []
    if os.path.isfile(os.path.join(folder, "probe.csv")):
        with open(os.path.join(folder, "probe.csv"), newline="") as f:
            probe = [{k: float(v) if v else None for k, v in row.items()} for row in csv.DictReader(f)]
    config = load_checkpoint(ckpt_path)["config"]
    pairs = config.get("layersync_pairs") or [[None, None]]
    weight = config["layersync_weight"]
    grids = sorted(glob.glob(os.path.join(folder, "samples_*.png")))
    name = os.path.basename(os.path.normpath(folder))
    return {"name": name, "label": f"{name} ({'baseline' if weight == 0 else f'LayerSync lambda {weight:g}'})",
            "metrics": metrics, "probe": probe, "student": pairs[0][0], "teacher": pairs[0][1],
            "num_classes": config["model"]["num_classes"], "grid": grids[-1] if grids else None}


def last_probe(run: dict) -> tuple:
    """(step, {t: {block: accuracy}}) at the run's last probed step; (None, {}) without a probe."""
    if not run["probe"]:
        return None, {}
    step = max(row["step"] for row in run["probe"])
    table = {}
    for row in run["probe"]:
        if row["step"] == step:
            table.setdefault(row["t"], {})[int(row["block"])] = row["accuracy"]
    return int(step), table


def compare_table(runs: list) -> str:
    """The figure's numbers as text: the last logged losses, then each block's last probe accuracy."""
    width = max(16, *(len(run["name"]) for run in runs))
    lines = [f"{'run':<40} {'step':>7} {'fm':>8} {'layersync':>10} {'student':>8} {'teacher':>8}"]
    for run in runs:
        last = run["metrics"][-1] if run["metrics"] else {}
        lines.append(f"{run['label']:<40} {last.get('step', 0):>7.0f} {last.get('fm', math.nan):>8.4f} "
                     f"{last.get('layersync', math.nan):>10.4f} {run['student']!s:>8} {run['teacher']!s:>8}")
    probes = [(run, *last_probe(run)) for run in runs]
    for t in sorted({t for _, _, table in probes for t in table}, reverse=True):
        lines.append(f"probe accuracy (%) per block, t={t:g}, at each run's last probed step:")
        depth = max(max(table[t]) for _, _, table in probes if t in table)
        lines.append(f"{'block':>6} " + " ".join(f"{run['name']:>{width}}" for run, _, _ in probes))
        for k in range(1, depth + 1):
            cells = []
            for run, _, table in probes:
                acc = table.get(t, {}).get(k)
                mark = "s" if k == run["student"] else "t" if k == run["teacher"] else " "
                cells.append(f"{'-' if acc is None else f'{100 * acc:.1f}'}{mark}".rjust(width))
            lines.append(f"{k:>6} " + " ".join(cells))
    lines.append("(s = LayerSync student block, t = teacher block)")
    return "\n".join(lines)


def compare_figure(runs: list, path: str):
    """Four panels: (a) losses, (b) probe accuracy per block, (c) the student block's accuracy
    over training, (d) the last sample grids. Colour = run, line style = what or which t."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from PIL import Image

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    ts = sorted({row["t"] for run in runs for row in run["probe"]}, reverse=True)
    fig = plt.figure(figsize=(14, 10), layout="constrained")
    grid = fig.add_gridspec(2, 2)
    ax_loss, ax_block, ax_student = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, 0])
    ax_sync = ax_loss.twinx()
    for i, run in enumerate(runs):
        colour = colours[i % len(colours)]
        steps = [row["step"] for row in run["metrics"]]
        ax_loss.plot(steps, [row["fm"] for row in run["metrics"]], color=colour)
        ax_sync.plot(steps, [row["layersync"] for row in run["metrics"]], color=colour, linestyle="--")
        _, table = last_probe(run)
        for j, t in enumerate(ts):
            if t not in table:
                continue
            blocks = sorted(table[t])
            ax_block.plot(blocks, [100 * table[t][k] for k in blocks], color=colour, linestyle=styles[j % 4],
                          marker=".")
            for k, marker in ((run["student"], "v"), (run["teacher"], "*")):
                if k in table[t]:
                    ax_block.plot([k], [100 * table[t][k]], marker=marker, markersize=13, color=colour,
                                  markeredgecolor="black", linestyle="none")
            history = sorted((row["step"], row["accuracy"]) for row in run["probe"]
                             if row["t"] == t and row["block"] == run["student"])
            ax_student.plot([s for s, _ in history], [100 * a for _, a in history], color=colour,
                            linestyle=styles[j % 4], marker="o")
    run_keys = [Line2D([], [], color=colours[i % len(colours)], label=run["label"]) for i, run in enumerate(runs)]
    t_keys = [Line2D([], [], color="black", linestyle=styles[j % 4], label=f"probe at t={t:g}")
              for j, t in enumerate(ts)]
    ax_loss.set(title="(a) training losses", xlabel="step", ylabel="flow-matching loss, Eq. 1 (solid)")
    ax_sync.set_ylabel("LayerSync term, Eq. 2: -cosine (dashed)")
    ax_loss.legend(handles=run_keys + [Line2D([], [], color="black", label="fm (left axis)"),
                                       Line2D([], [], color="black", linestyle="--", label="LayerSync (right axis)")],
                   fontsize=9, loc="center right")
    chance = 100 / runs[0]["num_classes"]
    for ax in (ax_block, ax_student):
        ax.axhline(chance, color="grey", linewidth=0.8, linestyle=":")
        ax.set_ylabel("probe top-1 accuracy (%), dotted: chance")
    steps = sorted({last_probe(run)[0] for run in runs if run["probe"]})
    ax_block.set(title=f"(b) linear probe of every block at step {', '.join(map(str, steps))}", xlabel="block")
    ax_block.xaxis.get_major_locator().set_params(integer=True)
    markers = [Line2D([], [], marker="v", color="grey", markeredgecolor="black", linestyle="none", label="student block"),
               Line2D([], [], marker="*", color="grey", markeredgecolor="black", linestyle="none", markersize=10,
                      label="teacher block")]
    ax_block.legend(handles=run_keys + t_keys + markers, fontsize=9)
    ax_student.set(title="(c) the student block's probe accuracy over training", xlabel="step")
    ax_student.legend(handles=run_keys + t_keys, fontsize=9)
    pictures = grid[1, 1].subgridspec(1, len(runs))
    for i, run in enumerate(runs):
        ax = fig.add_subplot(pictures[0, i])
        ax.axis("off")
        if run["grid"]:
            ax.imshow(Image.open(run["grid"]), interpolation="nearest")
            ax.set_title(f"(d) {run['name']}, {os.path.basename(run['grid'])}", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(args):
    runs = [read_run(folder) for folder in args.compare]
    print(compare_table(runs))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        fail("--compare: the figure needs the optional extra matplotlib: pip install matplotlib "
             "(the same numbers are printed above)")
    compare_figure(runs, args.figure)
    print(f"figure: {args.figure}")


# ------------------------------------------------------------------ main

def main(argv=None):
    args = parse_args(argv)
    if args.compare:
        return compare(args)
    loaded = load_model(args)
    if args.probe:
        probe_checkpoint(args, loaded)
        if not (args.grid or args.npz or args.fid):
            return
    model, config, step = loaded.model, loaded.config, loaded.step
    num_classes = config["model"]["num_classes"]
    if args.class_label is not None and not 0 <= args.class_label < num_classes:
        fail(f"--class-label {args.class_label}: the model has classes 0..{num_classes - 1}")
    if args.cfg_scale != 1 and not model.has_null_class:
        fail(f"--cfg-scale {args.cfg_scale}: this model was trained without label dropout, so it "
             f"has no null class to guide with; use --cfg-scale 1")
    reference = prepare_fid(config["model"], args.data_dir) if args.fid else None
    if args.class_label is None:
        labels = torch.arange(args.n) % num_classes
    else:
        labels = torch.full((args.n,), args.class_label)
    images = generate(args, loaded, labels)
    weights = "raw" if args.no_ema else "EMA"
    print(f"{len(images)} images from step {step} ({weights} weights), "
          f"{args.method} {args.steps} steps, cfg {args.cfg_scale}")
    if args.grid:
        from torchvision.utils import save_image
        columns = num_classes if args.class_label is None else 8
        nrow = min(columns, len(images))
        save_image(images.permute(0, 3, 1, 2).float() / 255, args.grid, nrow=nrow)
        print(f"grid: {args.grid}")
    if args.npz:
        np.savez(args.npz, arr_0=images.numpy(), arr_1=labels.numpy())
        print(f"npz: {args.npz}")
    if args.fid:
        fid = compute_fid(images, reference, args.device)
        print(f"FID vs CIFAR-10 train ({len(images)} samples): {fid:.2f}")


if __name__ == "__main__":
    sys.exit(main())
