"""The Streamlit page of ``robustedge app`` (Streamlit runs ``robustedge/app/streamlit_app.py``).

Settings come from the environment (Streamlit passes no arguments to a page): ROBUSTEDGE_MODELS is the
models folder (default runs/quickstart; empty: none), ROBUSTEDGE_SOURCES the foreign models named with
``robustedge app --model`` and ROBUSTEDGE_DATA_ROOT where test images of datasets other than digits live
(a data folder a model records is read only when it lies inside the models folder or that one). Query
parameters preselect widgets, e.g. ``?model=student_bmtard/best.safetensors&attack=PGD&eps=0.1&index=3``
(used by the browser test); one that does not parse or is out of range falls back to its default with a
warning.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from robustedge.app import logic as demo
from robustedge.errors import RobustEdgeError

TOP_K = 5


@dataclass
class Choice:
    """What the sidebar selected."""

    model: demo.Predictor
    name: str
    second: str
    source: demo.Predictor | None
    attack: str
    eps: float
    steps: int


def _upscale(img: np.ndarray, size: int = 160) -> np.ndarray:
    """Nearest-neighbour upscaling: 8x8 digits stay crisp instead of being blurred by the browser."""
    factor = max(1, size // img.shape[0])
    return np.kron(img, np.ones((factor, factor) + ((1,) if img.ndim == 3 else ()), dtype=img.dtype))


def _cached():
    """The page's cached loaders (models, predictors, data), built once per server."""
    import streamlit as st

    @st.cache_resource(show_spinner=False)
    def models(path: str | None, sources: str | None):
        return demo.scan_models(path, sources)

    @st.cache_resource(show_spinner="loading model")
    def predictor(path: str | None, sources: str | None, name: str) -> demo.Predictor:
        return demo.Predictor(demo.resolve_entry(path, name, sources))

    @st.cache_resource(show_spinner="loading data")
    def test_split(name: str, root: str | None, shape: tuple, seed: int, val_fraction: float):
        from robustedge.data import load_dataset

        return load_dataset(name, root, image_size=shape[1], channels=shape[0], seed=seed,
                            val_fraction=val_fraction).test

    return models, predictor, test_split


def _param(params, warnings: list[str], key: str, parse, default, low=None, high=None):
    value, warning = demo.query_value(params, key, parse, default, low, high)
    if warning:
        warnings.append(warning)
    return value


def _sidebar(where: tuple, entries, params, predictor, warnings: list[str]) -> Choice | None:
    import streamlit as st

    names = [e.name for e in entries]
    labels = {e.name: e.label for e in entries}

    def index_of(name: str | None, fallback: int = 0) -> int:
        return names.index(name) if name in names else fallback

    with st.sidebar:
        st.header("Model")
        if params.get("model") is not None and params.get("model") not in names:
            warnings.append(f"query parameter model={params.get('model')!r} is not in the models folder")
        choice = st.selectbox("Model", names, format_func=labels.get,
                              index=index_of(params.get("model"), index_of("student_bmtard/best.safetensors")))
        others = ["(none)"] + [n for n in names if n != choice]
        second_default = params.get("compare", "student_pgd_at/best.safetensors")
        second = st.selectbox("Compare with (same perturbed input)", others, format_func=lambda n: labels.get(n, n),
                              index=others.index(second_default) if second_default in others else 0)
    try:
        model = predictor(*where, choice)
    except Exception as exc:  # a corrupt file must not crash the page
        st.error(f"Cannot load {choice}: {exc if isinstance(exc, RobustEdgeError) else type(exc).__name__}")
        return None
    source = None
    if model.entry.kind == "onnx" and model.entry.source is not None:
        try:
            source = predictor(*where, str(model.entry.source.relative_to(Path(where[0]).resolve())))
        except (RobustEdgeError, ValueError):
            source = None
    meta = model.meta or (source.meta if source else None)
    default_eps = float((meta.eps if meta else model.entry.info.get("eps")) or 0.1)
    with st.sidebar:
        st.header("Attack")
        options = list(demo.ATTACKS) if model.entry.kind == "torch" else list(demo.ONNX_ATTACKS)
        if params.get("attack") is not None and params.get("attack") not in options:
            warnings.append(f"query parameter attack={params.get('attack')!r} is not one of {', '.join(options)}")
        attack = st.selectbox("Attack", options,
                              index=options.index(params["attack"]) if params.get("attack") in options else 0)
        eps = st.slider("eps (L-inf, pixel scale)", 0.0, 0.5,
                        _param(params, warnings, "eps", float, min(default_eps, 0.5), 0.0, 0.5), 0.005)
        steps = st.slider("steps (PGD, CW-inf)", 1, 50, _param(params, warnings, "steps", int, 10, 1, 50))
    return Choice(model, choice, second, source, attack, eps, steps)


def _input(c: Choice, folder: str | None, params, test_split, warnings: list[str]):
    """(x, y, test split or None) from a test sample or an upload; None when the page should stop.

    Test images come only from where :func:`demo.choose_test_data` allows (the embedded digits, the
    models ``folder`` or the operator's --data-root), never from a folder a checkpoint merely records."""
    import streamlit as st

    meta = c.model.meta or (c.source.meta if c.source else None)
    data = demo.choose_test_data(meta, c.model.entry.info, folder, os.environ.get(demo.DATA_ROOT_ENV) or None)
    warnings.extend(data.notes)
    with st.sidebar:
        st.header("Input")
        mode = st.radio("Image", ["Test sample", "Random test sample", "Upload"],
                        index=2 if params.get("input") == "upload" else 0)
    split = None
    if data.dataset == "digits" or data.root:
        try:
            split = test_split(data.dataset, data.root, tuple(c.model.input_shape), data.seed, data.val_fraction)
        except RobustEdgeError as exc:
            st.info(f"Test data not available ({exc}); upload an image instead.")
    if mode == "Upload":
        upload = st.file_uploader("An image (PNG, JPEG, ...)", type=None)
        if upload is None:
            st.info("Choose an image to upload.")
            return None
        try:
            x, note = demo.prepare_upload(upload.getvalue(), tuple(c.model.input_shape))
        except RobustEdgeError as exc:
            st.error(str(exc))
            return None
        label = st.selectbox("True class of the upload", c.model.classes)
        st.caption(f"Upload converted: {note}")
        return x, torch.tensor([c.model.classes.index(label)]), split
    if split is None:
        st.warning("No test data for this model; use Upload.")
        return None
    if mode == "Random test sample":
        if st.button("Draw another") or "random_index" not in st.session_state:
            st.session_state.random_index = int(np.random.default_rng().integers(len(split)))
        index = st.session_state.random_index
    else:
        index = st.number_input("Test index", 0, len(split) - 1,
                                _param(params, warnings, "index", int, 0, 0, len(split) - 1))
    return split.images[index:index + 1].float() / 255.0, split.labels[index:index + 1], split


def _show_result(c: Choice, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor, seconds: float) -> None:
    import pandas as pd
    import streamlit as st

    model = c.model
    p_clean, p_adv = model.probs(x)[0], model.probs(x_adv)[0]
    truth = model.classes[int(y)]
    pred_clean, pred_adv = model.classes[int(p_clean.argmax())], model.classes[int(p_adv.argmax())]
    st.subheader(f"{c.name}: {c.attack}, eps = {c.eps:.3f} ({c.eps * 255:.1f}/255)")
    cols = st.columns(3)
    cols[0].image(_upscale(demo.to_image(x)), caption=f"clean: predicted {pred_clean} (true {truth})", clamp=True,
                  width=160)
    cols[1].image(_upscale(demo.to_image(x_adv)), caption=f"adversarial: predicted {pred_adv}", clamp=True, width=160)
    cols[2].image(_upscale(demo.to_image(torch.from_numpy(demo.amplify(x_adv - x)).permute(2, 0, 1)[None])),
                  caption=f"perturbation, amplified (max |delta| = {float((x_adv - x).abs().max()):.3f})", clamp=True,
                  width=160)
    if pred_clean != pred_adv:
        st.error(f"Prediction flipped: {pred_clean} -> {pred_adv}  (attack took {seconds:.2f} s)")
    else:
        st.success(f"Prediction unchanged: {pred_clean}  (attack took {seconds:.2f} s)")
    for flag in model.entry.info.get("flags") or []:
        st.warning(f"Attack-failure flag of this model's evaluation: {flag}")

    def top_k(probs: torch.Tensor) -> "pd.DataFrame":
        values, idx = probs.topk(min(TOP_K, len(probs)))
        return pd.DataFrame({"class": [model.classes[i] for i in idx.tolist()], "probability": values.tolist()})

    bars = st.columns(2)
    for column, title, probs in ((bars[0], "top-k, clean", p_clean), (bars[1], "top-k, adversarial", p_adv)):
        column.caption(title)
        column.bar_chart(top_k(probs), x="class", y="probability")


def _show_second(c: Choice, where: tuple, predictor, x: torch.Tensor, x_adv: torch.Tensor) -> None:
    import streamlit as st

    if c.second == "(none)":
        return
    try:
        other = predictor(*where, c.second)
        if tuple(other.input_shape) != tuple(c.model.input_shape):
            raise RobustEdgeError(f"{c.second} takes {tuple(other.input_shape)} inputs, not {tuple(c.model.input_shape)}")
        q_clean, q_adv = other.probs(x)[0], other.probs(x_adv)[0]
        clean, adv = other.classes[int(q_clean.argmax())], other.classes[int(q_adv.argmax())]
        st.subheader(f"Same perturbed input on {c.second}")
        st.write(f"clean: **{clean}** ({100 * float(q_clean.max()):.0f}%), adversarial: **{adv}** "
                 f"({100 * float(q_adv.max()):.0f}%) -> " + ("**flipped**" if clean != adv else "**unchanged**"))
    except RobustEdgeError as exc:
        st.warning(f"Second model: {exc}")


def _show_curve(c: Choice, split) -> None:
    import pandas as pd
    import streamlit as st

    with st.expander("Robust accuracy over eps (a batch of test images)"):
        if split is None:
            st.info("Needs test data.")
        elif st.button("Compute curve"):
            xs, ys = split.images[:32].float() / 255.0, split.labels[:32]
            grid = [round(v, 3) for v in np.linspace(0, max(c.eps, 0.01) * 2, 6)]
            curve = demo.robust_curve(c.model, xs, ys, c.attack, grid, c.steps, c.source)
            st.line_chart(pd.DataFrame({"eps": grid, "robust accuracy": curve}), x="eps", y="robust accuracy")


def render() -> None:
    import streamlit as st

    st.set_page_config(page_title="RobustEdge attack demo", layout="wide")
    st.title("RobustEdge: clean vs adversarial")
    folder = os.environ.get(demo.MODELS_ENV, "runs/quickstart") or None
    where = (folder, os.environ.get(demo.SOURCES_ENV) or None)  # what the scan and the loader are keyed on
    params = st.query_params
    models, predictor, test_split = _cached()
    try:
        entries, scan_warnings = models(*where)
    except RobustEdgeError as exc:
        st.error(str(exc))
        return
    warnings = list(scan_warnings)
    if not entries:
        for warning in warnings:
            st.warning(warning)
        st.warning(f"The models folder {folder} holds no RobustEdge checkpoints or ONNX models. "
                   f"Run `robustedge quickstart` or start the app with `--models DIR` or `--model SRC --arch ARCH`.")
        return
    try:
        choice = _sidebar(where, entries, params, predictor, warnings)
        picked = _input(choice, folder, params, test_split, warnings) if choice else None
        for warning in warnings:
            st.warning(warning)
        if picked is None:
            return
        x, y, split = picked
        start = time.perf_counter()
        x_adv = demo.attack(choice.model, x, y, choice.attack, choice.eps, choice.steps, choice.source)
        _show_result(choice, x, y, x_adv, time.perf_counter() - start)
    except RobustEdgeError as exc:
        st.error(str(exc))
        return
    _show_second(choice, where, predictor, x, x_adv)
    _show_curve(choice, split)
