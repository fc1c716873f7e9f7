"""Sample from a train_cifar.py checkpoint: a PNG grid, an ADM-format .npz, and optionally FID.

    python sample.py --ckpt runs/layersync/last.pt --grid grid.png
    python sample.py --ckpt runs/layersync/last.pt --n 10000 --npz samples.npz --fid

The checkpoint's config rebuilds the model, so no model flags are needed. Labels are balanced
over the classes (i % num_classes) unless --class-label fixes one.
"""

import argparse
import math
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from layersync import SiT, guided_velocity, sample
from train_cifar import check_device, fail, load_checkpoint, load_cifar10


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="a last.pt written by train_cifar.py")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--method", choices=["heun", "euler"], default="heun")
    p.add_argument("--steps", type=int, default=50, help="ODE steps (Heun: 2 evaluations each)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance; 1 = none")
    p.add_argument("--n", type=int, default=64, help="number of images")
    p.add_argument("--class-label", type=int, help="sample only this class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--grid", help="write a PNG grid here")
    p.add_argument("--npz", help="write arr_0 (uint8 N,H,W,3) and arr_1 (labels) here, the ADM format")
    p.add_argument("--fid", action="store_true", help="FID against the CIFAR-10 training set (needs torch-fidelity)")
    p.add_argument("--data-dir", default="./data", help="where CIFAR-10 is, for --fid")
    args = p.parse_args(argv)
    if not (args.grid or args.npz or args.fid):
        p.error("nothing to write: give --grid PATH, --npz PATH and/or --fid")
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
    """Everything that can be checked before loading the model or drawing a sample, in one line each."""
    for name in ("n", "steps", "batch_size"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if not math.isfinite(args.cfg_scale):
        fail(f"--cfg-scale {args.cfg_scale}: must be a finite number (1 = no guidance)")
    check_device(args.device)
    if args.grid:
        check_output_path("--grid", args.grid, (".png", ".jpg", ".jpeg"))
    if args.npz:  # numpy would silently append .npz to any other name
        check_output_path("--npz", args.npz, (".npz",))


def load_model(args, device):
    checkpoint = load_checkpoint(args.ckpt)
    config = checkpoint["config"]
    model = SiT(**config["model"])
    model.load_state_dict(checkpoint["model" if args.no_ema else "ema"])
    return model.to(device).eval(), config, checkpoint["step"]


@torch.no_grad()
def generate(args, model, labels, size: int, device) -> torch.Tensor:
    """uint8 images (N, H, W, 3); the noise comes from a CPU generator, so --seed gives the same
    images whatever the device and batch size."""
    generator = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(len(labels), model.in_channels, size, size, generator=generator)
    out = []
    for start in tqdm(range(0, len(labels), args.batch_size), desc="sampling", unit="batch"):
        x = noise[start:start + args.batch_size].to(device)
        y = labels[start:start + args.batch_size].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            images = sample(guided_velocity(model, y, args.cfg_scale), x, args.steps, args.method)
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [-1, 1] -> 0..255
        out.append(pixels.permute(0, 2, 3, 1).cpu())
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
    reference, _, _ = load_cifar10(data_dir)  # (N, 3, 32, 32) uint8, downloaded if absent
    try:  # torch-fidelity downloads these weights on first use
        torch_fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    except Exception as error:
        fail(f"--fid: torch-fidelity could not load its Inception weights ({type(error).__name__}: {error}). "
             f"Run once with internet access (they are cached under ~/.cache/torch), or write --npz "
             f"and compute FID elsewhere")
    return UInt8Images(reference.permute(0, 2, 3, 1))


def compute_fid(images: torch.Tensor, reference, device) -> float:
    """FID of the samples against the 50,000 CIFAR-10 training images (torch-fidelity)."""
    import torch_fidelity
    metrics = torch_fidelity.calculate_metrics(
        input1=UInt8Images(images), input2=reference, input2_cache_name="layersync-cifar10-train",
        fid=True, cuda=device.type == "cuda", verbose=False)
    return metrics["frechet_inception_distance"]


def main(argv=None):
    args = parse_args(argv)
    device = check_device(args.device)
    model, config, step = load_model(args, device)
    num_classes = config["model"]["num_classes"]
    if args.class_label is not None and not 0 <= args.class_label < num_classes:
        fail(f"--class-label {args.class_label}: the model has classes 0..{num_classes - 1}")
    if args.cfg_scale != 1 and model.y_embedder.table.num_embeddings == num_classes:
        fail(f"--cfg-scale {args.cfg_scale}: this model was trained without label dropout, so it has "
             f"no null class to guide with; use --cfg-scale 1")
    reference = prepare_fid(config["model"], args.data_dir) if args.fid else None
    if args.class_label is None:
        labels = torch.arange(args.n) % num_classes
    else:
        labels = torch.full((args.n,), args.class_label)
    images = generate(args, model, labels, config["model"]["input_size"], device)
    print(f"{len(images)} images from step {step} ({'raw' if args.no_ema else 'EMA'} weights), "
          f"{args.method} {args.steps} steps, cfg {args.cfg_scale}")
    if args.grid:
        from torchvision.utils import save_image
        columns = num_classes if args.class_label is None else 8
        save_image(images.permute(0, 3, 1, 2).float() / 255, args.grid, nrow=min(columns, len(images)))
        print(f"grid: {args.grid}")
    if args.npz:
        np.savez(args.npz, arr_0=images.numpy(), arr_1=labels.numpy())
        print(f"npz: {args.npz}")
    if args.fid:
        print(f"FID vs CIFAR-10 train ({len(images)} samples): {compute_fid(images, reference, device):.2f}")


if __name__ == "__main__":
    sys.exit(main())
