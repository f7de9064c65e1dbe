"""The demo's two inputs from strangers, by class: uploaded bytes (every decoder failure is one line) and the
data folder a checkpoint records (read only inside the models folder or the operator's --data-root)."""

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from robustedge import RobustEdgeError
from robustedge.app import logic as demo
from robustedge.checkpoint import ModelMeta, ModelSpec


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(before_pixels: bytes = b"", after_pixels: bytes = b"", size=(4, 4), noise: bool = False) -> bytes:
    """A valid greyscale PNG with extra chunks spliced in after IHDR and/or before IEND."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size[::-1], dtype=np.uint8) if noise else np.zeros(size[::-1], np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    raw = buf.getvalue()
    ihdr_end, iend = 8 + 25, len(raw) - 12
    return raw[:ihdr_end] + before_pixels + raw[ihdr_end:iend] + after_pixels + raw[iend:]


def _too_large() -> bytes:
    """zlib data that inflates past PIL's per-chunk limit (1 MB) from about a kilobyte."""
    from PIL import PngImagePlugin

    return zlib.compress(b"a" * (PngImagePlugin.MAX_TEXT_CHUNK + 1), 9)


UPLOADS = {  # name: (bytes, what the one line says)
    "zTXt text chunk inflating past MAX_TEXT_CHUNK": (lambda: _png(_chunk(b"zTXt", b"Comment\0\0" + _too_large())),
                                                       "ValueError: Decompressed data too large"),
    "iTXt text chunk inflating past MAX_TEXT_CHUNK": (
        lambda: _png(_chunk(b"iTXt", b"Comment\0\x01\0\0\0" + _too_large())),
        "ValueError: Decompressed data too large"),
    "iCCP profile inflating past MAX_TEXT_CHUNK": (lambda: _png(_chunk(b"iCCP", b"icc\0\0" + _too_large())),
                                                   "ValueError: Decompressed data too large"),
    "zTXt after the pixels (read while decoding)": (
        lambda: _png(after_pixels=_chunk(b"zTXt", b"Comment\0\0" + _too_large())), "Decompressed data too large"),
    "truncated pixel data": (lambda: _png(size=(64, 64), noise=True)[:2000], "OSError: image file is truncated"),
    "header claiming 10000x10000 (decompression bomb)": (
        lambda: _png()[:8] + _chunk(b"IHDR", struct.pack(">IIBBBBB", 10000, 10000, 8, 0, 0, 0, 0)) + _png()[33:],
        "DecompressionBombError"),
    "not an image": (lambda: b"definitely not an image", "no image format PIL knows"),
    "empty": (lambda: b"", "no image format PIL knows"),
}


@pytest.mark.parametrize("name", list(UPLOADS))
def test_every_undecodable_upload_is_one_line(name):
    data, says = UPLOADS[name]
    with pytest.raises(RobustEdgeError) as info:
        demo.prepare_upload(data(), (1, 16, 16))
    message = str(info.value)
    assert message.startswith("the upload is not a readable image (") and says in message
    assert "\n" not in message and len(message) < 300


def test_an_upload_with_small_text_and_icc_chunks_still_reads():
    """The limit is on inflated size, not on having the chunks: ordinary metadata passes."""
    text = _chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"hello"))
    x, note = demo.prepare_upload(_png(text + _chunk(b"iCCP", b"icc\0\0" + zlib.compress(b"\0" * 128))), (1, 8, 8))
    assert x.shape == (1, 1, 8, 8) and note.startswith("4x4 L -> 8x8 grey")


def _meta(dataset: str, **data) -> ModelMeta:
    return ModelMeta(ModelSpec("resnet20", 10, 3, 1.0, 32), dataset=dataset, extra={"data": data})


@pytest.fixture
def places(tmp_path):
    """A models folder with a data folder inside, a --data-root, a folder elsewhere, and a symlink escaping."""
    for sub in ("models/run/data", "given", "elsewhere"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "models" / "escape").symlink_to(tmp_path / "elsewhere")
    return tmp_path


ROOTS = [  # dataset, recorded root (relative to tmp_path), --data-root given, root the page may read, note says
    ("digits", "elsewhere", True, None, None),  # embedded: no folder is read, nothing to say
    ("cifar10", "models/run/data", False, "models/run/data", None),
    ("cifar10", "given", True, "given", None),
    ("cifar10", None, True, "given", None),
    ("cifar10", None, False, None, None),
    ("cifar10", "elsewhere", False, None, "start the app with --data-root"),
    ("cifar10", "elsewhere", True, "given", "using --data-root"),
    ("cifar10", "models/../elsewhere", False, None, "is not read"),
    ("cifar10", "models/escape", False, None, "is not read"),  # a symlink inside the folder pointing out
    ("cifar10", "/", False, None, "is not read"),
    ("cifar10", 7, True, "given", "is not read"),  # not a path at all
]


@pytest.mark.parametrize("dataset,recorded,given,expected,note", ROOTS)
def test_a_recorded_data_folder_is_read_only_inside_the_models_folder_or_data_root(places, dataset, recorded, given,
                                                                                   expected, note):
    data = {} if recorded is None else {"root": str(places / recorded) if isinstance(recorded, str) and
                                        recorded != "/" else recorded}
    choice = demo.choose_test_data(_meta(dataset, **data), {}, places / "models",
                                   str(places / "given") if given else None)
    got = Path(choice.root).resolve() if choice.root else None
    assert got == ((places / expected).resolve() if expected else None)
    if note is None:
        assert choice.notes == []
    else:
        assert len(choice.notes) == 1 and note in choice.notes[0] and "outside the models folder" in choice.notes[0]


@pytest.mark.parametrize("data,seed,fraction,notes", [
    ({"seed": 3, "val_fraction": 0.2}, 3, 0.2, 0),
    ({"seed": "x", "val_fraction": 0.2}, 0, 0.2, 1),
    ({"seed": [1], "val_fraction": float("nan")}, 0, 0.1, 2),
    ({"seed": True, "val_fraction": 1.5}, 0, 0.1, 2),
])
def test_malformed_split_settings_fall_back_with_a_note(data, seed, fraction, notes):
    choice = demo.choose_test_data(_meta("digits", **data), {}, None, None)
    assert (choice.seed, choice.val_fraction, len(choice.notes)) == (seed, fraction, notes)
