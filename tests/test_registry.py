"""One registry for models, methods and datasets (robustedge/registry.py): listings and unknown-name errors
as before, registration refused in one line when it is wrong, and a user's own model, dataset and method
working end to end (the example in docs/design/extending.md, section 13, run as written)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import robustedge
from robustedge.data import DATASETS, Dataset, Split, load_dataset
from robustedge.errors import RobustEdgeError
from robustedge.methods import METHODS, get_method, method_names
from robustedge.methods.base import Method
from robustedge.models import MODELS, Classifier, build_model, check_arch, model_names
from robustedge.registry import Registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "design" / "extending.md"


@pytest.fixture(autouse=True)
def restore_registries():
    """Registrations made by a test end with it (other test files list the built-in names)."""
    METHODS.names()  # the built-in methods discovered first, so they are part of what is restored
    saved = [(reg, dict(reg._entries)) for reg in (MODELS, DATASETS, METHODS)]
    yield
    for reg, entries in saved:
        reg._entries.clear()
        reg._entries.update(entries)


# ---- Registry itself ---------------------------------------------------------------------------

def _things() -> Registry:
    reg = Registry("thing", {"b": 1, "a": 2})
    reg.register_pattern("n-<k>", r"^n-(\d+)$", lambda m: int(m.group(1)))
    return reg


def _decorated(reg):
    @reg.register("f")
    def f():
        return "f"
    return reg["f"] is f and f() == "f"


def _replaced(reg):
    reg.register("a", 3, replace=True)
    return reg["a"]


def _lazy_loader():
    calls = []
    reg = Registry("thing", loader=lambda: (calls.append(1), reg.register("late", 9)))
    return (len(calls), reg["late"], list(reg), len(calls))


BASICS = [
    ("names: registration order, then templates", lambda r: r.names(), ["b", "a", "n-<k>"]),
    ("iteration, len and items skip templates", lambda r: (list(r), len(r), r.items()), (["b", "a"], 2, [("b", 1), ("a", 2)])),
    ("lookup by [] and get", lambda r: (r["a"], r.get("b")), (2, 1)),
    ("pattern lookup", lambda r: (r["n-7"], "n-7" in r, "n-x" in r, 5 in r), (7, True, False, False)),
    ("decorator form", _decorated, True),
    ("replace=True replaces", _replaced, 3),
    ("a loader runs once, before the first lookup", lambda r: _lazy_loader(), (0, 9, ["late"], 1)),
]


@pytest.mark.parametrize("what,use,expected", BASICS, ids=[b[0] for b in BASICS])
def test_registry_basics(what, use, expected):
    assert use(_things()) == expected


REFUSALS = [
    ("unknown name: the sorted listing, templates included", lambda r: r.get("c"),
     "unknown thing 'c'; valid things: a, b, n-<k>"),
    ("non-string lookup", lambda r: r.get(5), "unknown thing '5'; valid things: a, b, n-<k>"),
    ("duplicate", lambda r: r.register("a", 3), "thing 'a' is already registered (pass replace=True to replace it)"),
    ("duplicate of a pattern", lambda r: r.register("n-3", 3), "thing 'n-3' is already registered"),
    ("bad name", lambda r: r.register("a b", 3), "a thing name is letters, digits, '_', '-' or '.', got 'a b'"),
    ("empty name", lambda r: r.register("", 3), "a thing name is letters"),
]


@pytest.mark.parametrize("what,use,message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_registry_refusals_are_one_line(what, use, message):
    with pytest.raises(RobustEdgeError) as err:
        use(_things())
    assert message in str(err.value) and "\n" not in str(err.value)


# ---- the built-in registries: listings and messages as before --------------------------------

BUILT_IN = [
    (model_names, ["mobilenetv2", "preact_resnet18", "resnet18", "resnet20", "resnet34", "resnet56", "wrn34_10",
                   "wideresnet-<depth>-<widen>", "dm-wideresnet-<depth>-<widen>"]),
    (method_names, ["ard", "bmtard", "mtard", "natural", "pgd_at", "rslad", "trades"]),
    (lambda: list(DATASETS), ["digits", "cifar10", "cifar100", "svhn", "imagefolder"]),
    (lambda: sorted(MODELS), ["mobilenetv2", "preact_resnet18", "resnet18", "resnet20", "resnet34", "resnet56",
                              "wrn34_10"]),
]


@pytest.mark.parametrize("listing,expected", BUILT_IN)
def test_built_in_listings(listing, expected):
    assert listing() == expected


UNKNOWN = [
    (lambda: check_arch("resnet19"), "unknown model 'resnet19'; valid models: dm-wideresnet-<depth>-<widen>, "
     "mobilenetv2, preact_resnet18, resnet18, resnet20, resnet34, resnet56, wideresnet-<depth>-<widen>, wrn34_10"),
    (lambda: build_model("resnet19"), "unknown model 'resnet19'; valid models: dm-wideresnet-<depth>-<widen>, "),
    (lambda: get_method("fgsm_at"), "unknown method 'fgsm_at'; valid methods: ard, bmtard, mtard, natural, pgd_at, "
     "rslad, trades"),
    (lambda: load_dataset("mnist"), "unknown dataset 'mnist'; valid datasets: cifar10, cifar100, digits, "
     "imagefolder, svhn"),
]


@pytest.mark.parametrize("use,message", UNKNOWN)
def test_built_in_unknown_name_messages(use, message):
    with pytest.raises(RobustEdgeError) as err:
        use()
    assert str(err.value).startswith(message)


def test_pattern_names_still_build_any_wideresnet():
    assert check_arch("wideresnet-16-2") == "wideresnet-16-2" and "dm-wideresnet-10-1" in MODELS
    assert type(build_model("dm_wideresnet_10_1", width=0.25)).__name__ == "DMWideResNet"


# ---- registering from Python: bad inputs are one line ------------------------------------------

class Tiny(Classifier):
    def __init__(self, num_classes=10, in_channels=3, width=1.0):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def features_to_logits(self, x):
        return self.fc(self.conv1(x).mean((2, 3)))


def _loader(root=None, image_size=None, channels=None, val_fraction=0.1, seed=0, download=False):
    return None


class _Named(Method):
    name = "named_ok"

    def step(self, student, x, y):
        raise NotImplementedError


def _method(**attrs):
    return type("Custom", (_Named,), {"name": "custom_ok", **attrs})


BAD = [
    ("register_model", ("bad name", Tiny), {}, "a model name is letters, digits, '_', '-' or '.', got 'bad name'"),
    ("register_model", (5, Tiny), {}, "a model name must be a string, got 5"),
    ("register_model", ("x", 42), {}, "model 'x' needs a builder, got int 42"),
    ("register_model", ("x", lambda: Tiny()), {},
     "the builder of model 'x' must accept the keyword arguments num_classes, in_channels, width"),
    ("register_model", ("resnet18", Tiny), {}, "model 'resnet18' is already registered (pass replace=True"),
    ("register_model", ("wideresnet-28-10", Tiny), {}, "model 'wideresnet-28-10' is already registered"),
    ("register_model", ("x", Tiny), dict(replace="yes"), "replace must be True or False, got 'yes'"),
    ("register_dataset", ("digits", _loader), {}, "dataset 'digits' is already registered (pass replace=True"),
    ("register_dataset", ("x", "data.npz"), {}, "dataset 'x' needs a loader, got str 'data.npz'"),
    ("register_dataset", ("x", lambda root: None), {},
     "the loader of dataset 'x' must accept the keyword arguments root, image_size, channels, val_fraction, seed, "
     "download"),
    ("register_dataset", ("x/y", _loader), {}, "a dataset name is letters"),
    ("register_method", (object,), {}, "a method is a subclass of robustedge.methods.base.Method, got <class 'object'>"),
    ("register_method", (Method,), {}, "a method is a subclass of robustedge.methods.base.Method"),
    ("register_method", (type("Nameless", (Method,), {"step": _Named.step}),), {},
     "method class Nameless needs its own name (a class attribute"),
    ("register_method", (type("Stepless", (Method,), {"name": "stepless"}),), {},
     "method class Stepless must implement step(student, x, y) -> (loss, logs)"),
    ("register_method", (_method(name="trades"),), {}, "method 'trades' is already registered (pass replace=True"),
    ("register_method", (_method(name="no good"),), {}, "a method name is letters"),
    ("register_method", (_method(released_start="sideways"),), {},
     "method class Custom: released_start must be one of gaussian, uniform, uniform_unprojected, none, got 'sideways'"),
    ("register_method", (_method(released_mode="auto"),), {}, "released_mode must be one of eval, train, got 'auto'"),
    ("register_method", (_method(teacher_roles="robust"),), {}, "teacher_roles must be a tuple of role names"),
    ("register_method", (_method(defaults=[1]),), {}, "defaults must be a dict of method_args"),
]


@pytest.mark.parametrize("fn,args,kwargs,message", BAD, ids=[f"{b[0]}:{b[3][:40]}" for b in BAD])
def test_register_refuses_bad_input_in_one_line(fn, args, kwargs, message):
    with pytest.raises(RobustEdgeError) as err:
        getattr(robustedge, fn)(*args, **kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_registered_entries_work_by_name_and_replace_overrides():
    assert robustedge.register_model("tiny", Tiny) is Tiny
    assert "tiny" in model_names() and check_arch("tiny") == "tiny"
    model = build_model("tiny", num_classes=3, in_channels=1, normalization=([0.5], [0.25]), image_size=64)
    assert isinstance(model, Tiny) and model.conv1.stride == (2, 2) and model.normalization == ([0.5], [0.25])
    assert model(torch.rand(2, 1, 64, 64)).shape == (2, 3)
    robustedge.register_model("wideresnet-16-2", Tiny, replace=True)  # a user's name before the pattern's
    assert isinstance(build_model("wideresnet-16-2"), Tiny) and not isinstance(build_model("wideresnet-16-4"), Tiny)
    cls = robustedge.register_method(_method(name="named_ok"))
    assert get_method("named_ok") is cls and "named_ok" in method_names()
    decorated = robustedge.register_model("tiny2")(Tiny)
    assert decorated is Tiny and MODELS["tiny2"] is Tiny


def test_a_model_that_is_not_a_classifier_is_refused_when_built():
    robustedge.register_model("plain", lambda num_classes, in_channels, width: nn.Sequential(nn.Flatten()))
    with pytest.raises(RobustEdgeError, match=r"^model 'plain' was built as a Sequential, not a "
                                              r"robustedge.models.Classifier \(subclass Classifier"):
        build_model("plain")


def _digits_like(**changes):
    def loader(root, image_size, channels, val_fraction, seed, download):
        split = Split(torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8), torch.arange(6) % 3)
        data = Dataset("mine", split, split, split, ["a", "b", "c"])
        for key, value in changes.items():
            setattr(data, key, value)
        return data
    return loader


LOADED = [
    (lambda **kw: None, "dataset 'mine': the loader must return a robustedge.data.Dataset, got NoneType"),
    (_digits_like(classes=["only"]), "classes must be a list of at least two class names"),
    (_digits_like(val=(1, 2)), "val must be a robustedge.data.Split, got tuple"),
    (_digits_like(test=Split(torch.rand(6, 1, 16, 16), torch.arange(6) % 3)),
     "test images must be a uint8 tensor (N, C, H, W) with H == W, got torch.float32 (6, 1, 16, 16)"),
    (_digits_like(test=Split(torch.zeros(6, 1, 16, 8, dtype=torch.uint8), torch.arange(6) % 3)), "with H == W"),
    (_digits_like(test=Split(torch.zeros(6, 3, 16, 16, dtype=torch.uint8), torch.arange(6) % 3)),
     "test images are (3, 16, 16), train images (1, 16, 16)"),
    (_digits_like(val=Split(torch.zeros(6, 1, 16, 16, dtype=torch.uint8), torch.arange(6, dtype=torch.int32))),
     "val labels must be an int64 tensor of shape (6,), got torch.int32 (6,)"),
    (_digits_like(val=Split(torch.zeros(6, 1, 16, 16, dtype=torch.uint8), torch.arange(6))),
     "val labels must be in [0, 3), got 0..5"),
    (_digits_like(train=Split(torch.zeros(0, 1, 16, 16, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))),
     "the train split is empty"),
]


@pytest.mark.parametrize("loader,message", LOADED)
def test_what_a_registered_loader_returns_is_checked_in_one_line(loader, message):
    robustedge.register_dataset("mine", loader)
    with pytest.raises(RobustEdgeError) as err:
        load_dataset("mine")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_registered_dataset_is_brought_to_the_asked_shape():
    robustedge.register_dataset("mine", _digits_like())
    native = robustedge.load_dataset("mine")
    assert native.input_shape == (1, 16, 16) and native.num_classes == 3
    small = load_dataset("mine", image_size=8, channels=3)
    assert small.input_shape == (3, 8, 8) and small.test.images.dtype == torch.uint8
    assert small.train.labels.tolist() == native.train.labels.tolist()


# ---- the documented example, run as written ----------------------------------------------------

def _doc_example() -> str:
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("# 13. Your own model, dataset or method"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_documented_example_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its run folder lands under tmp_path
    namespace: dict = {"__name__": "example"}
    exec(compile(_doc_example(), str(DOC), "exec"), namespace)
    model, meta, report, result = (namespace[k] for k in ("model", "meta", "report", "result"))
    assert Path(result.best_path).is_relative_to(tmp_path)
    assert isinstance(model, namespace["TinyCNN"]) and not model.training
    assert (meta.spec.arch, meta.dataset, meta.method) == ("tiny_cnn", "digits_third", "mixed_at")
    assert (meta.spec.in_channels, meta.spec.image_size) == (1, 8)
    assert set(report.accuracy) == {"clean", "fgsm"} and report.n == len(load_dataset("digits_third", image_size=8,
                                                                                       channels=1).test)


@pytest.mark.parametrize("asked,taken,note", [
    (None, 6, ""),
    (4, 4, ""),
    (6, 6, ""),
    (500, 6, " (all of them: 500 were asked for)"),
])
def test_a_split_says_when_fewer_examples_exist_than_asked_for(asked, taken, note):
    """eval and export print this beside their count: `export --n 500` on digits once read as 359 silently."""
    split = Split(torch.zeros(6, 1, 4, 4, dtype=torch.uint8), torch.arange(6) % 3).take(asked)
    assert len(split) == taken and split.shortfall(asked) == note
