"""Tests for datasets.Batches: batches built by tensor indexing give exactly the images of
the item-by-item path (TensorImages, Subsets, every composite of Sec. 3.1 / Fig. 4), land
on the requested device, are reproducible from a seed, and are built by one indexing (what
makes them fast); and the details of the ImageFolder loading (torchvision's listing) that
test_datasets.py leaves open.

The composites are built twice: from the fake MNIST/Fashion/CIFAR-10 files of
test_datasets.py (the loading path), and directly from small in-memory sources whose sizes
differ, so that mnist-fashion's `i % len(Fashion)` and mnist-cifar's partner range matter.
"""
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
from datasets import Batches, Composite, TensorImages
from test_datasets import fake_root  # noqa: F401  (a fixture: fake MNIST, Fashion, CIFAR-10)

KINDS = ("mnist-fashion", "mnist-noise", "mnist-cifar", "cifar-stripes")
INFO = datasets.DatasetInfo("fake", 10, [str(k) for k in range(10)], (0.2,) * 3, (0.3,) * 3)


def fake_images(n, channels, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, 32, 32), dtype=torch.uint8, generator=g)
    return TensorImages(images, torch.arange(n) % 10, INFO)


def composite(kind, train):
    """`kind` on 40 MNIST-like, 25 Fashion-like (fewer: the index wraps) and 45 CIFAR-like
    images (more: partners beyond the MNIST range) in memory."""
    mnist, fashion, cifar = fake_images(40, 1, 0), fake_images(25, 1, 1), fake_images(45, 3, 2)
    target, other = {"mnist-fashion": (mnist, fashion), "mnist-noise": (mnist, None),
                     "mnist-cifar": (mnist, cifar), "cifar-stripes": (cifar, None)}[kind]
    return Composite(kind, target, other, train, INFO)


def items(dataset, indices):
    """The item-by-item reference: (x (B, 3, 32, 32), y (B,)) from dataset[i]."""
    pairs = [dataset[i] for i in indices.tolist()]
    return torch.stack([x for x, _ in pairs]), torch.tensor([y for _, y in pairs])


def assert_batch_equal(batch, reference):
    x, y = batch
    assert x.dtype == torch.float32 and x.shape == (len(y), 3, 32, 32) and y.dtype == torch.long
    assert torch.equal(x, reference[0]) and torch.equal(y, reference[1])


INDICES = torch.tensor([37, 0, 3, 3, 24, 11])  # unordered, with a repeat; 37 wraps Fashion


# ----------------------------------------------------------------------- exactness
@pytest.mark.parametrize("channels", [1, 3])
def test_tensor_images_and_subset_batches_equal_items(channels):
    ds = fake_images(40, channels, seed=4)
    assert_batch_equal(Batches(ds, "cpu").get(INDICES), items(ds, INDICES))
    sub = datasets.subset(ds, 38, seed=3)  # positions of the subset, not of ds
    assert_batch_equal(Batches(sub, "cpu").get(INDICES), items(sub, INDICES))
    assert not torch.equal(Batches(sub, "cpu").get(INDICES)[0], Batches(ds, "cpu").get(INDICES)[0])
    subsub = torch.utils.data.Subset(sub, [5, 1, 24, 0])  # a Subset of a Subset
    assert_batch_equal(Batches(subsub, "cpu").get(torch.tensor([2, 0])),
                       items(sub, torch.tensor([24, 5])))
    x, y = datasets.to_tensors(sub)
    assert_batch_equal((x, y), items(sub, torch.arange(len(sub))))


@pytest.mark.parametrize("kind", KINDS)
def test_test_split_batches_equal_items(kind):
    """A test set draws each item's randomness from a generator seeded with its index, so
    batches (any order, any generator) hold exactly the items of dataset[i]."""
    ds = composite(kind, train=False)
    batches = Batches(ds, "cpu")
    reference = items(ds, INDICES)
    assert_batch_equal(batches.get(INDICES), reference)
    assert_batch_equal(batches.get(INDICES, torch.Generator().manual_seed(5)), reference)
    sub = datasets.subset(ds, 38, seed=1)
    assert_batch_equal(Batches(sub, "cpu").get(INDICES), items(sub, INDICES))
    assert_batch_equal(datasets.to_tensors(ds), items(ds, torch.arange(len(ds))))


@pytest.mark.parametrize("kind", KINDS)
def test_loaded_test_split_batches_equal_items(fake_root, kind):  # noqa: F811
    """The same through load_dataset / load_splits on the fake MNIST, Fashion and CIFAR-10."""
    root, _, _ = fake_root
    ds = datasets.load_dataset(kind, root, train=False)
    indices = torch.tensor([4, 0, 2, 2])
    assert_batch_equal(Batches(ds, "cpu").get(indices), items(ds, indices))
    _, test_set = datasets.load_splits(kind, root, None, 3, seed=0)
    assert_batch_equal(Batches(test_set, "cpu").get(torch.tensor([2, 0])),
                       items(test_set, torch.tensor([2, 0])))


@pytest.mark.parametrize("kind", KINDS)
def test_training_batch_equals_items_with_the_same_draws(kind):
    """Training composites draw fresh randomness: a batch composed with given draws equals
    the items dataset[i] that drew the same numbers (one formula for both paths)."""
    ds = composite(kind, train=True)
    draws, reference = [], []
    for k, i in enumerate(INDICES.tolist()):
        torch.manual_seed(100 + k)
        reference.append(ds[i])  # draws ds.draw(1) from the global RNG
        torch.manual_seed(100 + k)
        draws.append(ds.draw(1))
    x, y = ds.compose(INDICES, torch.cat(draws))
    assert_batch_equal((x, y), (torch.stack([r[0] for r in reference]),
                                torch.tensor([r[1] for r in reference])))
    # and with one draw for the whole batch, rebuilt item by item from its rows
    draws = ds.draw(len(INDICES), torch.Generator().manual_seed(0))
    x, y = ds.compose(INDICES, draws)
    for k in range(len(INDICES)):
        xk, yk = ds.compose(INDICES[k:k + 1], draws[k:k + 1])
        assert torch.equal(x[k], xk[0]) and y[k] == yk[0]


def test_draws_differ_per_item():
    """One batch holds different distractors for its items (not one draw for all)."""
    idx = torch.zeros(64, dtype=torch.long)  # the same image 64 times
    for kind in KINDS:
        x, y = Batches(composite(kind, train=True), "cpu").get(idx)
        assert len(torch.unique(x, dim=0)) > 1, kind
    stripes = Batches(composite("cifar-stripes", train=True), "cpu").get(idx)[1]
    assert set(stripes.tolist()) == {0, 1}


# ----------------------------------------------------------------------- device, seeds
@pytest.mark.parametrize("kind", ("images",) + KINDS)
@pytest.mark.parametrize("train", [True, False])
def test_batch_lands_on_the_device(kind, train):
    ds = fake_images(40, 1, 0) if kind == "images" else composite(kind, train)
    x, y = Batches(datasets.subset(ds, 38, seed=0), "meta").get(torch.tensor([3, 1, 37]))
    assert x.device.type == "meta" and y.device.type == "meta"
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long


@pytest.mark.parametrize("kind", KINDS)
def test_training_batches_follow_the_seed(kind):
    """The same generator seed gives the same training batch; another seed (epoch) another."""
    batches = Batches(composite(kind, train=True), "cpu")

    def batch(seed):
        return batches.get(INDICES, torch.Generator().manual_seed(seed))
    assert_batch_equal(batch(1), batch(1))  # the same seed: the same batch
    a, b = batch(1), batch(2)
    assert not (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))  # another epoch or seed
    torch.manual_seed(3)
    c = batches.get(INDICES)  # no generator: torch's global RNG
    torch.manual_seed(3)
    assert_batch_equal(batches.get(INDICES), c)


# ----------------------------------------------------------------------- one indexing per batch
# What makes Batches fast (tests/benchmark.py data: 0.06-0.6 ms for 32 against 0.6-6 ms item
# by item) is that a batch is built by one indexing, never item by item. That is tested here
# by counting calls, which no machine's speed or load can change.
def no_items(self, i):
    raise AssertionError("Batches built a batch item by item")


def record(monkeypatch, cls, names, calls):
    """Record the batch size of every call of cls.<name>, and refuse item-by-item access."""
    for name in names:
        real = getattr(cls, name)

        def recorded(self, first, *rest, name=name, real=real):
            calls.setdefault(name, []).append(first if isinstance(first, int) else len(first))
            return real(self, first, *rest)
        monkeypatch.setattr(cls, name, recorded)
    monkeypatch.setattr(cls, "__getitem__", no_items)


def test_a_batch_of_tensor_images_is_one_indexing(monkeypatch):
    ds = fake_images(500, 3, 0)
    expected = torch.stack([ds[i][0] for i in INDICES.tolist()])
    calls = {}
    record(monkeypatch, TensorImages, ["stored"], calls)
    x, _ = Batches(ds, "cpu").get(INDICES)
    assert torch.equal(x, expected) and calls == {"stored": [len(INDICES)]}
    x, _ = Batches(datasets.subset(ds, 400, seed=0), "cpu").get(INDICES)
    assert x.shape == (len(INDICES), 3, 32, 32) and calls["stored"][1:] == [len(INDICES)]


@pytest.mark.parametrize("kind", KINDS)
def test_a_training_composite_batch_is_one_draw_and_one_composition(monkeypatch, kind):
    ds = composite(kind, train=True)
    calls = {}
    record(monkeypatch, Composite, ["draw", "compose"], calls)
    monkeypatch.setattr(TensorImages, "__getitem__", no_items)
    x, y = Batches(ds, "cpu").get(INDICES)
    assert calls == {"draw": [len(INDICES)], "compose": [len(INDICES)]}
    assert x.shape == (len(INDICES), 3, 32, 32) and y.shape == (len(INDICES),)


# ----------------------------------------------------------------------- ImageFolder
def test_image_folder_keeps_train_labels_resizes_bilinearly_counts_non_square(tmp_path):
    """ImageFolder's listing and class numbers (sorted class folders, sorted files), the same
    in train/ and test/, grayscale repeated to RGB, PIL's bilinear 32×32 resize, and a
    warning that counts the non-square images."""
    gradient = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (48, 1)))  # L, 64×48
    for split, c in (("train", "ant"), ("train", "bee"), ("train", "cow"), ("test", "ant"),
                     ("test", "bee"), ("test", "cow")):
        (tmp_path / split / c).mkdir(parents=True)
        gradient.save(tmp_path / split / c / "0.png")
    gradient.save(tmp_path / "train" / "cow" / "1.png")
    Image.new("RGB", (32, 32), (9, 8, 7)).save(tmp_path / "train" / "cow" / "2.png")
    with pytest.warns(UserWarning) as warned:
        train, test = datasets.load_image_folder(str(tmp_path)).values()
    assert [str(w.message).split(";")[0] for w in warned] == [
        "4 of 5 images are not square", "3 of 3 images are not square"]
    assert train.info.class_names == ["ant", "bee", "cow"]
    assert train.labels.tolist() == [0, 1, 2, 2, 2] and test.labels.tolist() == [0, 1, 2]
    expected = torch.from_numpy(np.array(gradient.resize((32, 32), Image.BILINEAR)))
    assert torch.equal(train.images[0], expected.expand(3, 32, 32))  # gray repeated to RGB
    assert train.images[-1, :, 0, 0].tolist() == [9, 8, 7]


def test_image_folder_without_splits_holds_out_by_hash_in_a_permutation_seeded_with_0(tmp_path):
    """Without train/ and test/, each class's test images are the tenth of its files whose
    SHA-1 of the name comes first; both splits list their images in the order of randperm
    seeded with 0 over the sorted listing."""
    for k in range(30):
        (tmp_path / "ab"[k // 20]).mkdir(exist_ok=True)  # a: 20 images, b: 10
        Image.new("RGB", (32, 32), (k * 5, 0, 0)).save(tmp_path / "ab"[k // 20] / f"{k:02d}.png")
    splits = datasets.load_image_folder(str(tmp_path))
    names = [f"{k:02d}.png" for k in range(30)]
    first = {c: sorted(names[lo:hi], key=lambda n: hashlib.sha1(n.encode()).hexdigest())[:n]
             for c, lo, hi, n in (("a", 0, 20, 2), ("b", 20, 30, 1))}
    test = {names.index(n) for c in first for n in first[c]}
    order = torch.randperm(30, generator=torch.Generator().manual_seed(0)).tolist()
    assert splits["test"].images[:, 0, 0, 0].tolist() == [k * 5 for k in order if k in test]
    assert splits["train"].images[:, 0, 0, 0].tolist() == [k * 5 for k in order if k not in test]
