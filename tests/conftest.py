"""Shared fixtures: the embedded digits data and one small model trained on it, once per session."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

# pytest-xdist (pyproject's addopts: one worker per core, one test file per worker at a time): each worker
# and what it launches gets one OpenMP thread. These tiny models are bound by per-operator overhead, so two
# single-threaded workers finish about twice as fast as one two-threaded run, and two workers of two
# threads each would spin against each other on two cores (ten times slower, ENVIRONMENT.md).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402  (after OMP_NUM_THREADS)
import torch.nn.functional as F  # noqa: E402

os.environ.setdefault("ROBUSTEDGE_NO_PROGRESS", "1")
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def digits():
    from robustedge.data import load_dataset

    return load_dataset("digits")


def train_natural(model, split, epochs: int = 10, lr: float = 3e-3, seed: int = 0):
    """Plain Adam + CE on clean digits: a quick, accurate, non-robust model for attack tests."""
    from robustedge.data import DeviceLoader

    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loader = DeviceLoader(split, 64, seed=seed)
    model.train()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """A function returning a free localhost port, for the app's server in tests (torchrun and gloo
    rendezvous pick theirs themselves: ``--standalone``, ``file://``)."""
    return _free_port


@pytest.fixture(scope="session")
def fit_natural():
    """:func:`train_natural` for tests that train a model of their own (tests never import conftest)."""
    return train_natural


@pytest.fixture(scope="session")
def digits_model(digits):
    from robustedge.models import build_model

    torch.manual_seed(0)
    return train_natural(build_model("wideresnet-10-1", 10, 1), digits.train)


@pytest.fixture(scope="session")
def digits_checkpoint(digits_model, tmp_path_factory):
    from robustedge.checkpoint import ModelMeta, ModelSpec, save_model

    path = tmp_path_factory.mktemp("ckpt") / "digits_wrn10.safetensors"
    meta = ModelMeta(ModelSpec("wideresnet-10-1", 10, 1, 1.0, 16), dataset="digits", eps=0.1, method="natural",
                     classes=[str(i) for i in range(10)], extra={"data": {"seed": 0, "val_fraction": 0.1}})
    return save_model(path, digits_model, meta)


@pytest.fixture(scope="session")
def models_folder(digits_checkpoint, tmp_path_factory):
    """A demo models folder: the digits checkpoint and an export bundle made from it."""
    import shutil

    from robustedge.edge.bundle import ExportOptions, export_bundle

    folder = tmp_path_factory.mktemp("models")
    (folder / "natural").mkdir()
    ckpt = folder / "natural" / "best.safetensors"
    shutil.copy(digits_checkpoint, ckpt)
    export_bundle(ckpt, folder / "natural_export", ExportOptions(n=32, calibration_n=64, transfer_attacks=("pgd20",),
                                                                 square_n=0), progress=lambda m: None)
    return folder


def _chromium() -> tuple[str, str]:
    """Debian's chromium + chromedriver, installed here when missing (as the test set-up)."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if all(found):
        return found  # type: ignore[return-value]
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"], env=env,
                       capture_output=True, timeout=540)  # both within pyproject's 900 s per test
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if not all(found):
        pytest.skip("Debian's chromium and chromium-driver are not installed and could not be installed here "
                    "(needs root and apt-get)")
    return found  # type: ignore[return-value]


@pytest.fixture
def chrome(tmp_path):
    """Make a headless Chromium WebDriver (window size as 'W,H'); every one made is quit at the end."""
    drivers = []

    def make(window: str = "1400,1100"):
        chromium, chromedriver = _chromium()
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--window-size={window}", f"--user-data-dir={tmp_path / f'profile{len(drivers)}'}"):
            options.add_argument(flag)
        drivers.append(webdriver.Chrome(service=Service(chromedriver), options=options))
        return drivers[-1]

    yield make
    for driver in drivers:
        driver.quit()


@pytest.fixture
def keep_screenshot():
    """Copy a screenshot to $ROBUSTEDGE_SCREENSHOT_DIR when set (how bench/screenshots/ are made)."""
    def keep(shot: Path, name: str) -> None:
        folder = os.environ.get("ROBUSTEDGE_SCREENSHOT_DIR")
        if folder:
            Path(folder).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(folder) / name)
    return keep


def _write_cifar10(root, n_train=20, n_test=10):
    """A tiny copy in the real on-disk format (bytes keys, uint8 rows of 3072); md5s won't match."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    expected = {}
    for i in range(1, 6):
        data = rng.integers(0, 256, (n_train, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n_train)]
        with open(folder / f"data_batch_{i}", "wb") as fh:
            pickle.dump({b"batch_label": b"training batch", b"labels": labels, b"data": data}, fh, protocol=2)
        expected[f"train{i}"] = (data, labels)
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"labels": list(range(n_test)), b"data": test}, fh, protocol=2)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [n.encode() for n in names], b"num_cases_per_batch": n_train}, fh, protocol=2)
    return expected, test


@pytest.fixture
def write_cifar10():
    """Writes a tiny CIFAR-10 copy in the real on-disk format: ``write_cifar10(root, n_train, n_test)``."""
    return _write_cifar10
