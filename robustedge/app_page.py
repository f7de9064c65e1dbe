"""The Streamlit page of ``robustedge app`` (run through ``apps/demo.py``).

Settings come from the environment (Streamlit passes no arguments to a page): ROBUSTEDGE_MODELS is the
models folder (default runs/quickstart). Query parameters preselect widgets, e.g.
``?model=student_bmtard/best.safetensors&attack=PGD&eps=0.1&index=3`` (used by the browser test).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from robustedge import demo
from robustedge.errors import RobustEdgeError

TOP_K = 5


def _upscale(img: np.ndarray, size: int = 160) -> np.ndarray:
    """Nearest-neighbour upscaling: 8x8 digits stay crisp instead of being blurred by the browser."""
    factor = max(1, size // img.shape[0])
    return np.kron(img, np.ones((factor, factor) + ((1,) if img.ndim == 3 else ()), dtype=img.dtype))


def render() -> None:
    import pandas as pd
    import streamlit as st

    st.set_page_config(page_title="RobustEdge attack demo", layout="wide")
    st.title("RobustEdge: clean vs adversarial")
    folder = Path(os.environ.get("ROBUSTEDGE_MODELS", "runs/quickstart"))
    params = st.query_params

    @st.cache_resource(show_spinner=False)
    def models(path: str):
        return demo.list_models(path)

    @st.cache_resource(show_spinner="loading model")
    def predictor(path: str, name: str) -> demo.Predictor:
        return demo.Predictor(demo.resolve_entry(path, name))

    @st.cache_resource(show_spinner="loading data")
    def test_split(name: str, shape: tuple, seed: int, val_fraction: float):
        from robustedge.data import load_dataset

        ds = load_dataset(name, image_size=shape[1], channels=shape[0], seed=seed, val_fraction=val_fraction)
        return ds.test

    try:
        entries = models(str(folder))
    except RobustEdgeError as exc:
        st.error(str(exc))
        return
    if not entries:
        st.warning(f"The models folder {folder} holds no RobustEdge checkpoints or ONNX models. "
                   f"Run `robustedge quickstart` or start the app with `--models DIR`.")
        return
    names = [e.name for e in entries]
    labels = {e.name: e.label for e in entries}

    def index_of(name: str | None, fallback: int = 0) -> int:
        return names.index(name) if name in names else fallback

    with st.sidebar:
        st.header("Model")
        choice = st.selectbox("Model", names, format_func=labels.get,
                              index=index_of(params.get("model"), index_of("student_bmtard/best.safetensors")))
        others = ["(none)"] + [n for n in names if n != choice]
        second_default = params.get("compare", "student_pgd_at/best.safetensors")
        second = st.selectbox("Compare with (same perturbed input)", others, format_func=lambda n: labels.get(n, n),
                              index=others.index(second_default) if second_default in others else 0)
    try:
        model = predictor(str(folder), choice)
    except RobustEdgeError as exc:
        st.error(f"Cannot load {choice}: {exc}")
        return
    except Exception as exc:  # a corrupt file must not crash the page
        st.error(f"Cannot load {choice}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return
    entry = model.entry
    source = None
    if entry.kind == "onnx" and entry.source is not None:
        try:
            source = predictor(str(folder), str(entry.source.relative_to(folder.resolve())))
        except (RobustEdgeError, ValueError):
            source = None
    meta = model.meta or (source.meta if source else None)
    dataset = (meta.dataset if meta else entry.info.get("dataset")) or "digits"
    data_cfg = meta.extra.get("data", {}) if meta else {}
    default_eps = float((meta.eps if meta else entry.info.get("eps")) or 0.1)

    with st.sidebar:
        st.header("Input")
        mode = st.radio("Image", ["Test sample", "Random test sample", "Upload"],
                        index=2 if params.get("input") == "upload" else 0)
        st.header("Attack")
        options = list(demo.ATTACKS) if entry.kind == "torch" else list(demo.ONNX_ATTACKS)
        attack_name = st.selectbox("Attack", options,
                                   index=options.index(params["attack"]) if params.get("attack") in options else 0)
        eps = st.slider("eps (L-inf, pixel scale)", 0.0, 0.5, float(params.get("eps", default_eps)), 0.005)
        steps = st.slider("steps (PGD, CW-inf)", 1, 50, int(params.get("steps", 10)))

    x, y, note = None, None, ""
    split = None
    if dataset in ("digits",) or data_cfg.get("root"):
        try:
            split = test_split(dataset, tuple(model.input_shape), int(data_cfg.get("seed", 0)),
                               float(data_cfg.get("val_fraction", 0.1)))
        except RobustEdgeError as exc:
            st.info(f"Test data not available ({exc}); upload an image instead.")
    if mode == "Upload":
        upload = st.file_uploader("An image (PNG, JPEG, ...)", type=None)
        if upload is None:
            st.info("Choose an image to upload.")
            return
        try:
            x, note = demo.prepare_upload(upload.getvalue(), tuple(model.input_shape))
        except RobustEdgeError as exc:
            st.error(str(exc))
            return
        label = st.selectbox("True class of the upload", model.classes)
        y = torch.tensor([model.classes.index(label)])
        st.caption(f"Upload converted: {note}")
    else:
        if split is None:
            st.warning("No test data for this model; use Upload.")
            return
        if mode == "Random test sample":
            if st.button("Draw another") or "random_index" not in st.session_state:
                st.session_state.random_index = int(np.random.default_rng().integers(len(split)))
            index = st.session_state.random_index
        else:
            index = st.number_input("Test index", 0, len(split) - 1, int(params.get("index", 0)))
        x = split.images[index:index + 1].float() / 255.0
        y = split.labels[index:index + 1]

    start = time.perf_counter()
    try:
        x_adv = demo.attack(model, x, y, attack_name, eps, steps, source)
    except RobustEdgeError as exc:
        st.error(str(exc))
        return
    seconds = time.perf_counter() - start
    p_clean, p_adv = model.probs(x)[0], model.probs(x_adv)[0]
    truth = model.classes[int(y)]
    pred_clean, pred_adv = model.classes[int(p_clean.argmax())], model.classes[int(p_adv.argmax())]
    flipped = pred_clean != pred_adv

    st.subheader(f"{choice}: {attack_name}, eps = {eps:.3f} ({eps * 255:.1f}/255)")
    cols = st.columns(3)
    cols[0].image(_upscale(demo.to_image(x)), caption=f"clean: predicted {pred_clean} (true {truth})", clamp=True, width=160)
    cols[1].image(_upscale(demo.to_image(x_adv)), caption=f"adversarial: predicted {pred_adv}", clamp=True, width=160)
    cols[2].image(_upscale(demo.to_image(torch.from_numpy(demo.amplify(x_adv - x)).permute(2, 0, 1)[None])),
                  caption=f"perturbation, amplified (max |delta| = {float((x_adv - x).abs().max()):.3f})", clamp=True,
                  width=160)
    if flipped:
        st.error(f"Prediction flipped: {pred_clean} -> {pred_adv}  (attack took {seconds:.2f} s)")
    else:
        st.success(f"Prediction unchanged: {pred_clean}  (attack took {seconds:.2f} s)")

    def top_k(probs: torch.Tensor) -> "pd.DataFrame":
        values, idx = probs.topk(min(TOP_K, len(probs)))
        return pd.DataFrame({"class": [model.classes[i] for i in idx.tolist()], "probability": values.tolist()})

    bars = st.columns(2)
    bars[0].caption("top-k, clean")
    bars[0].bar_chart(top_k(p_clean), x="class", y="probability")
    bars[1].caption("top-k, adversarial")
    bars[1].bar_chart(top_k(p_adv), x="class", y="probability")

    if second != "(none)":
        try:
            other = predictor(str(folder), second)
            if tuple(other.input_shape) != tuple(model.input_shape):
                raise RobustEdgeError(f"{second} takes {tuple(other.input_shape)} inputs, not {tuple(model.input_shape)}")
            q_clean, q_adv = other.probs(x)[0], other.probs(x_adv)[0]
            c, a = other.classes[int(q_clean.argmax())], other.classes[int(q_adv.argmax())]
            st.subheader(f"Same perturbed input on {second}")
            st.write(f"clean: **{c}** ({100 * float(q_clean.max()):.0f}%), adversarial: **{a}** "
                     f"({100 * float(q_adv.max()):.0f}%) -> " + ("**flipped**" if c != a else "**unchanged**"))
        except RobustEdgeError as exc:
            st.warning(f"Second model: {exc}")

    with st.expander("Robust accuracy over eps (a batch of test images)"):
        if split is None:
            st.info("Needs test data.")
        elif st.button("Compute curve"):
            n = 32
            xs, ys = split.images[:n].float() / 255.0, split.labels[:n]
            grid = [round(v, 3) for v in np.linspace(0, max(eps, 0.01) * 2, 6)]
            curve = demo.robust_curve(model, xs, ys, attack_name, grid, steps, source)
            st.line_chart(pd.DataFrame({"eps": grid, "robust accuracy": curve}), x="eps", y="robust accuracy")
