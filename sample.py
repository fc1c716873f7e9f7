"""Sample from a train_cifar.py checkpoint or the official SiT / LayerSync weights (PNG grid,
ADM-format .npz, FID), probe their blocks, score a whole run's FID, or compare runs in one figure.

    python sample.py --ckpt runs/layersync/last.pt --grid grid.png
    python sample.py --ckpt runs/layersync/last.pt --n 10000 --npz samples.npz --fid
    python sample.py --fid runs/layersync      # FID of every snapshot of a run, into its fid.csv
    python sample.py --ckpt runs/layersync/last.pt --probe             # per-block linear probe
    python sample.py --compare runs/baseline runs/layersync --figure compare.png
    python sample.py --ckpt SiT-XL-2-256x256.pt --class-label 207 --n 8 --grid dogs.png
    python sample.py --ckpt SiT-XL-2-256x256.pt --probe --probe-data imagenet_subset/

The checkpoint rebuilds the model: no model flags. Labels are i % num_classes unless --class-label
fixes one. Official models work on SD-VAE latents: --vae decodes them and encodes --probe-data.
"""

import argparse
import csv
import glob
import hashlib
import json
import math
import os
import re
from collections import namedtuple

import numpy as np
import torch
from tqdm import tqdm

from layersync import SiT, check_layersync_pairs, default_layersync_pair, sit_from_official
# from the trainer: a run's files (read safely, written whole), the data, the probe, samples as
# pixels, two of its flag checks and its one-line error
from train_cifar import (RunFiles, device_arg, fail, load_data, probe_levels, probe_split,
                         run_probe, sample_pixels)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="a train_cifar.py last.pt, ema_<step>.pt or run folder, or the "
                   "official SiT / LayerSync weights (a state dict or train.py's checkpoint)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--method", choices=["heun", "euler"], default="heun")
    p.add_argument("--steps", type=int, default=50, help="ODE steps (Heun: 2 evaluations each)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance; 1: none")
    p.add_argument("--n", type=int, help="images (default: 8 per class; --grid: a multiple of it)")
    p.add_argument("--class-label", type=int, help="sample only this class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else
                   "cpu")
    p.add_argument("--grid", help="write a PNG grid here")
    p.add_argument("--npz", help="write arr_0 (uint8 N,H,W,3) and arr_1 (labels), the ADM format")
    p.add_argument("--fid", nargs="?", const=True, metavar="RUN_DIR", help="FID against the run's "
                   "own training data (torch-fidelity), of 10,000 images unless --n says: of "
                   "--ckpt, or of each snapshot of RUN_DIR not yet in RUN_DIR/fid.csv, a row each")
    p.add_argument("--fid-weights", metavar="PATH", help="torch-fidelity's Inception weights, "
                   "weights-inception-2015-12-05-6726825d.pth, for a machine without internet")
    p.add_argument("--data-dir", help="where CIFAR-10 is (default: the run's own, else ./data)")
    p.add_argument("--probe", action="store_true", help="linear probe of every block, to a CSV")
    p.add_argument("--probe-t", type=probe_levels, default="1.0,0.5", help="its noise levels")
    p.add_argument("--probe-data", metavar="FOLDER", help="an image folder to probe on, a folder "
                   "per class (default: the run's own data; official weights need one)")
    p.add_argument("--probe-csv", help="where --probe writes (default: beside --ckpt)")
    p.add_argument("--num-heads", type=int, help="heads of official weights of no preset's shape")
    p.add_argument("--vae", help="a latent model's diffusers AutoencoderKL, a hub name or a folder "
                   "(default: stabilityai/sd-vae-ft-ema, behind the paper's FIDs)")
    p.add_argument("--compare", nargs="+", metavar="RUN", help="train_cifar.py runs to compare")
    p.add_argument("--figure", default="compare.png", help="the PNG that --compare writes")
    args = p.parse_args(argv)
    args.fid_run = args.fid if isinstance(args.fid, str) and os.path.isdir(args.fid) else None
    if isinstance(args.fid, str):  # --fid PATH: a run folder, or one checkpoint file
        if args.ckpt or (args.fid_run and (args.grid or args.npz or args.probe)):
            p.error("--fid RUN_DIR writes only its fid.csv; --ckpt PATH --fid scores one file")
        args.ckpt = args.fid
    if bool(args.ckpt) == bool(args.compare):  # --compare reads run folders, not a checkpoint
        p.error("give one of --ckpt PATH, --fid RUN_DIR or --compare RUN ...")
    if args.fid and args.class_label is not None:
        p.error("--fid compares samples of every class with the data; drop --class-label")
    if not (args.grid or args.npz or args.fid or args.probe or args.compare):
        p.error("nothing to write: give --grid PATH, --npz PATH, --fid and/or --probe")
    for name in ("n", "steps", "batch_size", "num_heads"):  # before any model is loaded
        if (value := getattr(args, name)) is not None and value < 1:
            fail(f"--{name.replace('_', '-')} {value}: must be >= 1")
    if not math.isfinite(args.cfg_scale):
        fail(f"--cfg-scale {args.cfg_scale}: must be a finite number (1 = no guidance)")
    if args.fid_weights and not os.path.isfile(args.fid_weights):
        fail(f"--fid-weights {args.fid_weights}: no such file")
    if args.fid_weights:  # torch-fidelity loads it with weights_only=False: read it safely first
        try:  # weights_only: a file that needs code to load is refused before any of it runs
            weights = torch.load(args.fid_weights, map_location="cpu", weights_only=True)
            plain = len(weights) > 0 and all(isinstance(v, torch.Tensor) for v in weights.values())
        except Exception:  # no torch file, code to run, or not a dict
            plain = False
        if not plain:
            fail(f"--fid-weights {args.fid_weights}: not a state dict that loads without code")
    for flag, path, extensions in (("--grid", args.grid, (".png", ".jpg", ".jpeg")),
                                   ("--npz", args.npz, (".npz",)),  # numpy would add .npz
                                   ("--probe-csv", args.probe_csv, (".csv",)),
                                   ("--figure", args.compare and args.figure, (".png",))):
        folder = path and os.path.dirname(os.path.abspath(path))
        if path and (os.path.isdir(path) or not path.lower().endswith(extensions)):
            fail(f"{flag} {path}: a file, whose name must end with {' or '.join(extensions)}")
        if path and not (os.path.isdir(folder) and os.access(folder, os.W_OK)):
            fail(f"{flag} {path}: the folder {folder} does not exist or is read-only; create it")
    return args


# ------------------------------------------------------------------ models and samples
# What a checkpoint holds: the SiT (on the device), its step, the precision to sample in, a name
# ("step N (EMA weights)"), the image size it makes, its LayerSync pairs, and the run's training
# data (a built-in name or a folder; official weights: None, as their step) and where CIFAR-10 is:
# --data-dir, else where the run found it, else ./data
Loaded = namedtuple("Loaded", "model step precision name image_size pairs data data_dir")
OFFICIAL_KEYS = {"model", "ema", "opt", "args"}  # what the official SiT / LayerSync train.py saves
RUN_KEYS = {"ema", "step", "config"}  # in a train_cifar.py checkpoint, and all of an EMA snapshot


def load_model(args, path=None) -> Loaded:
    """The SiT of a train_cifar.py checkpoint or EMA snapshot, a bare official state dict or an
    official train.py checkpoint, told apart by their content; EMA weights unless --no-ema."""
    path, kind = path or args.ckpt, "raw weights" if args.no_ema else "EMA weights"
    checkpoint = RunFiles.read(path)
    weights, is_dict = "model" if args.no_ema else "ema", isinstance(checkpoint, dict)
    if is_dict and RUN_KEYS <= checkpoint.keys():
        if weights not in checkpoint:
            fail(f"--no-ema: {path} is an EMA snapshot; the raw weights are in the run's last.pt")
        config = checkpoint["config"]
        model = SiT(**config["model"])
        model.load_state_dict(checkpoint[weights])
        precision = config["precision"] if args.device.type == "cuda" else "fp32"  # as it trained
        run_data_dir = config.get("flags", {}).get("data_dir")  # where the run found CIFAR-10
        return Loaded(model.to(args.device).eval(), checkpoint["step"], precision,
                      f"step {checkpoint['step']} ({kind})", config["model"]["input_size"],
                      config["layersync_pairs"], config["data"],
                      args.data_dir or run_data_dir or "./data")
    official = is_dict and OFFICIAL_KEYS <= checkpoint.keys()
    state = checkpoint[weights] if official else checkpoint
    if not (isinstance(state, dict) and "x_embedder.proj.weight" in state):
        found = sorted(checkpoint)[:6] if is_dict else type(checkpoint).__name__
        fail(f"{path} holds {found}: expected a train_cifar.py checkpoint (ema, step, config), an "
             f"official SiT state dict (x_embedder.proj.weight...) or train.py's (model, args...)")
    try:
        model = sit_from_official(state, args.num_heads)
    except ValueError as error:
        fail(f"{path}: {str(error).replace('pass num_heads=', 'pass --num-heads N')}")
    flags = vars(checkpoint["args"]) if official else {}  # LayerSync's pair, if it trained one
    pair, depth = (flags.get("encoder_depth"), flags.get("gt_encoder_depth")), len(model.blocks)
    try:  # the probe's teacher cosine
        pair = check_layersync_pairs([pair], depth)[0]
    except ValueError as error:  # no pair, k = k' (its default) or beyond this model's blocks
        if None not in pair:
            print(f"note: {path}: {error}; the probe's cosines are to the default pair's teacher")
        pair = default_layersync_pair(depth)
    side = round(model.pos_embed.shape[1] ** 0.5) * model.patch_size  # patches per side x patch
    return Loaded(model.to(args.device).eval(), None, "fp32", f"official weights ({kind})", side,
                  [list(pair)], None, args.data_dir or "./data")


def check_flags(args, loaded: Loaded) -> torch.Tensor:
    """The flags against this model, before any work (FID reference, VAE, sampling): one line for
    the first that does not fit. Returns the labels to sample: i % classes, or --class-label."""
    model, latent = loaded.model, loaded.model.in_channels == 4  # SD-VAE latents, as official
    if args.class_label is not None and not 0 <= args.class_label < model.num_classes:
        fail(f"--class-label {args.class_label}: the model has classes 0..{model.num_classes - 1}")
    if (args.cfg_scale != 1 or args.probe) and not model.has_null_class:  # both feed it
        flag = "--probe" if args.probe else f"--cfg-scale {args.cfg_scale}"
        fail(f"{flag}: this model has no null class (trained with class_dropout_prob=0) to guide "
             f"with or probe on; drop --probe, use --cfg-scale 1")
    if args.vae and not latent:
        fail(f"--vae {args.vae}: this model works on pixels, not latents; drop --vae")
    if args.probe and loaded.step is None and not args.probe_data:
        fail("--probe of official weights needs --probe-data FOLDER, a sub-folder per class")
    rows = model.num_classes if args.class_label is None else 1  # one row per class
    n = args.n or (10_000 if args.fid else 8 * rows)  # FID of a few images means nothing
    if args.npz:  # n uint8 images and int64 labels, uncompressed: refused now, not after sampling
        side = loaded.image_size * (8 if latent else 1)
        what = f"--npz {args.npz}: {n} images of {side}x{side}"
        RunFiles.check_space(args.npz, n * (side * side * 3 + 8), what,
                             "write it elsewhere, give a smaller --n, or free some space")
    if args.grid and n % rows:
        fail(f"--n {n} with --grid: the grid has one row per class, so give a multiple of the "
             f"{rows} classes, e.g. --n {8 * rows}, or one --class-label")
    return torch.arange(n) % rows + (args.class_label or 0)


def load_vae(args) -> tuple:
    """(encode, decode) between images in [-1, 1] and a latent model's latents, as the official
    code: the diffusers AutoencoderKL's posterior mean x its scaling factor, and back."""
    try:
        from diffusers import AutoencoderKL
        from diffusers.utils import logging
    except ImportError:
        fail("a latent model needs the optional extra diffusers for its VAE: pip install diffusers")
    name = os.path.expanduser(args.vae or "stabilityai/sd-vae-ft-ema")
    if name.startswith((".", "/", "~")) and not os.path.isdir(name):
        fail(f"--vae {name}: no such folder")
    logging.set_verbosity_error()
    try:
        vae = AutoencoderKL.from_pretrained(name).to(args.device).eval()
    except Exception as error:  # offline, a wrong name, a folder without its config.json
        fail(f"--vae {name}: cannot load it ({first_line(error)}). Download it once with internet "
             f"(huggingface caches it), or pass --vae LOCAL_FOLDER")
    scale = vae.config.scaling_factor  # 0.18215 for SD-VAE

    @torch.no_grad()
    def encode(images):  # the probe's images, 64 at a time on the device
        return torch.cat([vae.encode(x.to(args.device)).latent_dist.mean.cpu() * scale
                          for x in images.split(64)])
    return encode, lambda latents: vae.decode(latents.float() / scale).sample


def first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"


@torch.no_grad()
def generate(args, loaded: Loaded, labels, decode=None) -> torch.Tensor:
    """uint8 images (N, H, W, 3), latents decoded by `decode`; the noise comes from a CPU
    generator, so --seed gives the same images whatever the device and batch size."""
    model, size = loaded.model, loaded.image_size
    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(len(labels), model.in_channels, size, size, generator=generator)
    batches = list(zip(noise.split(args.batch_size), labels.split(args.batch_size)))
    return torch.cat([sample_pixels(model, x.to(args.device), y.to(args.device), args.steps,
                                    loaded.precision, args.method, args.cfg_scale, decode)
                      .permute(0, 2, 3, 1).cpu() for x, y in tqdm(batches, desc="sampling")])


# ------------------------------------------------------------------ FID, of one file or a whole run
# torch-fidelity's Inception-v3, ported from the TensorFlow FID code (the tests register a stand-in)
FID_EXTRACTOR = "inception-v3-compat"
FID_FIELDS = ["step", "n", "fid", "method", "steps", "cfg_scale", "seed"]
FID_LOCK = "fid.lock"  # locked by the one scorer of a run folder (flock), never written


class UInt8Images(list, torch.utils.data.Dataset):
    """uint8 images (3, H, W) in a list: the Dataset torch-fidelity reads."""


def prepare_fid(args, loaded: Loaded) -> dict:
    """Before any sampling, one line for what is missing: the extra, the run's training data (the
    reference) and the Inception weights. Returns torch-fidelity's options for compute_fid."""
    try:
        import torch_fidelity
    except ImportError:
        fail("--fid needs the optional extra torch-fidelity: pip install torch-fidelity")
    if loaded.data is None:  # the official weights: ImageNet latents
        fail("--fid compares with a train_cifar.py run's own data; for ImageNet models write --npz "
             "and score it with the ADM evaluation suite (openai/guided-diffusion), like the paper")
    data, size = loaded.data, loaded.image_size
    if os.path.isabs(data) and not os.path.isdir(data):  # a folder (built-ins are names)
        fail(f"--fid: the run trained on {data}, which is gone; FID needs those images")
    reference, _, _ = load_data(data, loaded.data_dir, size)  # (N, 3, H, W) uint8
    # torch-fidelity caches the reference's statistics under a key: a hash of the images and the
    # Inception weights, so that edited images or other weights are measured again
    key = hashlib.sha1(reference.contiguous().numpy())
    if args.fid_weights:
        with open(args.fid_weights, "rb") as f:
            key.update(f.read())
    options = dict(feature_extractor=FID_EXTRACTOR, feature_extractor_weights_path=args.fid_weights,
                   cuda=args.device.type == "cuda", verbose=False,
                   save_cpu_ram=True)  # for FID: no loader workers, the images are in memory
    try:  # torch-fidelity downloads these weights on first use
        layer = torch_fidelity.utils.resolve_feature_layer_for_metric("fid", **options)
        torch_fidelity.utils.create_feature_extractor(FID_EXTRACTOR, [layer], **options)
    except Exception as error:
        fail(f"--fid: torch-fidelity could not load its Inception weights ({first_line(error)}); "
             f"without internet, pass --fid-weights PATH")
    return dict(options, input2=UInt8Images(reference.unbind()),
                input2_cache_name=f"layersync-{size}px-{len(reference)}-{key.hexdigest()[:16]}")


def compute_fid(images: torch.Tensor, options: dict) -> float:
    """FID of uint8 samples (N, H, W, 3) against the reference of prepare_fid (torch-fidelity)."""
    import torch_fidelity
    samples = UInt8Images(images.permute(0, 3, 1, 2).contiguous().unbind())
    return torch_fidelity.calculate_metrics(input1=samples, fid=True,
                                            **options)["frechet_inception_distance"]


def read_csv(path: str) -> list:
    """A CSV's rows as text, [] without the file; a row cut short by a kill (its last field
    missing or empty, which these files never write) is skipped."""
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        rows = csv.DictReader(f)
        return [row for row in rows if row.get(rows.fieldnames[-1]) not in (None, "")]


def fid_of_run(args):
    """Each snapshot not yet in fid.csv with these settings, oldest first, a row written as soon as
    it is scored; all see the same noise and labels (--seed): arms differ only by their weights."""
    folder, path = args.fid_run, os.path.join(args.fid_run, "fid.csv")
    RunFiles.check_one_run(folder, "--fid")
    snapshots = {int(m[1]): os.path.join(folder, m[0]) for m in
                 (re.fullmatch(r"ema_(\d+)\.pt", name) for name in os.listdir(folder)) if m}
    last = os.path.join(folder, "last.pt")
    if os.path.isfile(last):  # its step, unless a snapshot has it
        snapshots.setdefault(RunFiles.load_checkpoint(last)["step"], last)
    if not snapshots:
        fail(f"--fid {folder}: no checkpoint in it (ema_<step>.pt or last.pt of train_cifar.py)")
    settings = {"n": args.n or 10_000} | {k: getattr(args, k) for k in FID_FIELDS[3:]}
    as_read_back = {k: str(v) for k, v in settings.items()}

    def unscored():  # the snapshots' steps not yet in fid.csv with these settings, oldest first
        done = {row["step"] for row in read_csv(path) if as_read_back.items() <= row.items()}
        return [step for step in sorted(snapshots) if str(step) not in done]
    if not unscored():
        return print(f"{path}: every snapshot is already scored with these settings")
    first = load_model(args, snapshots[unscored()[0]])  # the flags checked before any sampling
    labels, options = check_flags(args, first), prepare_fid(args, first)
    # one scorer per run: a second waits for nothing and writes nothing (a trainer may run)
    with RunFiles.lock(os.path.join(folder, FID_LOCK), f"--fid {folder}: another scorer is "
                       f"writing its fid.csv", "let it finish, then rerun to score the rest"):
        for step in unscored():  # read again under the lock: another scorer may have just ended
            fid = compute_fid(generate(args, load_model(args, snapshots[step]), labels), options)
            RunFiles.append(path, FID_FIELDS, [{"step": step, "fid": f"{fid:.6g}", **as_read_back}])
            print(f"step {step}: FID {fid:.2f} -> {path}")


# ------------------------------------------------------------------ the probe of one checkpoint
def probe_checkpoint(args, loaded: Loaded, encode=None):
    """Every block's probe accuracy, on the run's own data or on --probe-data (encoded for a
    latent model), as a table and a CSV: the same probe as in training (run_probe)."""
    model, step = loaded.model, loaded.step
    source = args.probe_data or loaded.data  # a latent model sees 8x smaller latents (SD-VAE)
    folder = loaded.data_dir  # official weights: --probe-data may be cifar10
    size = loaded.image_size * (8 if encode else 1)
    images, labels, _ = load_data(source, folder, size)
    data = probe_split(source, folder, images, labels, encode)
    ckpt = os.path.abspath(args.ckpt)  # a file or a run folder: the CSV goes beside or inside
    name = f"{step:07d}" if step is not None else os.path.splitext(os.path.basename(ckpt))[0]
    path = args.probe_csv or os.path.join(ckpt if os.path.isdir(ckpt) else os.path.dirname(ckpt),
                                          f"probe_{name}.csv")
    pairs = loaded.pairs
    probe = run_probe(model, data, args.probe_t, pairs, loaded.precision, path, step or 0)
    role = {k: "student" for k, _ in pairs} | {k_teacher: "teacher" for _, k_teacher in pairs}
    cosines = probe.teacher_cosine.get(args.probe_t[0], {})  # to the teacher, at the first t
    teacher = f"; cosine to block {pairs[0][1]}, t={args.probe_t[0]:g}" if cosines else ""
    print(f"probe of {args.ckpt} at {loaded.name}, {data.description}; chance "
          f"{100 / model.num_classes:.1f}%{teacher}")
    for k in range(1, len(model.blocks) + 1):
        accuracies = "".join(f" {100 * probe.accuracy[t][k]:5.1f}% (t={t:g})" for t in args.probe_t)
        cosine = f"  {cosines[k]:.3f}" if cosines else ""
        print(f"{role.get(k, ''):>7} {k:>2}{accuracies}{cosine}")
    print(f"probe rows: {path}")


# ------------------------------------------------------------------ main
def main(argv=None):
    args = parse_args(argv)
    try:
        write_outputs(args)
    except RunFiles.WriteFailed as error:  # a full disk: one line; what was written is whole
        fail(f"{error}; no part of it is left, and the files written before it are whole")


def write_outputs(args):
    if args.compare:  # the numbers as text first, then the figure
        arms = group_into_arms([read_run(folder) for folder in args.compare])
        print(compare_table(arms))
        return compare_figure(arms, args.figure)
    if args.fid_run:
        return fid_of_run(args)
    loaded = load_model(args)
    labels = check_flags(args, loaded)
    fid_options = prepare_fid(args, loaded) if args.fid else None
    encode, decode = load_vae(args) if loaded.model.in_channels == 4 else (None, None)
    if args.probe:
        probe_checkpoint(args, loaded, encode)
        if not (args.grid or args.npz or args.fid):
            return
    images = generate(args, loaded, labels, decode)
    if args.grid:  # one row per class: labels sorted, each class's images in drawing order
        columns = len(labels) // len(labels.unique())
        by_class = images[labels.argsort(stable=True)].permute(0, 3, 1, 2)
        RunFiles.write_grid(by_class, args.grid, columns)
    if args.npz:
        arrays = {"arr_0": images.numpy(), "arr_1": labels.numpy()}
        RunFiles.write(args.npz, lambda f: np.savez(f, **arrays))
    print(f"{len(images)} images from {loaded.name}, {args.method} {args.steps} steps, cfg "
          f"{args.cfg_scale}" + "".join(f"; wrote {out}" for out in (args.grid, args.npz) if out))
    if args.fid:
        print(f"FID against {loaded.data} ({len(images)} samples): "
              f"{compute_fid(images, fid_options):.2f}")


# ------------------------------------------------------------------ comparing runs, over seeds
# Runs whose checkpoint configs differ only in the seed form one arm; every number is shown as the
# mean over the arm's seeds with its spread (min..max), because two seeds of one configuration can
# differ as much as LayerSync and the baseline do at small scale.
# curves: {name: {x: y}}: "fm", "layersync" and "fid" over the steps; for each noise level t, the
# last probed step's ("accuracy", t) in %, ("teacher_cosine", t) and ("relative_update", t) over the
# blocks, and ("student", t), the student block's probe accuracy over the steps
Run = namedtuple("Run", "name config curves grid probed")  # probed: {step: the block curves}
Arm = namedtuple("Arm", "label runs student teacher")
BLOCK_TABLES = (("accuracy", "probe accuracy (%)", 1),
                ("teacher_cosine", "cosine to the teacher block", 3),
                ("relative_update", "relative update ||h_k - h_(k-1)|| / ||h_(k-1)||", 3))


def read_run(folder: str) -> Run:
    """The curves of a train_cifar.py run folder, from its CSVs, and its last sample grid."""
    metrics, ckpt = os.path.join(folder, "metrics.csv"), os.path.join(folder, "last.pt")
    if not (os.path.isfile(metrics) and os.path.isfile(ckpt)):
        fail(f"--compare {folder}: not a train_cifar.py run folder (it needs metrics.csv, last.pt)")
    RunFiles.check_one_run(folder, "--compare")
    config, rows = RunFiles.load_checkpoint(ckpt)["config"], read_csv(metrics)
    curves = {name: {int(row["step"]): float(row[name]) for row in rows}
              for name in ("fm", "layersync")}
    fid = read_csv(os.path.join(folder, "fid.csv"))  # the rows with the settings of its last row
    curves["fid"] = {int(row["step"]): float(row["fid"]) for row in fid
                     if all(row[k] == fid[-1][k] for k in FID_FIELDS[1:] if k != "fid")}
    probed, student = {}, (config["layersync_pairs"] or [[None]])[0][0]
    for row in read_csv(os.path.join(folder, "probe.csv")):
        t, step, block = float(row["t"]), int(row["step"]), int(row["block"])
        for table, _, _ in BLOCK_TABLES:
            if row[table]:  # teacher_cosine is empty without a teacher
                value = float(row[table]) * (100 if table == "accuracy" else 1)
                probed.setdefault(step, {}).setdefault((table, t), {})[block] = value
        if block == student:
            curves.setdefault(("student", t), {})[step] = 100 * float(row["accuracy"])
    return Run(os.path.basename(os.path.normpath(folder)), config, curves,  # and the last grid
               max(glob.glob(os.path.join(folder, "samples_*.png")), default=None), probed)


def identity(config: dict) -> dict:
    """What makes an arm: the config without the seed, the run id and the flags (which add the
    length and output cadences), and what its resumes changed in that config, and at which step."""
    arm = {k: v for k, v in config.items() if k not in ("seed", "run_id", "flags", "history")}
    changes = [f"{k} {old} -> {new} at step {entry['step']}" for entry in config.get("history", [])
               for k, (old, new) in entry["changes"].items() if k in arm]  # not --steps, cadences
    if changes:
        arm["resumed with"] = ", ".join(changes)
    return arm


def run_length(run: Run) -> int:
    return max(run.curves["fm"], default=0)


def group_into_arms(runs: list) -> list:
    """Runs grouped by their identity (config and history) without the seed, in the order given,
    each arm labelled by its LayerSync weight (and, where two arms share it, by what tells them
    apart). Two runs of one arm and seed count once: the longer is kept."""
    groups = {}  # {key: (identity, {seed: run})}
    for run in runs:
        arm = identity(run.config)
        by_seed = groups.setdefault(json.dumps(arm, sort_keys=True), (arm, {}))[1]
        if (twin := by_seed.setdefault(run.config["seed"], run)) is not run:
            kept, set_aside = sorted((twin, run), key=run_length, reverse=True)  # a tie: the first
            by_seed[run.config["seed"]] = kept
            print(f"note: {twin.name} and {run.name} have the same configuration, history and "
                  f"seed {run.config['seed']}: counted once, kept {kept.name} (step "
                  f"{run_length(kept)}), set aside {set_aside.name} (step {run_length(set_aside)})")
    kind = {key: f"LayerSync lambda {arm['layersync_weight']:g}" if arm["layersync_weight"] else
            "baseline" for key, (arm, _) in groups.items()}
    arms = []
    for key, (arm, by_seed) in groups.items():  # name what differs from arms of the same kind
        others = [groups[other][0] for other in groups if kind[other] == kind[key]]
        label = ", ".join([kind[key], *(f"{k} {arm[k]}" for k in sorted(arm)
                                        if any(other.get(k) != arm[k] for other in others))])
        members = list(by_seed.values())
        arms.append(Arm(label, members, *(arm.get("layersync_pairs") or [[None, None]])[0]))
    use_last_shared_probe([run for arm in arms for run in arm.runs])
    return arms


def use_last_shared_probe(runs: list):
    """The per-block curves of each run, (table, t): {block: value}, at the last probed step that
    every run of every arm reached, so that seeds and arms are compared at one step."""
    steps = set.intersection(*(set(run.probed) for run in runs))
    for run in runs:
        run.curves.update(run.probed[max(steps)] if steps else {})


def seeds(arm: Arm, name) -> list:
    """The arm's curve `name`, one {x: y} per seed that has it."""
    return [run.curves[name] for run in arm.runs if run.curves.get(name)]


def over_seeds(curves: list) -> tuple:
    """Curves {x: y}, one per seed -> (xs, mean, min, max) over the x that every seed has."""
    xs = sorted(set.intersection(*(set(curve) for curve in curves))) if curves else []
    columns = [[curve[x] for curve in curves] for x in xs]
    return (xs, [sum(c) / len(c) for c in columns], [min(c) for c in columns],
            [max(c) for c in columns])


def last_shared_step(arms: list, name):
    """The last x of the curve `name` that every run of every arm that has the curve has (None:
    no such x)."""
    return max(over_seeds([curve for arm in arms for curve in seeds(arm, name)])[0], default=None)


def values_at(arm: Arm, name, x) -> dict:
    """{seed: y at x} of the arm's curve `name`, for each of its runs that has x."""
    return {run.config["seed"]: run.curves[name][x] for run in arm.runs
            if x in run.curves.get(name, {})}


def spread(values: list, digits: int) -> str:
    """'mean (min..max)' over seeds, or the value alone for one seed; '-' for none."""
    mean = f"{sum(values) / len(values):.{digits}f}" if values else "-"
    low, high = f"{min(values, default=0):.{digits}f}", f"{max(values, default=0):.{digits}f}"
    return mean if len(values) < 2 else f"{mean} ({low}..{high})"


def compare_table(arms: list) -> str:
    """The figure's numbers as text: losses and FID at the end, the speed-up, then every block's
    probe accuracy, cosine to the teacher and relative update, as the mean over seeds (min..max)."""
    lines = ["arms (runs whose configs and histories differ only in --seed):"]
    lines += [f"  {arm.label}: {len(arm.runs)} seed(s): " +
              ", ".join(f"{run.name} (seed {run.config['seed']})" for run in arm.runs)
              for arm in arms]
    width = max(24, *(len(arm.label) for arm in arms))
    lines.append(f"{'arm':<{width}} {'seeds':>5} {'step':>7} {'fm':>26} {'layersync':>27} "
                 f"{'student':>7} {'teacher':>7} {'FID at the last scored step':>28}")
    # each seed's value at the last logged (scored) step that every run of every arm reached
    step = {name: last_shared_step(arms, name) for name in ("fm", "layersync", "fid")}
    for arm in arms:
        fm = list(values_at(arm, "fm", step["fm"]).values())
        sync = list(values_at(arm, "layersync", step["layersync"]).values())
        fid = list(values_at(arm, "fid", step["fid"]).values())
        lines.append(f"{arm.label:<{width}} {len(arm.runs):>5} {step['fm'] or '-':>7} "
                     f"{spread(fm, 4):>26} {spread(sync, 4):>27} {arm.student!s:>7} "
                     f"{arm.teacher!s:>7} {spread(fid, 2):>28}")
    if len({run_length(run) for arm in arms for run in arm.runs}) > 1:
        lengths = [f"{arm.label} ran to steps {', '.join(str(run_length(r)) for r in arm.runs)}"
                   for arm in arms]
        lines.append(f"note: {'; '.join(lengths)}; every number here is at step {step['fm']}, the "
                     f"last that all of them reached (the figure's curves keep their full length)")
    lines += speedup_lines(arms)
    lines += paired_gap_lines(arms, step)
    ts = sorted({name[1] for arm in arms for run in arm.runs for name in run.curves
                 if isinstance(name, tuple)}, reverse=True)
    cell = max(22, *(len(arm.label) for arm in arms))
    for (table, title, digits), t in ((table, t) for table in BLOCK_TABLES for t in ts):
        columns = [seeds(arm, (table, t)) for arm in arms]
        depth = max((max(curve) for curves in columns for curve in curves), default=0)
        if depth:
            lines.append(f"{title} per block, t={t:g}, at the last probed step of all the runs, "
                         f"mean over seeds (min..max):")
            lines.append(f"{'block':>6} " + " ".join(f"{arm.label:>{cell}}" for arm in arms))
            lines += [f"{k:>6} " + " ".join(
                f"{spread([curve[k] for curve in curves if k in curve], digits)}"
                f"{'s' if k == arm.student else 't' if k == arm.teacher else ' '}".rjust(cell)
                for arm, curves in zip(arms, columns)) for k in range(1, depth + 1)]
    lines.append("(s = LayerSync student block, t = teacher block; where the blocks between the "
                 "student and the teacher all sit near cosine 1 and their relative updates fall, "
                 "the regulariser is collapsing them)")
    if any(len(arm.runs) == 1 for arm in arms):
        lines.append("note: an arm with one seed: differences between seeds of the same config can "
                     "be as large as the effect; train each arm with 2 or more --seed values")
    return "\n".join(lines)


def first_step_at_or_below(xs: list, ys: list, target: float):
    """The first x at which the curve reaches `target`, linear between points; None: never."""
    if ys and ys[0] <= target:
        return xs[0]
    for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:]):
        if y1 <= target:  # y0 > target, or the previous point would have answered
            return x0 + (y0 - target) / (y0 - y1) * (x1 - x0)
    return None


def baseline_arm(arms: list):
    return next((arm for arm in arms if arm.runs[0].config["layersync_weight"] == 0), None)


STEADY_ROWS = 6  # a loss gap is steady when its sign holds over the last 6 logged steps


def paired_measures(run: Run, arm: Arm, step: dict) -> dict:
    """A run's fm and FID at the shared step; at each probed t, the student's and the best block's
    probe and the mean relative update of the blocks strictly between the arm's pair."""
    k, k_teacher = arm.student, arm.teacher
    values = {f"fm at step {step['fm']}": run.curves["fm"].get(step["fm"]),
              f"FID at step {step['fid']}": run.curves["fid"].get(step["fid"])}
    ts = sorted({name[1] for name in run.curves if isinstance(name, tuple)}, reverse=True)
    for t in ts:  # the block tables exist where some probed step is shared by every run
        accuracy = run.curves.get(("accuracy", t), {})
        update = run.curves.get(("relative_update", t), {})
        values[f"student {k}'s probe at t={t:g} (%)"] = accuracy.get(k)
        values[f"best block's probe at t={t:g} (%)"] = max(accuracy.values(), default=None)
        between = [update[b] for b in range(k + 1, k_teacher) if b in update]
        if between:
            name = f"relative update of blocks {k + 1}..{k_teacher - 1} at t={t:g}"
            values[name] = sum(between) / len(between)
    return values


def verdict(gaps: list) -> str:
    """Whether the seeds' gaps share a sign, and how often that would happen with no effect."""
    if len(gaps) < 2:
        return "one seed: no verdict"
    if not any(gaps):
        return "no gap in any seed"
    if 0 in gaps or len({gap > 0 for gap in gaps}) > 1:
        return "mixed"
    settle = "; two seeds cannot settle a difference" if len(gaps) == 2 else ""
    return f"same sign in every seed (by chance alone 1 in {2 ** (len(gaps) - 1)}{settle})"


def paired_gap_lines(arms: list, step: dict) -> list:
    """Each LayerSync arm minus the baseline, seed by seed (a seed: same weights and batches)."""
    baseline, lines = baseline_arm(arms), []
    for arm in arms:
        if baseline is None or arm is baseline or arm.student is None:
            continue
        ours = {run.config["seed"]: run for run in arm.runs}
        theirs = {run.config["seed"]: run for run in baseline.runs}
        seeds = sorted(ours.keys() & theirs.keys())
        alone = sorted(ours.keys() ^ theirs.keys()) or "none"
        lines.append(f"paired gaps, {arm.label} minus baseline, seeds {seeds} (left out, without "
                     f"a partner: {alone}); a difference counts where every seed's gap has the "
                     f"same sign, and a loss gap only where it is also steady:")
        gaps = {}  # {measure: each seed's gap}
        for seed in seeds:
            mine = paired_measures(ours[seed], arm, step)
            base = paired_measures(theirs[seed], arm, step)
            for measure, value in mine.items():
                if value is not None and base.get(measure) is not None:
                    gaps.setdefault(measure, []).append(value - base[measure])
        for measure, values in gaps.items():
            each = " ".join(f"{gap:+.4g}" for gap in values)
            lines.append(f"  {measure}: {each}; mean {sum(values) / len(values):+.4g}; "
                         f"{verdict(values)}")
        if not seeds:
            continue
        # steady: each seed's fm gap keeps its sign over the last STEADY_ROWS logged steps
        xs = over_seeds([run.curves["fm"] for run in arm.runs + baseline.runs])[0][-STEADY_ROWS:]
        changes = []
        for seed in seeds:
            fm, base_fm = ours[seed].curves["fm"], theirs[seed].curves["fm"]
            if len({fm[x] > base_fm[x] for x in xs}) > 1:
                changes.append(seed)
        where = f"not steady, its sign changes in seeds {changes}" if changes else "steady"
        lines.append(f"  fm gap over the last {len(xs)} logged steps: {where}")
    return lines


def speedup_lines(arms: list) -> list:
    """The paper's speed-up, per LayerSync arm: the first step at which its mean FID reaches the
    baseline's final mean FID, against the baseline's last scored step."""
    baseline = baseline_arm(arms)
    steps, mean, _, _ = over_seeds(seeds(baseline, "fid") if baseline else [])
    if not steps:
        return []
    lines = [f"FID over training (fid.csv), mean over seeds; the baseline ends at FID "
             f"{mean[-1]:.2f} at step {steps[-1]:,}:"]
    for arm in arms:
        xs, ys, _, _ = over_seeds(seeds(arm, "fid"))
        if arm is not baseline and xs:
            step = first_step_at_or_below(xs, ys, mean[-1])
            lines.append(f"  {arm.label}: " + (
                f"not reached within {xs[-1]:,} steps" if step is None else
                f"reaches the baseline's FID {mean[-1]:.2f} at step {step:,.0f}: "
                f"{steps[-1] / step:.2f}x fewer steps"))
    return lines


def band(ax, curves: list, colour, style="-", marker=None) -> dict:
    """Curves {x: y}, one per seed: their mean, and the min..max band where the seeds differ.
    Returns the mean {x: y}. No such curve: nothing drawn, the axes keep their limits."""
    xs, mean, low, high = over_seeds(curves)
    if xs:
        ax.plot(xs, mean, color=colour, linestyle=style, marker=marker)
    if any(lo != hi for lo, hi in zip(low, high)):
        ax.fill_between(xs, low, high, color=colour, alpha=0.2, linewidth=0)
    return dict(zip(xs, mean))


# (curves, title, x label, y label) of each panel, in the figure's rows; {ref}: the reference arm.
# The top row ends with (h), FID over training, where a run has its fid.csv; the bottom row ends
# with (g), each arm's last sample grid.
TOP_PANELS = (
    ("fm", "(a) flow-matching loss (Eq. 1) over training,\nrelative to the mean of {ref}", "step",
     "flow-matching loss: % above {ref}"),
    ("layersync", "(b) LayerSync term (Eq. 2) over training: minus the cosine\nof student and "
     "teacher, -1 = aligned (a baseline's: measured, not trained)", "step",
     "LayerSync term: -cosine(student, teacher)"),
    ("accuracy", "(c) linear probe of every block, at the last probed step", "block",
     "probe top-1 accuracy (%), dotted: chance"),
    ("student", "(d) the student block's probe accuracy over training", "step",
     "probe top-1 accuracy (%), dotted: chance"),
    ("fid", "(h) FID over training (sample.py --fid RUN_DIR), lower is better", "step",
     "FID against the training data"))
BOTTOM_PANELS = (
    ("teacher_cosine", "(e) each block's mean per-token cosine to the teacher block:\nall blocks "
     "between student and teacher near 1 = collapse", "block", "cosine to the teacher block"),
    ("relative_update", "(f) each block's relative update ||h_k - h_(k-1)|| / ||h_(k-1)||:\nhow "
     "much the block writes to the residual stream (h_0: input tokens)", "block",
     "relative update, mean over tokens"))


def compare_figure(arms: list, path: str):
    """The panels of TOP_PANELS and BOTTOM_PANELS, each the mean over an arm's seeds with a
    min..max band, and (g) each arm's last sample grid. Colour = arm, line style = which t."""
    try:  # a Figure of its own, not pyplot's: files only, no display needed
        import matplotlib
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
        from PIL import Image  # a dependency of matplotlib
    except ImportError:
        fail("--compare: the figure needs the optional extra matplotlib: pip install matplotlib "
             "(the same numbers are printed above)")
    ts = sorted({name[1] for arm in arms for run in arm.runs for name in run.curves
                 if isinstance(name, tuple)}, reverse=True)
    colours = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"] * len(arms)
    styles = ["-", "--", ":", "-."] * len(ts)
    has_fid = any(seeds(arm, "fid") for arm in arms)
    top = [panel for panel in TOP_PANELS if panel[0] != "fid" or has_fid]  # no empty panel
    panels = [*top, *BOTTOM_PANELS]
    fig = Figure(figsize=(6.5 * len(top), 11.5), layout="constrained")
    grid = fig.add_gridspec(2, len(top))
    cells = [grid[0, i] for i in range(len(top))] + [grid[1, 0], grid[1, 1]]
    axes = {name: fig.add_subplot(cell) for (name, *_), cell in zip(panels, cells)}
    reference = baseline_arm(arms) or arms[0]
    base = dict(zip(*over_seeds(seeds(reference, "fm"))[:2]))  # {step: the reference's mean fm}
    for arm, colour in zip(arms, colours):
        band(axes["fm"], [{x: 100 * (y / base[x] - 1) for x, y in curve.items() if x in base}
                          for curve in seeds(arm, "fm")], colour)  # % above the reference
        band(axes["layersync"], seeds(arm, "layersync"), colour)
        if has_fid:
            band(axes["fid"], seeds(arm, "fid"), colour, "-", "o")
        for t, style in zip(ts, styles):
            band(axes["student"], seeds(arm, ("student", t)), colour, style, "o")
            for table, _, _ in BLOCK_TABLES:
                mean = band(axes[table], seeds(arm, (table, t)), colour, style, ".")
                for k, marker in zip((arm.student, arm.teacher), "v*"):  # the pair, marked
                    if k in mean:
                        axes[table].plot(k, mean[k], marker, markersize=13, color=colour,
                                         markeredgecolor="black")
    for ax, (_, title, xlabel, ylabel) in zip(axes.values(), panels):
        ax.set(title=title.format(ref=reference.label), xlabel=xlabel,
               ylabel=ylabel.format(ref=reference.label))
        if xlabel == "block":
            ax.xaxis.get_major_locator().set_params(integer=True)
        if "chance" in ylabel:
            ax.axhline(100 / arms[0].runs[0].config["model"]["num_classes"], color="grey",
                       linewidth=0.8, linestyle=":")
    for arm, spec in zip(arms, grid[1, 2:].subgridspec(1, len(arms))):  # (g) the last grids
        ax = fig.add_subplot(spec)
        ax.axis("off")
        if arm.runs[0].grid:
            ax.imshow(Image.open(arm.runs[0].grid), interpolation="nearest")
            ax.set_title(f"(g) {arm.label}:\n{os.path.basename(arm.runs[0].grid)}", fontsize=9)
    fig.legend(handles=[Line2D([], [], color=colour, linestyle=style, marker=marker, label=label,
                               markersize=10, markeredgecolor="black")
                        for colour, style, marker, label in legend(arms, colours, ts, styles)],
               loc="outside upper center", ncols=8, fontsize=11)  # one legend for every panel
    RunFiles.write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    print(f"figure: {path}")


def legend(arms: list, colours: list, ts: list, styles: list) -> list:
    """The figure's keys, (colour, line style, marker, label): arms, noise levels, the pair."""
    return ([(colour, "-", None, f"{arm.label} ({len(arm.runs)} seed{'s' * (len(arm.runs) > 1)})")
             for arm, colour in zip(arms, colours)]
            + [("black", style, None, f"probe at t={t:g}") for t, style in zip(ts, styles)]
            + [("grey", "none", "v", "student block"), ("grey", "none", "*", "teacher block")])


if __name__ == "__main__":
    main()
