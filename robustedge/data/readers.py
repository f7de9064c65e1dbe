"""The dataset readers: digits (embedded), CIFAR-10/100, SVHN and image folders, each returning a
:class:`~robustedge.data.splits.Dataset` of uint8 tensors with seeded splits.

Readers parse the on-disk formats themselves rather than through torchvision's dataset classes:
those refuse any file whose md5 differs from the official archive, and CIFAR's python format is a
pickle. We read it with an unpickler that only admits numpy arrays, so a user's real copy, a tiny
test copy and a tampered file are all handled safely. torchvision is used only to *download*
(``--download``), where its md5 check is exactly what we want.

Every reader takes ``(root, image_size, channels, val_fraction, seed, download)``, the call
:func:`robustedge.data.load_dataset` makes.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from robustedge.data.splits import Dataset, Split, _seeded_holdout, _train_val
from robustedge.errors import RobustEdgeError
from robustedge.seeds import holdout_seed

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------

def _convert(images: torch.Tensor, image_size: int | None, channels: int | None) -> torch.Tensor:
    """Resize (antialiased bilinear) and convert channels of a uint8 NCHW tensor, staying uint8."""
    if channels is not None and channels != images.shape[1]:
        if images.shape[1] == 3 and channels == 1:
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        elif images.shape[1] == 1:
            images = images.expand(-1, channels, -1, -1).contiguous()
        else:
            raise RobustEdgeError(f"cannot convert {images.shape[1]}-channel images to {channels} channels")
    if image_size is not None and tuple(images.shape[-2:]) != (image_size, image_size):
        out = []
        for chunk in images.split(4096):
            resized = F.interpolate(chunk.float(), size=(image_size, image_size), mode="bilinear",
                                    antialias=True, align_corners=False)
            out.append(resized.round().clamp(0, 255).to(torch.uint8))
        images = torch.cat(out)
    return images.contiguous()


# --------------------------------------------------------------------------------------------
# digits: the embedded default
# --------------------------------------------------------------------------------------------

def _load_digits(root: str | None, image_size: int | None, channels: int | None, val_fraction: float,
                 seed: int, download: bool) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()  # shipped inside scikit-learn: no download
    images = torch.from_numpy(np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    images = _convert(images, image_size or 16, channels or 1)
    # 20% test, seeded; validation carved from the rest.
    rest, test_idx = _seeded_holdout(len(labels), 0.2, holdout_seed(seed, "test"))
    train, val = _train_val(images[rest], labels[rest], val_fraction, seed)
    return Dataset("digits", train, val, Split(images[test_idx], labels[test_idx]),
                   [str(i) for i in range(10)], {"source": "sklearn.datasets.load_digits"})


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickle format, read with a numpy-only unpickler)
# --------------------------------------------------------------------------------------------

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Admits exactly what a CIFAR batch holds: dicts, lists, strings, bytes and numpy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (not part of the CIFAR format)")


def _read_cifar_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = _NumpyOnlyUnpickler(io.BytesIO(fh.read()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise RobustEdgeError(f"{path} is not a CIFAR batch file: {exc}") from None
    if not isinstance(obj, dict):
        raise RobustEdgeError(f"{path} is not a CIFAR batch file (holds a {type(obj).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


_CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)],
                    test=["test_batch"], meta="batches.meta", label_key="labels", names_key="label_names",
                    tv="CIFAR10"),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test=["test"], meta="meta",
                     label_key="fine_labels", names_key="fine_label_names", tv="CIFAR100"),
}


def _find_folder(root: str | None, folder: str, name: str, download: bool,
                 fetch: Callable[[Path], None]) -> Path:
    if root is None:
        raise RobustEdgeError(f"dataset '{name}' needs --data-root (a folder holding {folder}/, "
                              f"or an empty folder plus --download)")
    base = Path(root).expanduser()
    for candidate in (base / folder, base):
        if candidate.name == folder and candidate.is_dir():
            return candidate
    if not download:
        raise RobustEdgeError(f"no {name} data under {base} (expected {base / folder}/); "
                              f"pass --download to fetch it")
    base.mkdir(parents=True, exist_ok=True)
    fetch(base)
    return base / folder


def _load_cifar(name: str, root: str | None, image_size: int | None, channels: int | None,
                val_fraction: float, seed: int, download: bool) -> Dataset:
    spec = _CIFAR[name]

    def fetch(base: Path) -> None:
        import torchvision.datasets as tvd

        getattr(tvd, spec["tv"])(str(base), train=True, download=True)  # md5-checked download

    folder = _find_folder(root, spec["folder"], name, download, fetch)
    parts = {}
    for split in ("train", "test"):
        images, labels = [], []
        for fname in spec[split]:
            path = folder / fname
            if not path.is_file():
                raise RobustEdgeError(f"{name}: missing file {path}")
            batch = _read_cifar_batch(path)
            try:
                data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                labels.append(np.asarray(batch[spec["label_key"]], dtype=np.int64))
            except (KeyError, ValueError) as exc:
                raise RobustEdgeError(f"{path}: malformed CIFAR batch ({exc})") from None
            images.append(data)
        parts[split] = (torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))
    meta_path = folder / spec["meta"]
    n_classes = 10 if name == "cifar10" else 100
    classes = [str(i) for i in range(n_classes)]
    if meta_path.is_file():
        names = _read_cifar_batch(meta_path).get(spec["names_key"], classes)
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in names]
    train_images = _convert(parts["train"][0], image_size, channels)
    train, val = _train_val(train_images, parts["train"][1], val_fraction, seed)
    test = Split(_convert(parts["test"][0], image_size, channels), parts["test"][1])
    return Dataset(name, train, val, test, classes, {"root": str(folder)})


# --------------------------------------------------------------------------------------------
# SVHN (MATLAB .mat, read with scipy.io: no pickle involved)
# --------------------------------------------------------------------------------------------

def _load_svhn(root: str | None, image_size: int | None, channels: int | None, val_fraction: float,
               seed: int, download: bool) -> Dataset:
    import scipy.io

    def fetch(base: Path) -> None:
        import torchvision.datasets as tvd

        target = base / "svhn"
        for split in ("train", "test"):
            tvd.SVHN(str(target), split=split, download=True)

    base = Path(root).expanduser() if root else None
    folder = base if base is not None and (base / "train_32x32.mat").is_file() else None
    if folder is None:
        folder = _find_folder(root, "svhn", "svhn", download, fetch)
    parts = {}
    for split in ("train", "test"):
        path = folder / f"{split}_32x32.mat"
        if not path.is_file():
            raise RobustEdgeError(f"svhn: missing file {path}")
        try:
            mat = scipy.io.loadmat(str(path))
            images = torch.from_numpy(np.transpose(mat["X"], (3, 2, 0, 1)).astype(np.uint8))
            labels = torch.from_numpy(mat["y"].astype(np.int64).reshape(-1) % 10)  # label 10 means digit 0
        except (KeyError, ValueError, OSError) as exc:
            raise RobustEdgeError(f"{path}: not an SVHN .mat file ({exc})") from None
        parts[split] = (images, labels)
    train, val = _train_val(_convert(parts["train"][0], image_size, channels), parts["train"][1], val_fraction, seed)
    test = Split(_convert(parts["test"][0], image_size, channels), parts["test"][1])
    return Dataset("svhn", train, val, test, [str(i) for i in range(10)], {"root": str(folder)})


# --------------------------------------------------------------------------------------------
# imagefolder (class sub-folders; Tiny-ImageNet's val_annotations.txt layout too)
# --------------------------------------------------------------------------------------------

def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _read_images(paths: list[Path], image_size: int, channels: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(paths), image_size, image_size, channels), dtype=np.uint8)
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                img = img.convert(mode)
                if img.size != (image_size, image_size):
                    img = img.resize((image_size, image_size), Image.BILINEAR)
                out[i] = np.asarray(img).reshape(image_size, image_size, channels)
        except (UnidentifiedImageError, OSError) as exc:
            raise RobustEdgeError(f"cannot read image {path}: {exc}") from None
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _load_imagefolder(root: str | None, image_size: int | None, channels: int | None, val_fraction: float,
                      seed: int, download: bool) -> Dataset:
    if root is None:
        raise RobustEdgeError("dataset 'imagefolder' needs --data-root (a folder with train/<class>/ images)")
    base = Path(root).expanduser()
    train_dir = base / "train"
    if not train_dir.is_dir():
        raise RobustEdgeError(f"no imagefolder data under {base}: expected {train_dir}/<class>/...")
    wnids = base / "wnids.txt"
    if wnids.is_file():
        classes = [line.strip() for line in wnids.read_text().splitlines() if line.strip()]
    else:
        classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise RobustEdgeError(f"{train_dir} must hold at least two class folders, found {len(classes)}")
    index = {c: i for i, c in enumerate(classes)}

    def labelled(folder: Path) -> tuple[list[Path], list[int]]:
        paths, labels = [], []
        annotations = folder / "val_annotations.txt"
        if annotations.is_file():  # Tiny-ImageNet val: images/ + "file<TAB>wnid<TAB>box..."
            for line in annotations.read_text().splitlines():
                fields = line.split("\t")
                if len(fields) >= 2 and fields[1] in index:
                    paths.append(folder / "images" / fields[0])
                    labels.append(index[fields[1]])
        else:
            for c in classes:
                if (folder / c).is_dir():
                    files = _image_files(folder / c)
                    paths += files
                    labels += [index[c]] * len(files)
        return paths, labels

    train_paths, train_labels = labelled(train_dir)
    if not train_paths:
        raise RobustEdgeError(f"no images found under {train_dir}")
    eval_dir = next((base / d for d in ("test", "val") if (base / d).is_dir() and labelled(base / d)[0]), None)
    if eval_dir is None:
        raise RobustEdgeError(f"no labelled test/ or val/ folder under {base}")
    test_paths, test_labels = labelled(eval_dir)
    if image_size is None:
        from PIL import Image

        with Image.open(train_paths[0]) as first:
            image_size = first.size[0]
    channels = channels or 3
    train, val = _train_val(_read_images(train_paths, image_size, channels), torch.tensor(train_labels),
                            val_fraction, seed)
    test = Split(_read_images(test_paths, image_size, channels), torch.tensor(test_labels))
    return Dataset("imagefolder", train, val, test, classes, {"root": str(base), "test_folder": eval_dir.name})
