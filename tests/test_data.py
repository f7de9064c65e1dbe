import os
import pickle

import numpy as np
import pytest
import torch

from robustedge import RobustEdgeError
from robustedge.data import DeviceLoader, load_dataset, random_crop_flip


def test_digits_is_embedded_split_deterministically_and_disjoint(digits):
    assert digits.input_shape == (1, 16, 16) and digits.num_classes == 10
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    for split in (digits.train, digits.val, digits.test):
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
    again = load_dataset("digits")
    assert torch.equal(again.test.images, digits.test.images) and torch.equal(again.val.labels, digits.val.labels)
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.val.labels, digits.val.labels)
    rows = {tuple(img.flatten().tolist()) for img in digits.test.images}
    overlap = sum(tuple(img.flatten().tolist()) in rows for img in digits.train.images)
    assert overlap < 5  # a few digits images are exact duplicates in the source data; splits are by index


def test_digits_size_and_channels_are_configurable():
    ds = load_dataset("digits", image_size=32, channels=3)
    assert ds.input_shape == (3, 32, 32)
    assert torch.equal(ds.train.images[:, 0], ds.train.images[:, 2])


def test_train_n_keeps_a_seeded_random_subset_that_spans_the_classes():
    """``data.train_n``: the same images for the same seed, others for another, in the split's order, and
    random rather than a prefix, so a class-sorted split (an image folder) still gives every class."""
    from robustedge.data.splits import Split

    index = torch.arange(1000)
    images = torch.stack([index // 256, index % 256], 1).to(torch.uint8).view(-1, 1, 2, 1)  # each image: its index
    ordered = Split(images, index // 100)  # sorted by class, like an image folder

    def kept(split: Split) -> torch.Tensor:
        return split.images.view(-1, 2).long() @ torch.tensor([256, 1])

    a, b, other = ordered.subset(100, 0), ordered.subset(100, 0), ordered.subset(100, 1)
    assert len(a) == 100 and torch.equal(kept(a), kept(b)) and not torch.equal(kept(a), kept(other))
    assert torch.equal(a.labels, kept(a) // 100) and torch.all(kept(a)[1:] > kept(a)[:-1])  # in the split's order
    assert a.labels.bincount(minlength=10).min() >= 3  # a prefix would hold class 0 only
    for n in (None, 1000, 5000):
        assert ordered.subset(n, 0) is ordered


def test_int8_calibration_draws_from_the_images_a_train_n_run_trained_on():
    """The export's calibration images come from the model's training split as its run saw it, so a run
    with data.train_n calibrates its INT8 file on the images QAT's PTQ start calibrates on."""
    from robustedge.checkpoint import ModelMeta, ModelSpec
    from robustedge.data.registry import split_for_model

    spec = ModelSpec("resnet20", 10, 1, 0.25, 8)
    digits = load_dataset("digits", image_size=8, channels=1, seed=2)
    for train_n, expected in ((256, digits.train.subset(256, 2)), (None, digits.train)):
        meta = ModelMeta(spec, dataset="digits", extra={"data": {"seed": 2, "val_fraction": 0.1, "train_n": train_n}})
        split = split_for_model(meta, None, None, "train", None)
        assert torch.equal(split.images, expected.images) and torch.equal(split.labels, expected.labels)
    assert len(split_for_model(meta, None, None, "test", 10)) == 10


def test_cifar10_reader_reads_the_on_disk_format_without_download(tmp_path, write_cifar10):
    expected, test = write_cifar10(tmp_path)
    ds = load_dataset("cifar10", str(tmp_path), val_fraction=0.2)
    assert ds.classes[0] == "airplane" and ds.num_classes == 10
    assert len(ds.train) + len(ds.val) == 100 and len(ds.val) == 20
    assert torch.equal(ds.test.images, torch.from_numpy(test.reshape(-1, 3, 32, 32)))
    assert ds.test.labels.tolist() == list(range(10))
    # the folder itself is accepted as root too
    assert len(load_dataset("cifar10", str(tmp_path / "cifar-10-batches-py")).test) == 10


def test_cifar_reader_refuses_a_pickle_that_runs_code(tmp_path, write_cifar10):
    write_cifar10(tmp_path)

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as fh:
        pickle.dump({b"data": Exploit(), b"labels": [0]}, fh)
    with pytest.raises(RobustEdgeError, match="refusing to unpickle"):
        load_dataset("cifar10", str(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_cifar100_and_svhn_readers(tmp_path):
    import scipy.io

    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 30), ("test", 5)):
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
                         b"coarse_labels": [0] * n}, fh, protocol=2)
    ds = load_dataset("cifar100", str(tmp_path), channels=1, image_size=16)
    assert ds.num_classes == 100 and ds.input_shape == (1, 16, 16) and len(ds.test) == 5

    svhn = tmp_path / "svhn"
    svhn.mkdir()
    for name, n in (("train", 12), ("test", 4)):
        scipy.io.savemat(str(svhn / f"{name}_32x32.mat"),
                         {"X": rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8),
                          "y": np.array([[10]] + [[i % 9 + 1] for i in range(n - 1)], dtype=np.uint8)})
    ds = load_dataset("svhn", str(tmp_path), val_fraction=0.25)
    assert ds.input_shape == (3, 32, 32) and len(ds.train) == 9 and ds.test.labels[0] == 0


def test_imagefolder_and_tiny_imagenet_layouts(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)

    def png(path, size=8):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)

    wnids = ["n01", "n02", "n03"]
    (tmp_path / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for c in wnids:
        for i in range(4):
            png(tmp_path / "train" / c / "images" / f"{c}_{i}.JPEG")
    lines = []
    for i in range(6):
        png(tmp_path / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnids[i % 3]}\t0\t0\t7\t7")
    (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    ds = load_dataset("imagefolder", str(tmp_path), val_fraction=0.25)
    assert ds.classes == wnids and ds.input_shape == (3, 8, 8)
    assert len(ds.train) == 9 and len(ds.val) == 3 and ds.test.labels.tolist() == [0, 1, 2, 0, 1, 2]


def test_missing_data_and_bad_names_are_clear_errors(tmp_path):
    with pytest.raises(RobustEdgeError, match="valid datasets: cifar10, cifar100, digits"):
        load_dataset("mnist")
    with pytest.raises(RobustEdgeError, match="pass --download"):
        load_dataset("cifar10", str(tmp_path))
    with pytest.raises(RobustEdgeError, match="needs --data-root"):
        load_dataset("svhn")


def test_random_crop_flip_takes_shifted_windows_of_the_zero_padded_image():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6) + 1
    gen = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, padding=2, flip=True, generator=gen)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, r:r + 6, c:c + 6] for r in range(5) for c in range(5)]
        windows += [w.flip(-1) for w in windows]
        assert any(torch.equal(out[i], w) for w in windows)


def test_device_loader_is_a_function_of_seed_and_epoch_and_shards_for_ddp(digits):
    def batches(epoch, **kw):
        loader = DeviceLoader(digits.train, 100, augment=True, seed=3, **kw)
        loader.set_epoch(epoch)
        return list(loader)

    a, b, c = batches(1), batches(1), batches(2)
    assert all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    x, _ = a[0]
    assert x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0
    rank0, rank1 = batches(0, world_size=2, rank=0), batches(0, world_size=2, rank=1)
    n0, n1 = sum(len(y) for _, y in rank0), sum(len(y) for _, y in rank1)
    assert n0 == n1 == (len(digits.train) + 1) // 2
