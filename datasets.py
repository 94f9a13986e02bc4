"""Datasets for SimpleBits ("When less is more", Schirrmeister et al.), Sec. 3.1 and Fig. 4.

Every dataset yields (image, label): image float32 in [0,1] of shape (3,32,32), label int,
and carries `.info` (class names and the mean/std the classifier normalizes with).
Training loops take whole batches from `Batches(dataset, device).get(indices)`, built by
tensor indexing on the device with the same formulas as the items.

  * torchvision: mnist, fashionmnist, svhn, cifar10, cifar100, usps (grayscale resized
    to 32×32 bilinearly and repeated to 3 channels);
  * any ImageFolder directory (`--dataset /path/to/dir`, with or without train/ and test/);
  * the composite distractor datasets of Sec. 3.1 / Fig. 4: mnist-fashion, mnist-noise,
    mnist-cifar, cifar-stripes (built as the paper and the authors' repository do);
  * `shapes`: an offline synthetic set of coloured shapes on a busy textured background
    that carries no label information (the data of the quick demos and the tests), and
    `shapes-colour`: the same images labelled by the shape's colour.

Preview a dataset as a PNG grid:
    python datasets.py shapes --out shapes.png
    python datasets.py mnist-fashion --data-root data --out mnist-fashion.png
"""
import argparse
import difflib
import functools
import hashlib
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

import nets

DATASET_NAMES = ("mnist", "fashionmnist", "svhn", "cifar10", "cifar100", "usps",
                 "mnist-fashion", "mnist-noise", "mnist-cifar", "cifar-stripes", "shapes",
                 "shapes-colour")


class DatasetError(Exception):
    """An expected failure (missing files, unknown name, empty folder); one-sentence message."""


# The classifiers divide by the per-channel std: a channel that (nearly) never varies, such
# as green and blue of red shapes on black, would be divided by 0. Below this floor the std
# is the floor (no built-in dataset is there: shapes 0.18, CIFAR-10 0.20, MNIST 0.31).
STD_FLOOR = 0.1


@dataclass
class DatasetInfo:
    name: str
    num_classes: int
    class_names: list[str]
    mean: tuple[float, float, float]  # per channel, used inside the classifier's first layer
    std: tuple[float, float, float]  # per channel, at least STD_FLOOR

    def __post_init__(self):
        self.std = tuple(max(float(s), STD_FLOOR) for s in self.std)


DIGITS = [str(d) for d in range(10)]
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Ankle boot"]
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck"]
SHAPES = ["disk", "square", "triangle", "cross", "ring"]
COLOURS = ["red", "green", "cyan", "blue", "magenta"]  # hue bins of width 0.2 from red

# name -> (torchvision class, class names (None: take ds.classes), mean, std, where the
# files go). Mean/std: the authors' values (their wide_nf_net.py) for mnist, fashion,
# svhn, cifar10; the usual published values for cifar100 and usps.
TORCHVISION = {
    "mnist": (torchvision.datasets.MNIST, DIGITS, (0.1307,) * 3, (0.3081,) * 3,
              "{root}/MNIST/raw/ (the four idx files such as train-images-idx3-ubyte)"),
    "fashionmnist": (torchvision.datasets.FashionMNIST, FASHION, (0.2861,) * 3, (0.3530,) * 3,
                     "{root}/FashionMNIST/raw/ (the four idx files)"),
    "svhn": (torchvision.datasets.SVHN, DIGITS, (0.4377, 0.4438, 0.4728),
             (0.1980, 0.2010, 0.1970), "{root}/ (train_32x32.mat and test_32x32.mat)"),
    "cifar10": (torchvision.datasets.CIFAR10, CIFAR10, (0.4914, 0.4822, 0.4465),
                (0.2023, 0.1994, 0.2010),
                "{root}/cifar-10-batches-py/ (the extracted cifar-10-python.tar.gz)"),
    "cifar100": (torchvision.datasets.CIFAR100, None, (0.5071, 0.4865, 0.4409),
                 (0.2673, 0.2564, 0.2762),
                 "{root}/cifar-100-python/ (the extracted cifar-100-python.tar.gz)"),
    "usps": (torchvision.datasets.USPS, DIGITS, (0.2459,) * 3, (0.2977,) * 3,
             "{root}/ (usps.bz2 and usps.t.bz2)"),
}
# Every composite uses Normalize(0.2, 0.3), hard-coded in the authors' repository.
COMPOSITE_MEAN, COMPOSITE_STD = (0.2,) * 3, (0.3,) * 3


class TensorImages(Dataset):
    """Images in memory as uint8 (N, C, 32, 32), C = 1 or 3; items are float32 (3, 32, 32) / 255."""

    def __init__(self, images, labels, info):
        self.images, self.labels, self.info = images, labels.long(), info

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):  # batch() of one item, written out for speed
        x = self.images[i].float() / 255  # (C, 32, 32)
        return x.expand(3, -1, -1).contiguous(), int(self.labels[i])

    def to(self, device):
        """The same dataset with its uint8 images on `device` (CIFAR-10: 150 MB, moved once)."""
        return TensorImages(self.images.to(device), self.labels.to(device), self.info)

    def stored(self, indices):
        """Items `indices` (B,) with the channels as stored: float32 (B, C, 32, 32), labels (B,),
        on the images' device."""
        indices = indices.to(self.images.device)  # index_select: faster than images[indices]
        return self.images.index_select(0, indices).float() / 255, self.labels[indices]

    def batch(self, indices, generator=None):
        """Items `indices` (B,) as RGB, grayscale repeated; nothing random (`generator` unused)."""
        x, y = self.stored(indices)  # (B, C, 32, 32)
        return x.expand(-1, 3, -1, -1).contiguous(), y


def to_uint8_32(images):
    """(N, C, H, W) uint8 -> (N, C, 32, 32) uint8: bilinear resize, rounded back to 8 bit
    (MNIST/Fashion 28→32, USPS 16→32, like the authors' Resize(32))."""
    if images.shape[-2:] == (32, 32):
        return images.contiguous()
    out = [F.interpolate(chunk.float() / 255, size=(32, 32), mode="bilinear", align_corners=False)
           for chunk in images.split(10000)]
    return (torch.cat(out) * 255).round().clamp(0, 255).to(torch.uint8)


# ----------------------------------------------------------------------- torchvision sources
def source_files(name, train):
    """The files (relative to the root) that torchvision needs to load a split of `name`;
    MNIST and Fashion-MNIST need all four idx files for either split."""
    if name in ("mnist", "fashionmnist"):
        folder = "MNIST" if name == "mnist" else "FashionMNIST"
        return [f"{folder}/raw/{split}-{kind}-ubyte" for split in ("train", "t10k")
                for kind in ("images-idx3", "labels-idx1")]
    if name == "svhn":
        return ["train_32x32.mat" if train else "test_32x32.mat"]
    if name == "usps":
        return ["usps.bz2" if train else "usps.t.bz2"]
    if name == "cifar10":
        return [f"cifar-10-batches-py/{f}" for f in
                [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]]
    return [f"cifar-100-python/{f}" for f in ("train", "test", "meta")]


def first_line(error):
    """The first sentence of an exception's message (its type when it has none)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0][:120]


@functools.lru_cache(maxsize=None)
def load_torchvision(name, root, train, download):
    """Materialise a torchvision dataset once per process as a TensorImages. Files that are
    all in place are read, never downloaded again; a missing, unreadable or mismatched file
    is one sentence naming it."""
    cls, class_names, mean, std, place = TORCHVISION[name]
    split = {"split": "train" if train else "test"} if name == "svhn" else {"train": train}
    files = source_files(name, train)
    missing = [f for f in files if not os.path.exists(os.path.join(root, f))]
    place = place.format(root=root.rstrip("/"))
    try:
        ds = cls(root, download=download and bool(missing), **split)
    except Exception as e:  # network down, bad root, missing or corrupt files
        cause = first_line(e)
        if not missing:  # every file is there: one of them cannot be read
            bad = unreadable(root, files)
            raise DatasetError(
                f"The files of dataset '{name}' are in {place} but could not be read ({cause})"
                + (f": {bad} is not a complete idx file; replace it" if bad else
                   "; replace them") + " with the original files and run again.") from None
        if len(missing) < len(files):
            raise DatasetError(
                f"Dataset '{name}' in root '{root}' lacks {', '.join(missing)} (the other files "
                f"are there{f', and downloading failed: {cause}' if download else ''}); place "
                "the missing files there by hand and run again.") from None
        raise DatasetError(
            f"Could not {'download' if download else 'find'} dataset '{name}' in root '{root}' "
            f"({cause}); place its files in {place} by hand and run again.") from None
    data = torch.as_tensor(np.asarray(ds.data))
    labels = torch.as_tensor(np.asarray(ds.labels if name == "svhn" else ds.targets))
    if len(labels) != len(data):
        pair = ([f for f in files if f.split("/")[-1].startswith("train" if train else "t10k")]
                if name in ("mnist", "fashionmnist") else [place])
        raise DatasetError(f"Dataset '{name}' in root '{root}' has {len(data)} "
                           f"{'training' if train else 'test'} images but {len(labels)} labels "
                           f"({' and '.join(pair)} disagree); replace them with the original "
                           "files and run again.")
    if data.ndim == 3:  # grayscale (N, H, W)
        data = data[:, None]
    elif data.shape[-1] == 3:  # CIFAR stores (N, H, W, 3)
        data = data.permute(0, 3, 1, 2)
    info = DatasetInfo(name, len(class_names or ds.classes), list(class_names or ds.classes),
                       mean, std)
    return TensorImages(to_uint8_32(data), labels, info)


def unreadable(root, files):
    """The first MNIST-format file of `files` that torchvision cannot parse (None if all
    parse, or for other formats, whose loaders do not say which file failed)."""
    for f in files:
        if f.endswith("-ubyte"):
            try:
                torchvision.datasets.mnist.read_sn3_pascalvincent_tensor(os.path.join(root, f))
            except Exception:
                return f
    return None


# ----------------------------------------------------------------------- ImageFolder
# Every image as uint8 (3, 32, 32): ImageFolder's loader opens it as RGB (grayscale repeated),
# then a bilinear resize to 32×32 (PIL's, on the whole image), as the paper did for MIMIC-CXR.
RESIZE_32 = v2.Compose([v2.Resize((32, 32), interpolation=v2.InterpolationMode.BILINEAR),
                        v2.PILToTensor()])


def read_image(file):
    """An image file as a PIL RGB image, read at its real bit depth: 16-bit grayscale (mode
    I;16, what medical and scientific images usually are) is scaled by 65535 to 8 bits, not
    clipped at 255 as PIL's convert("RGB") would; grayscale is repeated to 3 channels."""
    try:
        with Image.open(file) as img:
            img.load()
    except Exception as e:
        raise DatasetError(f"Cannot read image file '{file}' ({type(e).__name__}).") from None
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PNG"):
        pixels = np.asarray(img, dtype=np.float64) / 65535  # PNG holds at most 16 bits
        img = Image.fromarray((pixels * 255).round().clip(0, 255).astype(np.uint8), mode="L")
    elif img.mode in ("I", "F"):
        kind = "floats" if img.mode == "F" else "32-bit integers"
        raise DatasetError(f"Cannot read image file '{file}': its pixels are {kind} without a "
                           "fixed range; save it as an 8- or 16-bit image.")
    return img.convert("RGB")


def _read_images(samples):
    """ImageFolder (file, label) pairs -> uint8 (N, 3, 32, 32), labels (N,). Non-square images
    are squashed, with a warning. A folder that takes more than a few seconds to read (a
    2000×1500 JPEG takes ~45 ms) shows its progress."""
    images, non_square = [], 0
    progress = nets.Progress(len(samples), "reading images")
    for file, _ in samples:
        img = read_image(file)
        non_square += img.width != img.height
        images.append(RESIZE_32(img))
        progress.update()
    progress.close()
    if non_square:
        warnings.warn(f"{non_square} of {len(samples)} images are not square; they are resized to "
                      "32×32 without cropping, which changes their aspect ratio.", stacklevel=2)
    return torch.stack(images), torch.tensor([label for _, label in samples])


def visible(name):
    return not name.startswith(".")


def image_files(folder):
    """The image files below `folder` (ImageFolder's extensions, any depth), sorted as
    ImageFolder sorts them; hidden files and folders (.ipynb_checkpoints, ...) left out."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if visible(d)]
        found.append((root, sorted(f for f in files
                                   if visible(f) and f.lower().endswith(IMG_EXTENSIONS))))
    return [os.path.join(root, f) for root, files in sorted(found) for f in files]


def is_run_output(folder):
    """A folder this project's scripts wrote (a run's args.json below it, or a quick-glow/
    cache): never a class, so `--dataset .` with runs/ inside trains on the data only."""
    if os.path.basename(folder) == "quick-glow":
        return True
    return any("args.json" in files for _, _, files in os.walk(folder, followlinks=True))


def class_folders(folder):
    """The classes of an ImageFolder split, {name: its image files}: its visible
    sub-folders, sorted, that are not run outputs. A class folder without a single image
    file is one sentence naming it."""
    try:
        names = sorted(e.name for e in os.scandir(folder) if e.is_dir() and visible(e.name)
                       and not is_run_output(e.path))
    except OSError as e:
        raise DatasetError(f"Folder '{folder}' cannot be read ({e.strerror or e}).") from None
    classes = {name: image_files(os.path.join(folder, name)) for name in names}
    for name, files in classes.items():
        if not files:
            raise DatasetError(
                f"Class folder '{os.path.join(folder, name)}' holds no image file "
                f"({', '.join(IMG_EXTENSIONS)}); add images, or move it out of '{folder}'.")
    return classes


def held_out(files, class_folder):
    """The test images of one class of a folder without train/ and test/: a tenth of its
    `files` (rounded; one of a class of 2 to 14), the first in the order of a SHA-1 of
    their paths inside `class_folder`. So every class is in the test split in proportion,
    the split is the same on every run and machine, and a new image moves at most one
    other between the splits."""
    n_test = 0 if len(files) < 2 else max(1, round(len(files) / 10))
    digest = {f: hashlib.sha1(os.path.relpath(f, class_folder).encode()).hexdigest()
              for f in files}
    return sorted(files, key=digest.get)[:n_test]


SPLIT_NAMES = ("train", "test", "val", "valid", "validation")  # never class names


@functools.lru_cache(maxsize=None)
def load_image_folder(path):
    """{'train', 'test'} -> TensorImages for an ImageFolder tree; mean/std from its train images.

    The classes are the visible sub-folders that hold images (class_folders). With train/
    and test/ sub-folders they are the splits and must hold the same classes; otherwise
    each class is split 90/10 (held_out).
    """
    path = os.path.abspath(path)
    has_splits = all(os.path.isdir(os.path.join(path, s)) for s in ("train", "test"))
    splits = {s: os.path.join(path, s) for s in ("train", "test")} if has_splits else {"all": path}
    found = {s: class_folders(folder) for s, folder in splits.items()}  # s -> {class: files}
    split_like = [name for name in found.get("all", ()) if name.lower() in SPLIT_NAMES]
    if has_splits:
        unused = sorted(e.name + "/" for e in os.scandir(path) if e.is_dir() and visible(e.name)
                        and e.name not in ("train", "test") and not is_run_output(e.path))
        if unused:
            warnings.warn(f"Folder '{path}': only train/ and test/ are used; "
                          f"{', '.join(unused)} left out.", stacklevel=2)
    if split_like:  # train/ and val/, say: not two classes "train" and "val"
        raise DatasetError(f"Folder '{path}' has {', '.join(n + '/' for n in split_like)} but "
                           "not both train/ and test/, so its sub-folders would be taken as "
                           "classes; name the splits train/ and test/ (e.g. `ln -s val test`), "
                           "or put the class folders directly in it.")
    classes = {s: list(found[s]) for s in found}
    if has_splits and classes["train"] != classes["test"]:
        only = {s: sorted(set(classes[s]) - set(classes[t])) for s, t in (("train", "test"),
                                                                           ("test", "train"))}
        raise DatasetError(f"Folder '{path}': train/ and test/ hold different classes (only in "
                           f"train/: {', '.join(only['train']) or 'none'}; only in test/: "
                           f"{', '.join(only['test']) or 'none'}); give both the same class "
                           "sub-folders.")
    classes = next(iter(classes.values()))
    if not classes:
        raise DatasetError(f"Folder '{path}' holds no class sub-folders with images: it needs "
                           "one sub-folder per class, either directly or inside train/ and test/.")

    # (file, label) per split, labels numbered by the sorted class names
    listed = {s: [(file, label) for label, name in enumerate(classes) for file in found[s][name]]
              for s in found}
    if has_splits:
        samples = listed
    else:
        test = {file for name in classes
                for file in held_out(found["all"][name], os.path.join(path, name))}
        if not test:
            raise DatasetError(f"Folder '{path}' leaves no test images after the 90/10 split "
                               "(every class has one image); add images.")
        alone = [name for name in classes if len(found["all"][name]) == 1]
        if alone:
            warnings.warn(f"Folder '{path}': {len(alone)} class(es) of one image ("
                          f"{', '.join(alone)}), used for training only: the test split has "
                          "none of them.", stacklevel=2)
        every = listed["all"]  # in a fixed mixed order, as torchvision's datasets come
        perm = torch.randperm(len(every), generator=torch.Generator().manual_seed(0)).tolist()
        samples = {"train": [every[k] for k in perm if every[k][0] not in test],
                   "test": [every[k] for k in perm if every[k][0] in test]}
    if len(classes) < 2:
        only = os.path.join(next(iter(splits.values())), classes[0])
        inner = sorted(e.name + "/" for e in os.scandir(only)
                       if e.is_dir() and visible(e.name) and image_files(e.path))
        hint = (f"; its images are in the sub-folders {', '.join(inner[:5])}"
                f"{', ...' if len(inner) > 5 else ''} of '{only}': if those are the classes, "
                "give that folder" if len(inner) > 1 else "")
        warnings.warn(f"Folder '{path}' has {len(classes)} class sub-folder(s); a classifier "
                      f"needs at least two classes{hint}.", stacklevel=2)
    data = {s: _read_images(samples[s]) for s in samples}  # s -> (images, labels)
    pixels = data["train"][0].float().div(255).transpose(0, 1).reshape(3, -1)  # (3, N*32*32)
    info = DatasetInfo(os.path.basename(path), len(classes), classes,
                       tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).tolist()))
    return {s: TensorImages(*data[s], info) for s in data}


# ----------------------------------------------------------------------- composites (Fig. 4)
def index_generator(i):
    """Generator seeded from the index: test sets of composites are fixed per item."""
    return torch.Generator().manual_seed(int(i))


class Composite(Dataset):
    """A distractor dataset of Sec. 3.1 / Fig. 4 built on the fly from 32×32 sources:
    `draw` makes the randomness, `compose` the images (one formula for items and batches).
    Train sets draw afresh on every access; test sets from a generator seeded with the
    index, so they are fixed (the authors redrew the test stripes on every access)."""

    def __init__(self, kind, target, other, train, info):
        self.kind, self.target, self.other, self.train, self.info = kind, target, other, train, info

    def __len__(self):
        return len(self.target)

    def __getitem__(self, i):  # a batch of one
        x, y = self.batch(torch.tensor([i]))
        return x[0], int(y[0])

    def to(self, device):
        """The same dataset with its uint8 sources on `device`."""
        other = None if self.other is None else self.other.to(device)
        return Composite(self.kind, self.target.to(device), other, self.train, self.info)

    def draw(self, n, generator=None):
        """The randomness of n items, drawn on the CPU (the same numbers on every device):
        mnist-fashion (n,) bool, Fashion on the left; mnist-noise (n, 3, 32, 32) noise in
        [0, 1); mnist-cifar (n,) CIFAR-10 partners; cifar-stripes (n,) labels, 0 = horizontal."""
        if self.kind == "mnist-fashion":
            return torch.rand(n, generator=generator) < 0.5
        if self.kind == "mnist-noise":
            return torch.rand((n, 3, 32, 32), generator=generator)
        if self.kind == "mnist-cifar":
            return torch.randint(len(self.other), (n,), generator=generator)
        return torch.randint(2, (n,), generator=generator)

    def batch(self, indices, generator=None):
        """Items `indices` (B,), with fresh draws (train) or each item's own draws (test)."""
        if self.train:
            draws = self.draw(len(indices), generator)
        else:  # a Python loop over the few random numbers only; the images are built batched
            draws = torch.cat([self.draw(1, index_generator(i)) for i in indices.tolist()])
        return self.compose(indices, draws)

    def compose(self, indices, draws):
        """Items `indices` (B,) built with `draws` (B, ...) of `draw`, on the sources' device:
        (x float32 (B, 3, 32, 32), y long (B,)). MNIST stays one channel until the end (the
        formulas act per channel), which makes mnist-fashion's resize 3× cheaper."""
        x, y = self.target.stored(indices)  # (B, C, 32, 32), C = 1 (MNIST) or 3 (CIFAR-10)
        draws = draws.to(x.device)
        if self.kind == "mnist-fashion":
            # MNIST[i] beside Fashion[i] in random order along the width -> (B, 1, 32, 64), then
            # bilinear resize back to 32×32 (no antialias, as kornia.resize): halves 32×16.
            f, _ = self.other.stored(indices % len(self.other))  # (B, 1, 32, 32)
            fashion_left = draws[:, None, None, None]  # (B, 1, 1, 1)
            pair = torch.where(fashion_left, torch.cat([f, x], 3), torch.cat([x, f], 3))
            x = F.interpolate(pair, size=(32, 32), mode="bilinear", align_corners=False)
        elif self.kind == "mnist-noise":
            # 0.5·x + 0.5·U(0,1), per pixel and channel (the paper's text; the authors'
            # later code multiplied the noise by x).
            x = 0.5 * x + 0.5 * draws  # (B, 3, 32, 32)
        elif self.kind == "mnist-cifar":
            # 0.5/0.5 interpolation with a random CIFAR-10 partner.
            x = 0.5 * x + 0.5 * self.other.stored(draws)[0]  # (B, 3, 32, 32)
        else:  # cifar-stripes: x = 0.85·image + 0.15·s, s(t) = 0.5·sin(t) + 0.5, t in [0, 11π]
            # Label 0 = horizontal, 1 = vertical as in the paper (authors' code: 1 = horizontal).
            y = draws
            t = torch.linspace(0, 11 * math.pi, 32, device=x.device)  # 5.5 periods over 32 px
            s = 0.5 * torch.sin(t) + 0.5  # (32,)
            horizontal = (y == 0)[:, None, None, None]  # (B, 1, 1, 1)
            stripes = torch.where(horizontal, s[:, None], s[None, :])  # (B, 1, 32, 32)
            x = 0.85 * x + 0.15 * stripes  # same stripes in every channel
        return x.expand(-1, 3, -1, -1).contiguous(), y


def load_composite(name, root, train, download):
    """The composite `name` on top of the cached torchvision sources (same split)."""
    def source(n):
        return load_torchvision(n, root, train, download)
    if name == "cifar-stripes":
        target, other, classes = source("cifar10"), None, ["horizontal", "vertical"]
    else:  # MNIST digit is the label; the partner is the distractor
        partner = {"mnist-fashion": "fashionmnist", "mnist-cifar": "cifar10"}.get(name)
        target, other, classes = source("mnist"), partner and source(partner), DIGITS
    info = DatasetInfo(name, len(classes), classes, COMPOSITE_MEAN, COMPOSITE_STD)
    return Composite(name, target, other, train, info)


# ----------------------------------------------------------------------- shapes (offline)
def make_shapes(n, seed, label="shape"):
    """n coloured shapes on a busy, label-free background: uint8 (n, 3, 32, 32), labels (n,):
    the shape, or with label="colour" the hue of the shape in five bins (`COLOURS`).

    Balanced classes, random centre, radius 6.5-10 px, saturated hue. The background
    (smooth 4×4 colour field + pixel noise, in [0.25, 0.75]) is independent of the label:
    a simplifier can drop all of it. One in five is plain (no noise), so a Glow trained
    on these images learns that plain backgrounds are cheap, as natural-image Glows do (Fig. 2).
    """
    g = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % len(SHAPES))[torch.randperm(n, generator=g)]
    smooth = F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(32, 32), mode="bilinear",
                           align_corners=False)  # (n, 3, 32, 32) low-frequency colour
    noise = torch.rand(n, 3, 32, 32, generator=g)
    plain = torch.rand(n, 1, 1, 1, generator=g) < 0.2  # no pixel noise on one image in five
    bg = 0.25 + 0.5 * (0.5 * smooth + 0.5 * torch.where(plain, 0.5, noise))
    # Saturated colour from a random hue (HSV with S = 1, V in [0.8, 1]).
    hue, value = torch.rand(n, 1, generator=g), 0.8 + 0.2 * torch.rand(n, 1, generator=g)
    rgb = torch.cat([(6 * hue - 3).abs() - 1, 2 - (6 * hue - 2).abs(), 2 - (6 * hue - 4).abs()], 1)
    colour = (rgb.clamp(0, 1) * value)[:, :, None, None]  # (n, 3, 1, 1)
    # Geometry: radius r in [6.5, 10] px and a centre that keeps the shape inside the image.
    r = (6.5 + 3.5 * torch.rand(n, generator=g))[:, None, None]  # (n, 1, 1)
    cy, cx = (r + 1 + torch.rand(2, n, 1, 1, generator=g) * (29 - 2 * r)).unbind(0)
    t = torch.arange(32.0)
    dy, dx = t[None, :, None] - cy, t[None, None, :] - cx  # (n, 32, 1), (n, 1, 32)
    d = (dx ** 2 + dy ** 2).sqrt()  # (n, 32, 32)
    masks = torch.stack([
        d <= r,                                                                 # disk
        torch.maximum(dx.abs(), dy.abs()) <= 0.8 * r,                           # square
        (dy <= 0.6 * r) & (dx.abs() <= 0.577 * (dy + r)),                       # triangle
        ((dx.abs() <= 0.3 * r) & (dy.abs() <= r)) | ((dy.abs() <= 0.3 * r) & (dx.abs() <= r)),
        (d <= r) & (d >= 0.55 * r),                                             # ring
    ], 1)  # (n, 5, 32, 32)
    mask = masks[torch.arange(n), labels][:, None]  # (n, 1, 32, 32)
    x = torch.where(mask, colour, bg)
    if label == "colour":  # the same images; the label is the hue bin, not the shape
        labels = (hue[:, 0] * len(COLOURS)).long().clamp(max=len(COLOURS) - 1)
    return (x * 255).round().to(torch.uint8), labels


@functools.lru_cache(maxsize=None)
def load_shapes(train, label="shape"):
    """`shapes` (label: the shape) or `shapes-colour` (the same images, label: the hue bin;
    a second task on the same images for the continual-learning demo of S11)."""
    n = 5000 if train else 1000  # default sizes of the quick demos
    images, labels = make_shapes(n, 0 if train else 1, label)  # different train/test seeds
    if not train:  # normalization statistics always come from the training images
        return TensorImages(images, labels, load_shapes(True, label).info)
    pixels = images.float().div(255).transpose(0, 1).reshape(3, -1)  # (3, N*32*32)
    names = list(SHAPES) if label == "shape" else list(COLOURS)
    info = DatasetInfo("shapes" if label == "shape" else "shapes-colour", len(names), names,
                       tuple(pixels.mean(1).tolist()), tuple(pixels.std(1).tolist()))
    return TensorImages(images, labels, info)


# ----------------------------------------------------------------------- public entry points
def load_dataset(name, root="data", train=True, download=True):
    """The dataset `name` (see DATASET_NAMES, or a path to an ImageFolder directory).

    Items are (image float32 (3, 32, 32) in [0, 1], label int); `.info` is a DatasetInfo.
    Raises DatasetError with one sentence when the data cannot be found or read.
    """
    if name in TORCHVISION:
        return load_torchvision(name, os.path.abspath(root), bool(train), bool(download))
    if name in ("shapes", "shapes-colour"):  # exact names: ./shapes_mine is a folder
        return load_shapes(bool(train), "shape" if name == "shapes" else "colour")
    if name in DATASET_NAMES:
        return load_composite(name, os.path.abspath(root), bool(train), bool(download))
    if os.path.isdir(name):
        return load_image_folder(os.path.abspath(name))["train" if train else "test"]
    if os.path.exists(name):
        raise DatasetError(f"Dataset path '{name}' is not a directory; give an ImageFolder folder.")
    close = difflib.get_close_matches(name, DATASET_NAMES, n=1)
    raise DatasetError(f"Unknown dataset '{name}'" + (f" (did you mean {close[0]}?)" if close
                                                      else "")
                       + f"; valid names are {', '.join(DATASET_NAMES)}, or the path of an "
                       "ImageFolder directory.")


def dataset_names(text):
    """The comma-separated dataset names of `text` (glow.py's --dataset, --continual's
    tasks). A folder whose own name has a comma cannot be one of them: one sentence."""
    if "," in text and os.path.isdir(text):
        raise DatasetError(f"'{text}' is a folder whose name has a comma, but commas separate "
                           "dataset names here; rename the folder, or link it under a name "
                           "without a comma.")
    return text.split(",")


def load_splits(name, root, train_size, test_size, seed, log=print):
    """The training and test split of `name`, each a fixed random subset of the given size
    (None: all), the same for the same seed: what every mode script starts from. Logs the
    classes and the number of images of each split (a run's first lines)."""
    train_set = subset(load_dataset(name, root, train=True), train_size, seed)
    test_set = subset(load_dataset(name, root, train=False), test_size, seed)
    names = train_set.info.class_names
    missing = absent_classes(train_set)
    if missing:
        warnings.warn(f"The random training subset of {len(train_set)} images has no image of "
                      f"{len(missing)} class(es) ({', '.join(missing[:10])}"
                      f"{', ...' if len(missing) > 10 else ''}): the networks never see them; "
                      "raise --train-size.", stacklevel=2)
    log(f"data {name}: {len(names)} classes ({', '.join(names[:10])}"
        f"{', ...' if len(names) > 10 else ''}), {len(train_set)} training and "
        f"{len(test_set)} test images")
    return train_set, test_set


def subset(dataset, n, seed):
    """A fixed random subset of n items (the same for the same seed), keeping `.info`."""
    if n is None or n >= len(dataset):
        return dataset
    if n <= 0:
        raise DatasetError(f"A subset needs a positive number of images, got {n}.")
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    sub = Subset(dataset, sorted(perm[:n].tolist()))
    sub.info = dataset.info
    return sub


def absent_classes(dataset):
    """The names of the classes without an item in `dataset` (a TensorImages or a Subset of
    one; a composite's labels are drawn per item, so none are named for it)."""
    base, index = unwrap(dataset, "absent_classes")
    if not isinstance(base, TensorImages):
        return []
    counts = torch.bincount(base.labels[index].long(), minlength=base.info.num_classes)
    return [name for name, n in zip(base.info.class_names, counts.tolist()) if n == 0]


def unwrap(dataset, who):
    """(the TensorImages or Composite under the Subsets of `dataset`, the positions of the
    items of `dataset` in it); `who` names the caller in the TypeError for anything else."""
    index = torch.arange(len(dataset))
    while isinstance(dataset, Subset):  # positions in the subset -> items of its base
        index = torch.as_tensor(dataset.indices, dtype=torch.long)[index]
        dataset = dataset.dataset
    if not isinstance(dataset, (TensorImages, Composite)):
        raise TypeError(f"{who} takes a TensorImages or a Composite (or a Subset of one), "
                        f"not a {type(dataset).__name__}.")
    return dataset, index


def fingerprint(dataset, whole=False):
    """A short hash of the data a run takes from `dataset`: the stored uint8 images and
    labels of its items (with whole=True, of the whole split a subset was drawn from), its
    class names, and a composite's kind and sources. Runs compare this, not names: the
    same data under another name or --data-root matches, other data under the same name
    does not (a CIFAR-10 training split: 0.2 s)."""
    dataset, index = unwrap(dataset, "fingerprint")
    target, others = (dataset, []) if isinstance(dataset, TensorImages) else \
        (dataset.target, [dataset.other] if dataset.other is not None else [])
    digest = hashlib.sha256(json.dumps([dataset.info.class_names,
                                        getattr(dataset, "kind", None)]).encode())
    picked = whole or torch.equal(index, torch.arange(len(target)))
    for part, index in [(target, None if picked else index)] + [(o, None) for o in others]:
        images, labels = (part.images, part.labels) if index is None else \
            (part.images[index], part.labels[index])
        digest.update(images.cpu().contiguous().numpy())
        digest.update(labels.cpu().contiguous().numpy())
    return digest.hexdigest()[:16]


def identity(dataset):
    """What a saved model records of the data it was trained on, and what loading it
    checks (nets.load_model's `expect`): the dataset's name and the fingerprint of its whole
    training split (so any --train-size of the same data matches)."""
    return dict(dataset=dataset.info.name, data=fingerprint(dataset, whole=True))


def to_uint8(x):
    """Float images in [0, 1] -> uint8 (round(255·x)): what a PNG file holds."""
    return (x.detach().clamp(0, 1) * 255).round().to(torch.uint8)


class Batches:
    """Batches of a TensorImages or a Composite (or a Subset of one, as load_splits gives)
    built by tensor indexing on `device`: the uint8 sources move there once, and a batch is
    one indexing instead of one call per item (README, Speed). Usage:
    `x, y = Batches(train_set, device).get(indices)`."""

    def __init__(self, dataset, device):
        dataset, self.index = unwrap(dataset, "Batches")
        self.data = dataset.to(device)

    def __len__(self):
        return len(self.index)

    def get(self, indices, generator=None):
        """Items `indices` (B,) (CPU, long) as (x (B, 3, 32, 32) float32 in [0, 1], y (B,)
        long) on the device. `generator` (a CPU torch.Generator; None: torch's global RNG)
        draws a training composite's distractors; other datasets ignore it."""
        return self.data.batch(self.index[torch.as_tensor(indices, dtype=torch.long)], generator)


def to_tensors(dataset):
    """All items as (images (N, 3, 32, 32) float32, labels (N,) long), on the CPU."""
    batches = Batches(dataset, "cpu")
    # 5000 at a time: a 60k-image composite needs ~2 GB of intermediate tensors at once
    parts = [batches.get(idx) for idx in torch.arange(len(dataset)).split(5000)]
    return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])


def save_image_grid(images, path, nrow=8, captions=None):
    """Write images (N, 3, H, W) in [0, 1] as one PNG grid, atomically (temp file + rename);
    with captions, each image is upscaled (to at least 96 px) so the text under it is readable."""
    images = images.detach().float().cpu().clamp(0, 1)
    band = 0
    if captions is not None:
        scale = max(1, math.ceil(96 / images.shape[-1]))
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
        band = 14  # pixel rows for one line of the default PIL font
        images = F.pad(images, (0, 0, 0, band), value=1.0)  # white strip under each image
    grid = torchvision.utils.make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    img = Image.fromarray((grid * 255).round().byte().permute(1, 2, 0).numpy())
    if captions is not None:
        draw, font = ImageDraw.Draw(img), ImageFont.load_default()
        h, w = images.shape[-2:]
        for k, text in enumerate(captions[:len(images)]):
            text = str(text)
            while text and draw.textlength(text, font=font) > w - 2:
                text = text[:-1]  # clip to the tile width
            row, col = divmod(k, min(nrow, len(images)))
            draw.text((col * (w + 2) + 3, row * (h + 2) + 2 + h - band), text, fill=(0, 0, 0),
                      font=font)
    nets.save_png(img, path)


def export_image_folder(name, root, folder, classes=None):
    """Write both splits of dataset `name` as an ImageFolder, folder/{train,test}/<class>/
    <index>.png (8-bit PNGs: loading the folder gives back the same images), only the
    `classes` given (e.g. two of them for Fig. 7's view); "/" in a class name becomes "_".
    A folder that already holds files is refused. Returns {split: number of images}."""
    if os.path.isdir(folder) and os.listdir(folder):
        raise DatasetError(f"'{folder}' already holds files; give a new folder to export to.")
    counts = {}
    for split in ("train", "test"):
        ds = load_dataset(name, root, train=split == "train")
        names = ds.info.class_names
        keep = list(classes or names)
        unknown = [c for c in keep if c not in names]
        if unknown or len(set(keep)) < 2:
            raise DatasetError(f"--classes needs two or more different classes of {name} "
                               f"({', '.join(names)}); got {', '.join(keep)}.")
        x, y = to_tensors(ds)
        counts[split] = 0
        for i, (image, label) in enumerate(zip(to_uint8(x), y.tolist())):
            if names[label] in keep:
                path = os.path.join(folder, split, names[label].replace("/", "_"), f"{i:05d}.png")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
                counts[split] += 1
    return counts


# ----------------------------------------------------------------------- command line
def get_args(argv=None):
    parser = argparse.ArgumentParser(description="Save a PNG grid of 64 images of a dataset, "
                                                 "or export it as an ImageFolder.")
    parser.add_argument("dataset", help="a name from DATASET_NAMES or an ImageFolder path")
    parser.add_argument("--data-root", default="data", help="where torchvision data is stored")
    parser.add_argument("--test", action="store_true", help="show the test split")
    parser.add_argument("--out", default="dataset.png", help="PNG file to write")
    parser.add_argument("--export", default=None, metavar="FOLDER",
                        help="instead: write both splits as an ImageFolder in FOLDER "
                             "(train/<class>/ and test/<class>/ of PNGs)")
    parser.add_argument("--classes", default=None, metavar="A,B,...",
                        help="with --export: only these classes (e.g. two, for Fig. 7)")
    args = parser.parse_args(argv)
    if args.classes and not args.export:
        parser.error("--classes goes with --export.")
    return args


def main(args):
    if args.export:
        counts = export_image_folder(args.dataset, args.data_root, args.export,
                                     args.classes and args.classes.split(","))
        print(f"{args.dataset}: {counts['train']} training and {counts['test']} test images "
              f"-> {args.export}")
        return
    ds = load_dataset(args.dataset, args.data_root, train=not args.test)
    x, y = to_tensors(subset(ds, 64, seed=0))
    save_image_grid(x, args.out, captions=[ds.info.class_names[int(c)] for c in y])
    print(f"{ds.info.name}: {len(ds)} images, {ds.info.num_classes} classes -> {args.out}")


if __name__ == "__main__":
    nets.console()
    args = get_args()
    try:
        main(args)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)  # one sentence, exit status 2, no traceback
        sys.exit(2)
