"""The Python API checks its arguments at its edge as the CLI checks its flags: a bad one raises the
library's own RobustEdgeError with the CLI's message (the keyword's name instead of the flag's), before
anything runs or is written; never a ValueError, TypeError, IndexError or torch error from the depths."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from robustedge import api
from robustedge.errors import RobustEdgeError

X = torch.rand(4, 1, 16, 16)
Y = torch.tensor([0, 1, 2, 3])


def _model():
    from robustedge.models import build_model

    torch.manual_seed(0)
    return build_model("wideresnet-10-1", 10, 1).eval()


EVAL = dict(attacks="clean", eps=0.1, flags=False, show_progress=False)

CASES = [
    # load: the facts of a foreign model, as --num-classes/--image-size/--mean/--std/--eps
    ("load", ("{ckpt}",), dict(image_size=8.5), "image_size must be an integer, got 8.5"),
    ("load", ("{ckpt}",), dict(image_size=4), "image_size must be an integer >= 8, got 4"),
    ("load", ("{ckpt}",), dict(num_classes="ten"), "num_classes must be an integer, got 'ten'"),
    ("load", ("{ckpt}",), dict(width=0), "width must be > 0, got 0"),
    ("load", ("{ckpt}",), dict(eps=2), "eps must be in [0, 1], got 2"),
    ("load", ("{ckpt}",), dict(eps=float("nan")), "eps must be a finite number"),
    ("load", ("{ckpt}",), dict(mean=[0.5]), "mean and std must be given together"),
    ("load", ("{ckpt}",), dict(mean=[0.5], std=[0.0]), "std must be > 0 for every channel"),
    ("load", ("{ckpt}",), dict(mean=[0.5, 0.5], std=[1.0, 1.0], in_channels=1),
     "mean/std have 2 values but the model takes 1 input channel"),
    ("load", ("{ckpt}",), dict(mean="0.5", std="1"), "mean must be a list of numbers"),
    ("load", ("{ckpt}",), dict(arch=5), "arch must be a name (a string), got 5"),
    ("load", ("{ckpt}",), dict(device=3), "device must be a string"),
    ("load", (42,), {}, "a model source is a file, 'robustbench:<name>' or an nn.Module"),
    # evaluate: what `robustedge eval` checks, and labels
    ("evaluate", ("{ckpt}",), dict(n=-5), "n must be an integer >= 0, got -5"),
    ("evaluate", ("{ckpt}",), dict(n=2.5), "n must be an integer, got 2.5"),
    ("evaluate", ("{ckpt}",), dict(eps=2), "eps must be in [0, 1], got 2"),
    ("evaluate", ("{ckpt}",), dict(split="dev"), "split must be one of train, val, test, got 'dev'"),
    ("evaluate", ("{ckpt}",), dict(batch_size=0), "batch_size must be an integer >= 1 or 'auto', got 0"),
    ("evaluate", ("{ckpt}",), dict(aa_batch_size=0), "aa_batch_size must be an integer >= 1, got 0"),
    ("evaluate", ("{ckpt}",), dict(seed=-1), "seed must be an integer in [0, 2147483647], got -1"),
    ("evaluate", ("{ckpt}",), dict(attacks=5), "attacks must be a comma-separated string or a list"),
    ("evaluate", ("{ckpt}",), dict(attacks="clean,pgd7"), "unknown attack 'pgd7'"),
    ("evaluate", ("{ckpt}",), dict(flags="yes"), "flags must be True, False or a FlagSettings"),
    ("evaluate", ("{ckpt}",), dict(fold_bn="no"), "fold_bn must be True or False, got 'no'"),
    ("evaluate", ("{ckpt}",), dict(data_root=3), "data_root must be a path"),
    ("evaluate", ("{ckpt}",), dict(resume="{missing}"), "is not a readable JSON file"),
    ("evaluate", ("{model}", X, Y.float()), {}, "labels must be integer class indices, got torch.float32 values"),
    ("evaluate", ("{model}", X, np.array([0.0, 1.5, 2.0, 3.0])), {},
     "labels must be integer class indices, got torch.float64 values"),
    ("evaluate", ("{model}", X, Y[:3]), {}, "labels must have shape (4,), got (3,)"),
    ("evaluate", ("{model}", X, Y - 1), {}, "labels must be class indices >= 0, got -1"),
    ("evaluate", ("{model}", X, Y + 7), {}, "labels must be class indices in [0, 9] (the model predicts 10"),
    ("evaluate", ("{model}", X * 2, Y), {}, "float images must be finite and in [0, 1]"),
    ("evaluate", ("{model}", X[0], Y), {}, "images must be a 4-d (N, C, H, W) tensor or array"),
    # export and verify
    ("export", ("{ckpt}", "{new}"), dict(n=0), "n must be an integer >= 1, got 0"),
    ("export", ("{ckpt}", "{new}"), dict(formats=3), "formats must be a comma-separated string or a list"),
    ("export", ("{ckpt}", "{new}"), dict(formats="onnx,tflite"), "unknown export format 'tflite'"),
    ("export", ("{ckpt}", "{new}"), dict(transfer_attacks=1), "transfer_attacks must be a comma-separated"),
    ("export", ("{ckpt}", "{new}"), dict(flags=3), "flags must be a FlagSettings, got 3"),
    ("export", ("{ckpt}", "{new}"), dict(eps=-1), "eps must be in [0, 1], got -1"),
    ("export", ("{ckpt}", "{new}"), dict(force="yes"), "force must be True or False"),
    ("export", ("{ckpt}", None), {}, "out must be a path"),
    ("export", ("{ckpt}", "{new}"), dict(colour="red"), "unknown export option"),
    ("verify", (None,), {}, "bundle must be a path"),
    ("verify", ("{missing}",), {}, "is not an export bundle (not a folder)"),
    # load_dataset
    ("load_dataset", (3,), {}, "dataset name must be a string, got 3"),
    ("load_dataset", ("mnist",), {}, "unknown dataset 'mnist'"),
    ("load_dataset", ("digits",), dict(val_fraction=2), "val_fraction must be in [0, 1], got 2"),
    ("load_dataset", ("digits",), dict(image_size="big"), "image_size must be an integer, got 'big'"),
    ("load_dataset", ("digits",), dict(colour=1), "unknown load_dataset argument(s): colour"),
]


def _fill(value, paths):
    if isinstance(value, str):
        for key, path in paths.items():
            value = value.replace("{" + key + "}", str(path))
        return value
    return value


@pytest.mark.parametrize("function,args,kwargs,message", CASES,
                         ids=[f"{c[0]}-{i:02d}" for i, c in enumerate(CASES)])
def test_bad_api_arguments_raise_the_clis_message(function, args, kwargs, message, digits_checkpoint, tmp_path):
    paths = {"ckpt": digits_checkpoint, "new": tmp_path / "new", "missing": tmp_path / "missing.json"}
    args = tuple(_model() if isinstance(a, str) and a == "{model}" else _fill(a, paths) for a in args)
    kwargs = {k: _fill(v, paths) for k, v in kwargs.items()}
    if function == "evaluate":
        kwargs = EVAL | kwargs
    if function == "evaluate" and len(args) == 1:
        kwargs.setdefault("n", 4)
    with pytest.raises(RobustEdgeError) as info:
        getattr(api, function)(*args, **kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing written
