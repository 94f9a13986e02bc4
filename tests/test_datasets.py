"""Tests for datasets.py: real torchvision loading on tiny fake files, ImageFolder trees,
the composite constructions of Sec. 3.1 / Fig. 4, the offline shapes set, and the helpers.

No test touches the network: fake MNIST/Fashion idx files and a USPS bz2 file are written
into tmp_path, CIFAR-10 is replaced by an in-memory class with the same attributes.
"""
import bz2
import math
import os
import struct
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import datasets  # noqa: E402
import nets  # noqa: E402
from datasets import DatasetError, load_dataset  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------- fake sources
def write_idx(folder, prefix, images, labels):
    """MNIST idx format: big-endian magic, sizes, then raw uint8 bytes."""
    os.makedirs(folder, exist_ok=True)
    n, h, w = images.shape
    with open(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), "wb") as f:
        f.write(struct.pack(">iiii", 2051, n, h, w) + images.astype(np.uint8).tobytes())
    with open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
        f.write(struct.pack(">ii", 2049, n) + labels.astype(np.uint8).tobytes())


def fake_mnist_root(root, folder="MNIST", n_train=12, n_test=6, seed=0):
    """Write random 28×28 digits of both splits; returns {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n) % 10
        write_idx(os.path.join(root, folder, "raw"), prefix, images, labels)
        data[prefix] = (images, labels)
    return data


def resized(images28):
    """Reference: bilinear 28->32 (align_corners False), rounded to 8 bit, in [0,1]."""
    x = torch.from_numpy(images28).float()[:, None] / 255
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    return (x * 255).round() / 255


def bilinear_matrix(n_in, n_out):
    """(n_out, n_in) weights of 1-D bilinear resizing with half-pixel centres (align_corners
    False, no antialiasing): output pixel j reads the input at s = (j + 0.5)·n_in/n_out − 0.5,
    clamped at the first pixel, as (1 − w)·in[⌊s⌋] + w·in[⌊s⌋ + 1], w = s − ⌊s⌋."""
    m = np.zeros((n_out, n_in))
    for j in range(n_out):
        s = max((j + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(s)), n_in - 1)
        w = s - i0
        m[j, i0] += 1 - w
        m[j, min(i0 + 1, n_in - 1)] += w
    return m


def index_draws(i):
    """The test split of a composite draws its randomness from a generator seeded with i."""
    return torch.Generator().manual_seed(i)


class FakeCIFAR10:
    """Stands in for torchvision.datasets.CIFAR10: (N, 32, 32, 3) uint8 numpy data."""

    def __init__(self, root, train=True, download=False):
        rng = np.random.default_rng(1 if train else 2)
        self.data = rng.integers(0, 256, (8 if train else 5, 32, 32, 3), dtype=np.uint8)
        self.targets = list(range(len(self.data)))
        self.classes = datasets.CIFAR10


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    """tmp root with fake MNIST and FashionMNIST files and an in-memory CIFAR-10."""
    mnist = fake_mnist_root(str(tmp_path), "MNIST", seed=0)
    fashion = fake_mnist_root(str(tmp_path), "FashionMNIST", seed=1)
    entry = datasets.TORCHVISION["cifar10"]
    monkeypatch.setitem(datasets.TORCHVISION, "cifar10", (FakeCIFAR10,) + entry[1:])
    return str(tmp_path), mnist, fashion


def cifar_images(train):
    return torch.from_numpy(FakeCIFAR10("", train).data).permute(0, 3, 1, 2).float() / 255


# ----------------------------------------------------------------------- torchvision loading
@pytest.mark.parametrize("download", [False, True])  # True: files exist, nothing downloaded
def test_mnist_idx_files_resized_to_3x32x32(fake_root, download):
    root, mnist, _ = fake_root
    for train, key in ((True, "train"), (False, "t10k")):
        ds = load_dataset("mnist", root, train=train, download=download)
        images, labels = mnist[key]
        assert len(ds) == len(images)
        x, y = ds[3]
        assert x.dtype == torch.float32 and x.shape == (3, 32, 32)
        assert 0 <= x.min() and x.max() <= 1
        assert y == int(labels[3]) and isinstance(y, int)
        assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])  # grayscale repeated
        assert torch.allclose(x[0], resized(images)[3, 0], atol=1e-6)
    assert ds.info.num_classes == 10 and ds.info.mean == (0.1307,) * 3
    assert ds.info.std == (0.3081,) * 3


def test_grayscale_28_to_32_is_bilinear_written_out(fake_root):
    """MNIST is resized 28→32 bilinearly (authors' Resize(32)), stored as 8 bit, and the
    gray channel is repeated to 3 channels: every pixel lies within half a grey level of the
    hand-computed bilinear value, and a nearest, align-corners or truncating resize does not."""
    root, mnist, _ = fake_root
    ds = load_dataset("mnist", root, train=True, download=False)
    m = bilinear_matrix(28, 32)  # (32, 28)
    # s_0 = −0.0625 → pixel 0; s_1 = 0.8125; s_2 = 1.6875 (scale 28/32 = 0.875)
    assert np.allclose(m[:3, :3], [[1, 0, 0], [0.1875, 0.8125, 0], [0, 0.3125, 0.6875]])
    for i, img in enumerate(mnist["train"][0]):
        ref = torch.from_numpy(m @ img.astype(np.float64) @ m.T / 255)  # (32, 32) in [0, 1]
        x = ds[i][0].double()
        assert x.shape == (3, 32, 32)
        assert (x - ref).abs().max() <= 0.5 / 255 + 1e-6
        assert ((x * 255) - (x * 255).round()).abs().max() < 1e-4  # 8-bit levels k/255


def test_normalisation_constants_of_every_dataset(fake_root, monkeypatch):
    """The classifier's Normalize(mean, std): the authors' constants for MNIST, Fashion, SVHN
    and CIFAR-10, the usual CIFAR-100 ones, and (0.2, 0.3) for every composite (Sec. 3.1)."""
    root, _, _ = fake_root

    class FakeSVHN:
        def __init__(self, root, split="train", download=False):
            self.data = np.zeros((2, 3, 32, 32), dtype=np.uint8)  # SVHN stores (N, 3, 32, 32)
            self.labels = np.array([3, 7])

    class FakeCIFAR100(FakeCIFAR10):
        classes = [f"class{k}" for k in range(100)]

        def __init__(self, root, train=True, download=False):
            super().__init__(root, train, download)
            self.classes = FakeCIFAR100.classes

    for name, fake in (("svhn", FakeSVHN), ("cifar100", FakeCIFAR100)):
        monkeypatch.setitem(datasets.TORCHVISION, name, (fake,) + datasets.TORCHVISION[name][1:])
    expected = {
        "mnist": ((0.1307,) * 3, (0.3081,) * 3),
        "fashionmnist": ((0.2861,) * 3, (0.3530,) * 3),
        "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
        "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
        "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
        "mnist-fashion": ((0.2,) * 3, (0.3,) * 3),
        "mnist-noise": ((0.2,) * 3, (0.3,) * 3),
        "mnist-cifar": ((0.2,) * 3, (0.3,) * 3),
        "cifar-stripes": ((0.2,) * 3, (0.3,) * 3),
    }
    for name, (mean, std) in expected.items():
        for train in (True, False):
            info = load_dataset(name, root, train=train, download=False).info
            assert (info.mean, info.std) == (mean, std), name
    assert load_dataset("svhn", root, download=False)[1][1] == 7
    assert load_dataset("cifar100", root, download=False).info.num_classes == 100


def test_fashion_info_and_usps_16_to_32(fake_root, tmp_path):
    root, _, fashion = fake_root
    ds = load_dataset("fashionmnist", root, train=True, download=False)
    assert ds.info.class_names[0] == "T-shirt/top" and ds.info.mean == (0.2861,) * 3
    assert torch.allclose(ds[0][0][0], resized(fashion["train"][0])[0, 0], atol=1e-6)
    # USPS is a bz2 libsvm file: "label idx:value ..." with label 1..10 and values in [-1, 1].
    rng = np.random.default_rng(3)
    pixels = rng.uniform(-1, 1, (4, 256)).astype(np.float32)
    with bz2.open(tmp_path / "usps.bz2", "wt") as f:
        for k, p in enumerate(pixels):
            f.write(f"{k + 1} " + " ".join(f"{i + 1}:{v:.6f}" for i, v in enumerate(p)) + "\n")
    usps = load_dataset("usps", str(tmp_path), train=True, download=True)
    assert len(usps) == 4 and [usps[k][1] for k in range(4)] == [0, 1, 2, 3]
    raw = ((pixels.reshape(4, 16, 16) + 1) / 2 * 255).astype(np.uint8)
    x16 = torch.from_numpy(raw).float()[:, None] / 255
    ref = F.interpolate(x16, size=(32, 32), mode="bilinear", align_corners=False)
    ref = (ref * 255).round() / 255
    assert usps[2][0].shape == (3, 32, 32) and torch.allclose(usps[2][0][1], ref[2, 0], atol=1e-6)


def test_cifar_channels_last_converted(fake_root):
    root, _, _ = fake_root
    ds = load_dataset("cifar10", root, train=False)
    ref = cifar_images(False)
    assert len(ds) == 5 and ds.info.class_names[3] == "cat"
    assert torch.allclose(ds[4][0], ref[4]) and ds.info.std == (0.2023, 0.1994, 0.2010)


def test_missing_files_error_names_dataset_root_and_folder(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", str(tmp_path / "empty"), train=True, download=False)
    msg = str(e.value)
    assert "'mnist'" in msg and str(tmp_path / "empty") in msg and "MNIST/raw" in msg
    assert msg.count(". ") == 0 and msg.endswith(".")  # one sentence


def test_download_failure_is_caught(tmp_path, monkeypatch):
    class Offline:
        def __init__(self, root, download=False, **kwargs):
            assert download
            raise RuntimeError("Error downloading train_32x32.mat: no network")

    entry = datasets.TORCHVISION["svhn"]
    monkeypatch.setitem(datasets.TORCHVISION, "svhn", (Offline,) + entry[1:])
    with pytest.raises(DatasetError, match=r"download dataset 'svhn'.*no network.*train_32x32"):
        load_dataset("svhn", str(tmp_path), train=True, download=True)


@pytest.mark.parametrize("labels", [4, 9])  # fewer, then more labels than the 6 images
def test_mnist_labels_that_disagree_with_the_images_are_one_sentence(tmp_path, labels):
    fake_mnist_root(str(tmp_path))
    rng = np.random.default_rng(0)
    write_idx(str(tmp_path / "MNIST" / "raw"), "t10k",
              rng.integers(0, 256, (6, 28, 28)), np.arange(6) % 10)
    path = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    path.write_bytes(struct.pack(">ii", 2049, labels) + bytes(range(labels)))
    assert len(load_dataset("mnist", str(tmp_path), train=True)) == 12  # its files agree
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", str(tmp_path), train=False, download=True)
    msg = str(e.value)
    assert f"6 test images but {labels} labels" in msg and "t10k-labels-idx1-ubyte" in msg
    assert "t10k-images-idx3-ubyte" in msg and msg.count(". ") == 0


@pytest.mark.parametrize("download", [False, True])
def test_a_missing_mnist_file_is_named_not_another_one(tmp_path, monkeypatch, download):
    fake_mnist_root(str(tmp_path))
    os.remove(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte")
    tried = []
    monkeypatch.setattr(torchvision.datasets.MNIST, "download",
                        lambda self: tried.append(1) or (_ for _ in ()).throw(
                            RuntimeError("Error downloading train-images-idx3-ubyte.gz")))
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", str(tmp_path), train=True, download=download)
    msg = str(e.value)
    assert "lacks MNIST/raw/t10k-labels-idx1-ubyte" in msg and msg.count(". ") == 0
    assert ("downloading failed" in msg) == download and len(tried) == download


def test_a_corrupt_mnist_file_is_named_and_not_downloaded_again(tmp_path, monkeypatch):
    fake_mnist_root(str(tmp_path))
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])  # cut short, as an interrupted copy
    monkeypatch.setattr(torchvision.datasets.MNIST, "download",
                        lambda self: pytest.fail("files in place must not be downloaded"))
    with pytest.raises(DatasetError) as e:
        load_dataset("mnist", str(tmp_path), train=True, download=True)
    msg = str(e.value)
    assert "could not be read" in msg and "download" not in msg
    assert "MNIST/raw/train-images-idx3-ubyte is not a complete idx file" in msg
    assert msg.count(". ") == 0


def test_unknown_name_lists_valid_names(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("imagenet", str(tmp_path))
    assert all(name in str(e.value) for name in datasets.DATASET_NAMES)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset(str(tmp_path / "file.txt"))


# ----------------------------------------------------------------------- ImageFolder
def write_png(path, colour, size):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


COLOURS = {"cat": (255, 0, 0), "dog": (0, 0, 255), "emu": (0, 255, 0)}


def test_built_in_names_match_exactly_and_a_typo_is_named(tmp_path, monkeypatch):
    # an ImageFolder whose name starts like a built-in set trains on its own images
    for c in ("cat", "dog"):
        for k in range(2):
            write_png(str(tmp_path / "shapes_mine" / c / f"{k}.png"), COLOURS[c], (32, 32))
    monkeypatch.chdir(tmp_path)
    mine = load_dataset("shapes_mine", train=True)
    assert mine.info.class_names == ["cat", "dog"]  # not the five shapes
    with pytest.raises(DatasetError, match="Unknown dataset 'shapes-color' .did you mean "
                                           "shapes-colour"):
        load_dataset("shapes-color")
    assert load_dataset("shapes-colour").info.class_names == datasets.COLOURS


def test_image_folder_with_train_and_test(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for c, colour in COLOURS.items():
            for k in range(n):
                write_png(str(tmp_path / split / c / f"{k}.png"), colour, (40 + k, 20))
    train = load_dataset(str(tmp_path), train=True)
    test = load_dataset(str(tmp_path), train=False)
    assert (len(train), len(test)) == (9, 6)
    assert train.info.class_names == ["cat", "dog", "emu"] and train.info.num_classes == 3
    x, y = test[2]  # sorted: cat 0.png, cat 1.png, dog 0.png
    assert x.shape == (3, 32, 32) and y == 1
    assert torch.allclose(x, torch.tensor([0.0, 0.0, 1.0])[:, None, None].expand(3, 32, 32))
    assert train.info.mean == pytest.approx((1 / 3,) * 3, abs=1e-5)  # one third each colour
    assert train.info.std == pytest.approx((math.sqrt(2 / 9),) * 3, abs=1e-3)


def reds(ds):
    """Sorted red values (0..255) of the top-left pixel of every item."""
    return sorted(round(float(ds[i][0][0, 0, 0]) * 255) for i in range(len(ds)))


def test_image_folder_without_splits_is_split_90_10(tmp_path):
    for k in range(20):
        folder = tmp_path / ("a" if k < 10 else "b")
        write_png(str(folder / f"{k:02d}.png"), (k * 10, 0, 0), (32, 32))
    train, test = load_dataset(str(tmp_path), train=True), load_dataset(str(tmp_path), train=False)
    assert (len(train), len(test)) == (18, 2)
    assert sorted(reds(train) + reds(test)) == [k * 10 for k in range(20)]  # disjoint, complete
    datasets.load_image_folder.cache_clear()
    assert reds(load_dataset(str(tmp_path), train=False)) == reds(test)  # deterministic split
    images, _ = datasets.to_tensors(train)
    assert train.info.mean[0] == pytest.approx(float(images[:, 0].mean()), abs=1e-5)
    assert train.info.mean[1] == 0.0


def split_of(root):
    """{class: sorted file names in the test split} and the training labels in order."""
    datasets.load_image_folder.cache_clear()
    splits = datasets.load_image_folder(str(root))
    train, test = splits["train"], splits["test"]
    files = {c: sorted(f.name for f in (root / c).iterdir()) for c in test.info.class_names}
    reds_of = {c: {round(float(test[i][0][0, 0, 0]) * 255) for i in range(len(test))
                   if test.info.class_names[int(test[i][1])] == c} for c in files}
    return {c: sorted(f for f in files[c] if int(f[1:4]) in reds_of[c]) for c in files}, \
        [int(train[i][1]) for i in range(len(train))]


@pytest.mark.parametrize("splits", [("train", "val"), ("train",), ("Test",)])
def test_a_folder_with_split_names_but_not_train_and_test_is_refused(tmp_path, splits):
    """train/ and val/ (ImageNet's layout), or train/ alone, would be taken as the classes
    "train" and "val": one sentence naming them instead."""
    for split in splits:
        for c in ("cat", "dog"):
            for k in range(2):
                write_png(str(tmp_path / split / c / f"{k}.png"), COLOURS[c], (32, 32))
    datasets.load_image_folder.cache_clear()
    with pytest.raises(DatasetError, match="has " + ", ".join(f"{s}/" for s in sorted(splits))
                       + " but not both train/ and test/"):
        load_dataset(str(tmp_path))
    if "val" in splits:  # with test/ beside them, val/ is named as left out
        (tmp_path / "val").rename(tmp_path / "test")
        (tmp_path / "val" / "cat").mkdir(parents=True)
        datasets.load_image_folder.cache_clear()
        with pytest.warns(UserWarning, match="only train/ and test/ are used; val/ left out"):
            load_dataset(str(tmp_path))


def test_one_class_whose_images_sit_in_sub_folders_is_told_where_the_classes_may_be(tmp_path):
    """data/animals/{cat,dog}/ given as data/: one class "animals", and the warning names
    the sub-folders that were probably meant as classes."""
    for c in ("cat", "dog"):
        for k in range(2):
            write_png(str(tmp_path / "animals" / c / f"{k}.png"), COLOURS[c], (32, 32))
    datasets.load_image_folder.cache_clear()
    with pytest.warns(UserWarning, match=r"1 class sub-folder\(s\); a classifier needs at least "
                      r"two classes; its images are in the sub-folders cat/, dog/ of '.*animals'"):
        load_dataset(str(tmp_path))


def test_reading_a_folder_reports_progress_per_image(tmp_path, monkeypatch):
    """Every image read is one step of a Progress over the split (which prints only when
    reading takes more than a few seconds: large photographs, many files)."""
    seen = []

    class Recorder(nets.Progress):
        def __init__(self, total, desc, every=5.0):
            super().__init__(total, desc, every=0.0)  # print at every step
            seen.append(self)
    monkeypatch.setattr(nets, "Progress", Recorder)
    for k in range(7):
        write_png(str(tmp_path / "ab"[k % 2] / f"{k}.png"), (k, 0, 0), (32, 32))
    datasets.load_image_folder.cache_clear()
    splits = datasets.load_image_folder(str(tmp_path))
    assert [(p.total, p.count) for p in seen] == [(len(splits[s]),) * 2 for s in ("train", "test")]
    assert all(p.printed for p in seen)


def test_a_training_subset_without_a_class_is_named_in_a_warning(tmp_path):
    """--train-size 2 of two classes of 20: some seeds draw both classes (no warning),
    others one (a warning naming the other); a composite's drawn labels are not checked."""
    for split in ("train", "test"):
        for c, colour in (("ant", (250, 0, 0)), ("bee", (0, 0, 250))):
            for k in range(20 if split == "train" else 1):
                write_png(str(tmp_path / split / c / f"{k}.png"), colour, (32, 32))
    outcomes = set()
    for seed in range(6):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train, _ = datasets.load_splits(str(tmp_path), "data", 2, None, seed, log=print)
        drawn = {train.info.class_names[int(y)] for y in datasets.to_tensors(train)[1]}
        named = [str(w.message) for w in caught if "training subset" in str(w.message)]
        if drawn == {"ant", "bee"}:
            assert named == []
        else:
            (other,) = {"ant", "bee"} - drawn
            assert len(named) == 1 and f"1 class(es) ({other})" in named[0]
        outcomes.add(len(drawn))
    assert outcomes == {1, 2}  # both cases were seen
    info = datasets.DatasetInfo("stripes", 2, ["horizontal", "vertical"], (0.5,) * 3, (0.2,) * 3)
    target = datasets.TensorImages(torch.zeros(4, 3, 32, 32, dtype=torch.uint8),
                                   torch.zeros(4, dtype=torch.long), info)  # all label 0
    assert datasets.absent_classes(datasets.Composite("cifar-stripes", target, None, True,
                                                      info)) == []


def test_image_folder_split_is_per_class_and_stable(tmp_path):
    """Each class gives a tenth of its images (one of a small class) to the test split,
    whatever the other classes hold; adding an image moves at most one other; a class of
    one image trains only (a warning names it), and one image per class is refused."""
    sizes = {"big": 40, "mid": 12, "few": 3}
    for c, n in sizes.items():
        for k in range(n):  # the red value is the file's number: which file went where
            write_png(str(tmp_path / c / f"r{k:03d}.png"), (k, 0, 0), (32, 32))
    before, labels = split_of(tmp_path)
    assert {c: len(v) for c, v in before.items()} == {"big": 4, "mid": 1, "few": 1}
    assert labels != sorted(labels)  # classes mixed, as torchvision's datasets come
    write_png(str(tmp_path / "big" / "r099.png"), (99, 0, 0), (32, 32))
    write_png(str(tmp_path / "big" / "r098.png"), (98, 0, 0), (32, 32))
    after, _ = split_of(tmp_path)  # 42 images: still 4 test images of "big"
    assert after["mid"] == before["mid"] and after["few"] == before["few"]
    old = set(after["big"]) - {"r098.png", "r099.png"}
    assert len(old) >= 2 and old <= set(before["big"])  # at most one moved per new image
    for k in range(1, 3):
        os.remove(tmp_path / "few" / f"r{k:03d}.png")
    with pytest.warns(UserWarning, match=r"1 class\(es\) of one image \(few\)"):
        alone, _ = split_of(tmp_path)
    assert alone["few"] == [] and alone["mid"] == before["mid"]
    for c in ("big", "mid"):
        for f in (tmp_path / c).iterdir():
            if f.name != "r000.png":
                f.unlink()
    with pytest.raises(DatasetError, match="leaves no test images"):
        split_of(tmp_path)


def test_empty_or_unreadable_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="holds no class sub-folders with images"):
        load_dataset(str(tmp_path / "empty"))
    (tmp_path / "bad" / "cls").mkdir(parents=True)
    (tmp_path / "bad" / "cls" / "broken.png").write_bytes(b"not a png")
    for k in range(3):
        write_png(str(tmp_path / "bad" / "cls" / f"ok{k}.png"), (1, 2, 3), (8, 8))
    with pytest.raises(DatasetError, match="Cannot read image file .*broken.png"):
        load_dataset(str(tmp_path / "bad"))


def test_only_visible_class_folders_with_images_are_classes(tmp_path):
    root = tmp_path / "pets"
    for cls in ("cat", "dog"):
        for k in range(5):
            write_png(str(root / cls / f"{k}.png"), COLOURS[cls], (32, 32))
    (root / ".ipynb_checkpoints").mkdir()  # what Jupyter leaves
    write_png(str(root / "cat" / ".ipynb_checkpoints" / "0-checkpoint.png"), (9, 9, 9), (32, 32))
    write_png(str(root / "cat" / ".hidden.png"), (9, 9, 9), (32, 32))
    (root / "runs" / "run1").mkdir(parents=True)  # a run of `--dataset .` inside the data
    (root / "runs" / "run1" / "args.json").write_text("{}")
    write_png(str(root / "runs" / "run1" / "simplified.png"), (9, 9, 9), (32, 32))
    (root / "quick-glow").mkdir()
    (root / "quick-glow" / "glow.pt").write_bytes(b"cache")
    train, test = (load_dataset(str(root), train=t) for t in (True, False))
    assert train.info.class_names == ["cat", "dog"] and len(train) + len(test) == 10
    colours = {tuple((x[:, 0, 0] * 255).round().int().tolist()) for x, _ in list(train) + list(test)}
    assert colours == {COLOURS["cat"], COLOURS["dog"]}  # no hidden copy, no run output


@pytest.mark.parametrize("files", [[], ["notes.txt"], ["a.gif", "b.gif"]])
def test_a_class_folder_without_images_is_one_sentence(tmp_path, files):
    root = tmp_path / "pets"
    for cls in ("cat", "dog"):
        for k in range(5):
            write_png(str(root / cls / f"{k}.png"), COLOURS[cls], (32, 32))
    (root / "emu").mkdir()
    for name in files:
        (root / "emu" / name).write_bytes(b"GIF89a" if name.endswith(".gif") else b"text")
    with pytest.raises(DatasetError, match=r"Class folder '.*emu' holds no image file \(\.jpg"):
        load_dataset(str(root))


def test_train_and_test_with_other_classes_are_one_sentence(tmp_path):
    root = tmp_path / "pets"
    for split, classes in (("train", ("cat", "dog")), ("test", ("cat", "dog", "emu"))):
        for cls in classes:
            write_png(str(root / split / cls / "0.png"), COLOURS[cls], (32, 32))
    with pytest.raises(DatasetError, match=r"only in train/: none; only in test/: emu"):
        load_dataset(str(root))


def test_16_bit_images_are_read_at_their_bit_depth(tmp_path):
    root = tmp_path / "scans"
    for cls, level in (("dark", 8192), ("bright", 49152)):  # 1/8 and 3/4 of 65535
        for k in range(5):
            pixels = np.full((32, 32), level + k, dtype=np.uint16)
            os.makedirs(root / cls, exist_ok=True)
            Image.fromarray(pixels).save(root / cls / f"{k}.png")  # mode I;16
    assert Image.open(root / "dark" / "0.png").mode == "I;16"
    data = list(load_dataset(str(root))) + list(load_dataset(str(root), train=False))
    values = {round(float(x.mean()) * 255) for x, _ in data}
    assert values == {round(8192 / 65535 * 255), round(49152 / 65535 * 255)}  # 32 and 191


def test_a_folder_with_a_comma_where_commas_separate_names_is_one_sentence(tmp_path):
    folder = tmp_path / "scans,2024"
    for cls in ("cat", "dog"):
        write_png(str(folder / cls / "0.png"), COLOURS[cls], (32, 32))
    assert datasets.dataset_names("mnist,svhn") == ["mnist", "svhn"]
    with pytest.raises(DatasetError, match="has a comma, but commas separate dataset names"):
        datasets.dataset_names(str(folder))
    import glow
    with pytest.raises(DatasetError, match="has a comma"):
        glow.load_many(str(folder), "data", True, None, 0)


# ----------------------------------------------------------------------- composites (Fig. 4)
def test_mnist_fashion_side_by_side(fake_root):
    root, mnist, fashion = fake_root
    m = resized(mnist["t10k"][0]).expand(-1, 3, -1, -1)
    f = resized(fashion["t10k"][0]).expand(-1, 3, -1, -1)
    ds = load_dataset("mnist-fashion", root, train=False)
    assert ds.info.mean == (0.2,) * 3 and ds.info.std == (0.3,) * 3 and len(ds) == 6
    orders = set()
    for i in range(len(ds)):
        x, y = ds[i]
        assert y == int(mnist["t10k"][1][i]) and torch.equal(x, ds[i][0])  # fixed per index
        # Downscaling width 64 -> 32 bilinear averages the column pairs (2j, 2j+1).
        options = [torch.cat(p, 2) for p in ((m[i], f[i]), (f[i], m[i]))]
        options = [(o[..., 0::2] + o[..., 1::2]) / 2 for o in options]
        match = [torch.allclose(x, o, atol=1e-5) for o in options]
        assert sum(match) == 1
        fashion_first = bool(torch.rand((), generator=index_draws(i)) < 0.5)  # p = 0.5
        assert match.index(True) == int(fashion_first)
        orders.add(match.index(True))
    train = load_dataset("mnist-fashion", root, train=True)
    torch.manual_seed(0)
    draws = {tuple(train[0][0][0, 0, :2].tolist()) for _ in range(20)}
    assert len(draws) == 2  # the order is redrawn on every access in training
    assert orders == {0, 1}  # both orders occur in the (fixed) test set


def test_mnist_noise_formula_and_determinism(fake_root):
    root, mnist, _ = fake_root
    m = resized(mnist["t10k"][0]).expand(-1, 3, -1, -1)
    ds = load_dataset("mnist-noise", root, train=False)
    noise = torch.stack([2 * (ds[i][0] - 0.5 * m[i]) for i in range(len(ds))])  # U(0,1)
    assert noise.min() >= -1e-6 and noise.max() <= 1 + 1e-6
    assert abs(noise.mean() - 0.5) < 0.02 and abs(noise.var() - 1 / 12) < 0.01
    for i in range(len(ds)):  # 0.5·x + 0.5·U(0,1), one draw per pixel and channel
        expected = 0.5 * m[i] + 0.5 * torch.rand((3, 32, 32), generator=index_draws(i))
        torch.testing.assert_close(ds[i][0], expected, atol=1e-6, rtol=0)
    assert torch.equal(ds[1][0], ds[1][0]) and ds[1][1] == int(mnist["t10k"][1][1])
    train = load_dataset("mnist-noise", root, train=True)
    assert not torch.equal(train[1][0], train[1][0])  # fresh noise per access


def test_mnist_cifar_interpolation(fake_root):
    root, mnist, _ = fake_root
    for train, key in ((False, "t10k"), (True, "train")):
        m = resized(mnist[key][0]).expand(-1, 3, -1, -1)
        c = cifar_images(train)
        ds = load_dataset("mnist-cifar", root, train=train)
        partners = []
        for _ in range(12):
            x, y = ds[2]
            err = ((x - 0.5 * m[2] - 0.5 * c) ** 2).flatten(1).amax(1)  # vs every partner
            assert y == int(mnist[key][1][2]) and float(err.min()) < 1e-10
            partners.append(int(err.argmin()))
        assert (len(set(partners)) == 1) == (not train)  # fixed in test, random in train
    m, c = resized(mnist["t10k"][0]).expand(-1, 3, -1, -1), cifar_images(False)
    ds = load_dataset("mnist-cifar", root, train=False)
    for i in range(len(ds)):  # x = 0.5·mnist[i] + 0.5·cifar[j], j uniform over CIFAR-10
        j = int(torch.randint(len(c), (), generator=index_draws(i)))
        torch.testing.assert_close(ds[i][0], 0.5 * m[i] + 0.5 * c[j], atol=1e-6, rtol=0)


def test_cifar_stripes_orientation_matches_label(fake_root):
    root, _, _ = fake_root
    # s(t) = 0.5·sin(t) + 0.5 at t_k = 11π·k/31, k = 0..31: 5.5 periods over 32 pixels
    s = torch.tensor([0.5 * math.sin(11 * math.pi * k / 31) + 0.5 for k in range(32)])
    c = cifar_images(False)
    ds = load_dataset("cifar-stripes", root, train=False)
    assert ds.info.num_classes == 2 and ds.info.class_names == ["horizontal", "vertical"]
    labels = []
    for i in range(len(ds)):
        x, y = ds[i]
        stripes = (x - 0.85 * c[i]) / 0.15  # (3, 32, 32)
        # to 1e-4: the loader's float32 t (ulp 4e-6 near 11π) and x's rounding divided by
        # 0.15 put a few 1e-6 on each entry; the other orientation errs by up to 1
        if y == 0:  # horizontal: constant along each row, varies down the height
            assert torch.allclose(stripes, s[:, None].expand(3, 32, 32), atol=1e-4)
        else:  # vertical: constant along each column
            assert torch.allclose(stripes, s[None, :].expand(3, 32, 32), atol=1e-4)
        assert ds[i][1] == y and torch.equal(ds[i][0], x)  # fixed per index
        assert y == int(torch.randint(2, (), generator=index_draws(i)))  # p = 0.5 each
        labels.append(y)
    train = load_dataset("cifar-stripes", root, train=True)
    torch.manual_seed(0)
    assert {train[0][1] for _ in range(20)} == {0, 1}  # redrawn per access in training
    assert set(labels) == {0, 1}  # both orientations occur in the (fixed) test set


# ----------------------------------------------------------------------- shapes
def test_shapes_deterministic_balanced():
    a, la = datasets.make_shapes(200, seed=5)
    b, lb = datasets.make_shapes(200, seed=5)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, datasets.make_shapes(200, seed=6)[0])
    assert la.bincount().tolist() == [40] * 5
    train, test = load_dataset("shapes", train=True), load_dataset("shapes", train=False)
    assert (len(train), len(test)) == (5000, 1000) and train.info.num_classes == 5
    x, y = test[7]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert train.info.mean == test.info.mean  # statistics of the training images
    assert not torch.equal(train[0][0], test[0][0])  # different seeds for the splits


def test_shapes_background_carries_no_label_but_shape_does():
    train = load_dataset("shapes", train=True)  # cached per process
    x, labels = train.images.float() / 255, train.labels
    # The 1-px border is never covered by a shape: background only.
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], 2)  # (N, 3, 128)
    feat = border.mean(2)  # (N, 3) mean background colour
    class_means = torch.stack([feat[labels == c].mean(0) for c in range(5)])
    stderr = feat.std(0) / math.sqrt(1000)
    assert ((class_means - class_means.mean(0)).abs() < 4 * stderr).all()
    # The background is busy (pixel noise) on about four images in five, plain on the rest;
    # the shape is a flat saturated colour.
    busy = (border[:, :, 1:] - border[:, :, :-1]).abs().mean((1, 2)) > 0.05  # (N,)
    assert 0.75 < busy.float().mean() < 0.85
    chroma = x.amax(1) - x.amin(1)  # background <= 0.5, shape >= 0.8
    mask = chroma > 0.65  # (N, 32, 32)
    rows, cols = mask.any(2), mask.any(1)
    box = rows.sum(1) * cols.sum(1)
    fill = mask.flatten(1).sum(1) / box
    per_class = [float(fill[labels == c].mean()) for c in range(5)]
    assert per_class[1] > 0.95  # square fills its bounding box
    assert 0.7 < per_class[0] < 0.85  # disk ≈ π/4
    assert max(per_class[2:]) < 0.7  # triangle, cross and ring leave most corners empty


# ----------------------------------------------------------------------- helpers
def test_subset_and_to_tensors():
    ds = load_dataset("shapes", train=False)
    a, b, c = (datasets.subset(ds, 50, seed=s) for s in (0, 0, 1))
    assert len(a) == 50 and a.indices == b.indices and a.indices != c.indices
    assert a.info is ds.info
    assert datasets.subset(ds, None, 0) is ds and datasets.subset(ds, 10**6, 0) is ds
    with pytest.raises(DatasetError):
        datasets.subset(ds, 0, 0)
    images, labels = datasets.to_tensors(a)
    assert images.shape == (50, 3, 32, 32) and labels.dtype == torch.long
    assert torch.equal(images[5], a[5][0]) and labels[5] == a[5][1]


def test_to_tensors_generic_path(fake_root):
    root, mnist, _ = fake_root
    ds = load_dataset("mnist-noise", root, train=False)
    images, labels = datasets.to_tensors(ds)
    assert images.shape == (6, 3, 32, 32) and torch.equal(images[4], ds[4][0])
    assert labels.tolist() == mnist["t10k"][1].tolist()


def test_save_image_grid(tmp_path):
    images = torch.rand(10, 3, 32, 32)
    datasets.save_image_grid(images, str(tmp_path / "plain.png"), nrow=4)
    with Image.open(tmp_path / "plain.png") as img:
        assert img.size == (4 * 34 + 2, 3 * 34 + 2)
        tile = torch.tensor(np.asarray(img.convert("RGB"))[2:34, 2:34]).permute(2, 0, 1)
    assert (tile.float() - images[0] * 255).abs().max() <= 1
    path = tmp_path / "sub" / "captions.png"
    datasets.save_image_grid(images, str(path), nrow=5, captions=[f"c{k}" for k in range(10)])
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"))
    assert pixels.shape == (2 * (96 + 14 + 2) + 2, 5 * 98 + 2, 3)  # 3x upscale + text band
    band = pixels[2 + 96:2 + 96 + 14, 2:98]  # under the first image
    assert (band < 100).any() and (band > 200).any()  # dark text on white
    assert sorted(os.listdir(tmp_path / "sub")) == ["captions.png"]  # no temp file left


def test_shapes_colour_labels_the_hue_of_the_same_images():
    """shapes-colour: the images of `shapes`, labelled by the shape's hue in five bins of
    width 0.2 (red, green, cyan, blue, magenta). The shape is the most saturated pixel
    (the background is greyish): its hue, by colorsys, gives the label by hand."""
    import colorsys
    shapes = datasets.load_dataset("shapes", train=False)
    colour = datasets.load_dataset("shapes-colour", train=False)
    assert torch.equal(colour.images, shapes.images)
    assert colour.info.class_names == ["red", "green", "cyan", "blue", "magenta"]
    assert not torch.equal(colour.labels, shapes.labels)
    checked = 0
    for image, label in zip(colour.images[:200], colour.labels[:200]):
        pixels = image.reshape(3, -1).T.float() / 255  # (1024, 3)
        hsv = [colorsys.rgb_to_hsv(*p) for p in pixels.tolist()]
        hue = max(hsv, key=lambda v: v[1])[0]
        if abs(hue * 5 - round(hue * 5)) > 0.05:  # not within rounding of a bin edge
            assert int(hue * 5) % 5 == int(label), (hue, int(label))
            checked += 1
    assert checked > 150


def test_a_scripts_own_warnings_print_as_one_line_others_as_python_prints_them(tmp_path):
    """`python datasets.py FOLDER`: the project's warning is `warning: ...`, without the
    file, line and source of Python's format; a library's warning keeps that format."""
    for k in range(2):
        write_png(str(tmp_path / "data" / "only" / f"{k}.png"), (9, 9, 9), (40, 20))
    proc = subprocess.run([sys.executable, "datasets.py", str(tmp_path / "data"), "--out",
                           str(tmp_path / "grid.png")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert "warning: 1 of 1 images are not square; they are resized" in proc.stderr
    assert all(line.startswith("warning: ") for line in lines), lines
    assert "UserWarning" not in proc.stderr
    library = os.path.join(os.path.dirname(torch.__file__), "functional.py")
    python_format = nets.one_line_warning("careful", UserWarning, library, 7, "x = 1")
    assert python_format.startswith(f"{library}:7: UserWarning: careful")


def test_export_writes_an_image_folder_that_loads_back_the_same_images(tmp_path):
    """`python datasets.py shapes --export DIR --classes disk,ring`: an ImageFolder of the two
    classes, both splits, whose images load back bit for bit; an existing folder with files,
    an unknown class or a single class is one sentence."""
    folder = tmp_path / "disk-ring"
    proc = subprocess.run([sys.executable, "datasets.py", "shapes", "--export", str(folder),
                           "--classes", "disk,ring"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    for train in (True, False):
        original = load_dataset("shapes", train=train)
        x, y = datasets.to_tensors(original)
        keep = (y == 0) | (y == 4)  # disk, ring
        exported = load_dataset(str(folder), train=train)
        assert exported.info.class_names == ["disk", "ring"] and len(exported) == keep.sum()
        xe, ye = datasets.to_tensors(exported)  # files in index order within each class
        for label, c in ((0, 0), (1, 4)):
            assert torch.equal(xe[ye == label], x[y == c])
    for argv, words in ((["--classes", "disk,ring"], "already holds files"),
                        (["--classes", "disk,cat"], "two or more different classes")):
        target = folder if "already" in words else tmp_path / "other"
        proc = subprocess.run([sys.executable, "datasets.py", "shapes", "--export", str(target),
                               *argv], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr
