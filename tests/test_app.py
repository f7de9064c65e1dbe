import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from robustedge import RobustEdgeError
from robustedge.app import PAGE_SCRIPT
from robustedge.app import logic as demo

PAGE = str(PAGE_SCRIPT)


def app(folder, sources: str = "", **params):
    from streamlit.testing.v1 import AppTest

    os.environ["ROBUSTEDGE_MODELS"] = str(folder or "")
    os.environ[demo.SOURCES_ENV] = sources
    at = AppTest.from_file(PAGE, default_timeout=120)
    for key, value in params.items():
        at.query_params[key] = value
    return at.run()


def messages(at) -> str:
    return " | ".join([e.value for e in at.error] + [e.value for e in at.success] + [e.value for e in at.warning]
                      + [e.value for e in at.info])


def test_page_renders_with_models_and_metadata(models_folder):
    at = app(models_folder)
    assert not at.exception
    labels = at.sidebar.selectbox[0].options
    assert any("natural/best.safetensors" in o and "wideresnet-10-1" in o for o in labels)
    assert any("natural_export/model.int8.onnx" in o for o in labels)
    assert at.subheader[0].value.startswith("natural/best.safetensors: FGSM")


@pytest.mark.parametrize("attack", demo.ATTACKS)
def test_each_attack_gives_an_adversarial_prediction_and_the_perturbation(models_folder, attack):
    at = app(models_folder, model="natural/best.safetensors", eps="0.3")
    at.sidebar.selectbox[2].set_value(attack).run()
    assert not at.exception
    captions = [c for element in at.get("image") for c in element.captions]
    text = messages(at)
    assert "attack took" in text
    assert "Prediction flipped" in text  # eps 0.3 breaks this non-robust model on sample 0
    assert len(captions) == 3, captions
    assert captions[1].startswith("adversarial: predicted") and captions[2].startswith("perturbation, amplified")


def test_eps_zero_leaves_the_prediction_unchanged(models_folder):
    at = app(models_folder, model="natural/best.safetensors", attack="PGD")
    at.sidebar.slider[0].set_value(0.0).run()
    assert "Prediction unchanged" in messages(at)


def test_onnx_model_offers_transfer_and_square(models_folder):
    at = app(models_folder, model="natural_export/model.onnx", eps="0.3")
    assert at.sidebar.selectbox[2].options == list(demo.ONNX_ATTACKS)
    assert "Prediction flipped" in messages(at)  # transfer PGD from the source checkpoint
    at.sidebar.selectbox[2].set_value("Square (query-only)").run()
    assert not at.exception and "attack took" in messages(at)


def test_uploads_good_and_bad(models_folder):
    from PIL import Image

    at = app(models_folder, model="natural/best.safetensors", input="upload")
    png = io.BytesIO()
    Image.fromarray(np.full((40, 30, 3), 200, np.uint8)).save(png, format="PNG")
    at.file_uploader[0].set_value(("seven.png", png.getvalue(), "image/png")).run()
    assert "Upload converted: 30x40 RGB -> 16x16 grey" in [c.value for c in at.caption][0]
    assert "attack took" in messages(at)
    at.file_uploader[0].set_value(("notes.png", b"definitely not an image", "image/png")).run()
    assert "not a readable image" in messages(at) and not at.exception
    huge = io.BytesIO()
    Image.new("L", (5000, 5000)).save(huge, format="PNG")
    at.file_uploader[0].set_value(("huge.png", huge.getvalue(), "image/png")).run()
    assert "at most" in messages(at) and not at.exception


def test_broken_model_and_empty_or_missing_folders(models_folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(models_folder, bad)
    (bad / "natural_export" / "model.onnx").write_bytes(b"\x00garbage")
    at = app(bad, model="natural_export/model.onnx")
    assert "Cannot load natural_export/model.onnx" in messages(at) and not at.exception
    (tmp_path / "empty").mkdir()
    assert "holds no RobustEdge checkpoints" in messages(app(tmp_path / "empty"))
    assert "does not exist" in messages(app(tmp_path / "nowhere"))


def test_the_app_reads_only_inside_its_folder(models_folder, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(models_folder / "natural" / "best.safetensors", outside)
    link_folder = tmp_path / "linked"
    link_folder.mkdir()
    (link_folder / "escape.safetensors").symlink_to(outside)
    assert demo.list_models(link_folder) == []
    for name in ("../outside.safetensors", str(outside), "natural/../../outside.safetensors"):
        with pytest.raises(RobustEdgeError, match="no model named"):
            demo.resolve_entry(models_folder, name)


def test_prepare_upload_converts_and_limits():
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(buf, format="PNG")
    x, note = demo.prepare_upload(buf.getvalue(), (3, 8, 8))
    assert x.shape == (1, 3, 8, 8) and note.startswith("20x10 RGB -> 8x8 RGB")
    with pytest.raises(RobustEdgeError, match="limit is 10 MB"):
        demo.prepare_upload(b"0" * (11 * 2**20), (1, 8, 8))
    assert torch.equal(demo.attack(None, x, torch.tensor([0]), "PGD", 0.0, 5), x)


def test_malformed_metadata_files_are_skipped_with_a_warning(models_folder, tmp_path):
    folder = tmp_path / "models"
    shutil.copytree(models_folder, folder)
    (folder / "natural" / "eval.json").write_text("{not json")
    (folder / "natural_export" / "manifest.json").write_text("[1, 2]")
    at = app(folder, model="natural/best.safetensors")
    assert not at.exception
    text = messages(at)
    assert "skipped eval.json" in text and "skipped manifest.json" in text
    assert "attack took" in text  # the page still works


@pytest.mark.parametrize("params,warning", [
    ({"eps": "abc"}, "query parameter eps='abc' is not valid"),
    ({"eps": "nan"}, "query parameter eps='nan'"),
    ({"eps": "7"}, "query parameter eps='7' is outside [0.0, 0.5]"),
    ({"index": "99999"}, "query parameter index='99999' is outside"),
    ({"steps": "0"}, "query parameter steps='0' is outside [1, 50]"),
    ({"steps": "x"}, "query parameter steps='x' is not valid"),
    ({"model": "../../etc/passwd"}, "is not in the models folder"),
    ({"attack": "Laser"}, "query parameter attack='Laser' is not one of"),
])
def test_bad_query_parameters_fall_back_to_defaults_with_a_warning(models_folder, params, warning):
    at = app(models_folder, **params)
    assert not at.exception
    text = messages(at)
    assert warning in text and "attack took" in text


def test_a_model_with_nan_logits_is_an_error_not_a_prediction(digits_checkpoint, tmp_path):
    from robustedge.checkpoint import save_model
    from robustedge.weights import load_model

    model, meta = load_model(digits_checkpoint)
    with torch.no_grad():  # finite weights (NaN ones are refused at load) whose logits overflow to +-inf
        model.fc.weight.fill_(3e38)
    (tmp_path / "nan").mkdir()
    save_model(tmp_path / "nan" / "best.safetensors", model, meta)
    at = app(tmp_path, model="nan/best.safetensors", attack="PGD")
    assert not at.exception
    assert "non-finite logits" in messages(at) and "Prediction" not in messages(at)


@pytest.fixture(scope="module")
def foreign_sources(digits_checkpoint, tmp_path_factory):
    """The digits checkpoint's weights as a bare state dict, named the way `robustedge app --model` names it."""
    from robustedge.weights import load_model
    from robustedge.loading import ModelFacts

    model, _ = load_model(digits_checkpoint)
    path = tmp_path_factory.mktemp("foreign") / "weights.pt"
    torch.save(model.state_dict(), path)
    facts = ModelFacts(arch="wideresnet-10-1", dataset="digits", image_size=16, in_channels=1, eps=0.1)
    return demo.foreign_sources([("weights.pt", str(path))], facts)


def test_a_foreign_state_dict_named_with_model_is_attacked_like_its_checkpoint(models_folder, foreign_sources):
    foreign = demo.Predictor(demo.resolve_entry(None, "weights.pt", foreign_sources))
    ours = demo.Predictor(demo.resolve_entry(models_folder, "natural/best.safetensors"))
    x, y = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.arange(4)
    assert torch.equal(foreign.logits(x), ours.logits(x))
    for name in demo.ATTACKS:
        assert torch.equal(demo.attack(foreign, x, y, name, 0.2, 3), demo.attack(ours, x, y, name, 0.2, 3)), name
    # on the page, beside the folder's models and alone (no folder at all)
    at = app(models_folder, foreign_sources, model="weights.pt", attack="PGD", eps="0.3")
    assert not at.exception
    assert any(o.startswith("weights.pt (wideresnet-10-1, foreign, digits") for o in at.sidebar.selectbox[0].options)
    assert at.subheader[0].value.startswith("weights.pt: PGD")
    assert "Prediction flipped" in messages(at)
    alone = app(None, foreign_sources)
    assert not alone.exception and alone.sidebar.selectbox[0].options == ["weights.pt (wideresnet-10-1, foreign, digits)"]
    assert "attack took" in messages(alone)


def test_a_foreign_safetensors_is_skipped_with_a_hint_and_named_models_never_take_a_folder_name(models_folder, tmp_path):
    from safetensors.torch import save_file

    from robustedge.loading import ModelFacts

    folder = tmp_path / "models"
    shutil.copytree(models_folder, folder)
    save_file({"w": torch.zeros(2)}, str(folder / "theirs.safetensors"))
    entries, warnings = demo.scan_models(folder)
    assert "theirs.safetensors" not in [e.name for e in entries]
    assert any(w.startswith("skipped theirs.safetensors: a safetensors file without RobustEdge metadata") and
               "--model FILE --arch ARCH" in w for w in warnings)
    # a named model whose name is also a folder file's is shown by its full path, never mistaken for it
    elsewhere = tmp_path / "elsewhere" / "natural" / "best.safetensors"
    elsewhere.parent.mkdir(parents=True)
    shutil.copy(folder / "natural" / "best.safetensors", elsewhere)
    named = demo.foreign_sources([("natural/best.safetensors", str(elsewhere))], ModelFacts())
    names = [e.name for e in demo.list_models(folder, named)]
    assert names.count("natural/best.safetensors") == 1 and names[-1] == str(elsewhere)
    assert demo.resolve_entry(folder, "natural/best.safetensors", named).origin is None
    with pytest.raises(RobustEdgeError, match="ROBUSTEDGE_SOURCES is not a list of model sources"):
        demo.scan_models(folder, "[{\"name\": 1}]")


def test_the_app_command_hands_its_named_models_to_the_page(models_folder, digits_checkpoint, tmp_path, monkeypatch):
    """`robustedge app --model ... --arch ...` checks the source, then starts Streamlit with the page's environment;
    the page, run with that environment, offers the model (the server itself: tests/test_browser.py)."""
    from robustedge.weights import load_model
    from robustedge.cli import app as app_command, main

    model, _ = load_model(digits_checkpoint)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "theirs.pth")
    started = {}
    # the server is not started here (a real one: the signal test below and tests/test_browser.py)
    monkeypatch.setattr(app_command, "serve", lambda cmd, env: started.update(cmd=cmd, env=env) or 0)
    monkeypatch.chdir(tmp_path)  # no runs/quickstart here: only the named model is served
    assert main(["app", "--model", "theirs.pth", "--arch", "wideresnet-10-1", "--dataset", "digits",
                 "--image-size", "16", "--in-channels", "1", "--port", "8765"]) == 0
    env = started["env"]
    assert "streamlit" in started["cmd"] and "8765" in started["cmd"] and env["ROBUSTEDGE_MODELS"] == ""
    at = app(None, env[demo.SOURCES_ENV], model="theirs.pth", attack="FGSM", eps="0.3")
    assert not at.exception and at.subheader[0].value.startswith("theirs.pth: FGSM") and "attack took" in messages(at)
    # with --models as well, both are offered
    assert main(["app", "--models", str(models_folder), "--model", "theirs.pth", "--arch", "wideresnet-10-1",
                 "--dataset", "digits", "--image-size", "16", "--in-channels", "1"]) == 0
    names = [e.name for e in demo.list_models(started["env"]["ROBUSTEDGE_MODELS"], started["env"][demo.SOURCES_ENV])]
    assert "natural/best.safetensors" in names and names[-1] == "theirs.pth"


def test_a_foreign_cifar_model_gets_its_test_images_from_data_root(tmp_path, write_cifar10, monkeypatch):
    from robustedge.checkpoint import ModelSpec
    from robustedge.loading import ModelFacts

    write_cifar10(tmp_path / "data")
    torch.manual_seed(0)
    torch.save(ModelSpec("resnet20", 10, 3, 1.0, 32).build().state_dict(), tmp_path / "resnet20.pt")
    sources = demo.foreign_sources([("resnet20.pt", str(tmp_path / "resnet20.pt"))],
                                   ModelFacts(arch="resnet20", dataset="cifar10"))
    monkeypatch.setenv("ROBUSTEDGE_DATA_ROOT", "")
    assert "No test data for this model; use Upload." in messages(app(None, sources, attack="FGSM"))
    monkeypatch.setenv("ROBUSTEDGE_DATA_ROOT", str(tmp_path / "data"))
    at = app(None, sources, attack="FGSM", index="9")
    assert not at.exception and "attack took" in messages(at)
    assert at.number_input[0].value == 9 and at.number_input[0].max == 9  # the copy's 10 test images
    assert at.get("image")[0].captions[0].endswith("(true 9)")  # the copy's test labels are 0..9 in order


def test_a_checkpoint_cannot_make_the_page_read_a_folder_outside_its_reach(tmp_path, write_cifar10, monkeypatch):
    """A checkpoint in --models records a data folder elsewhere: the page says it is not read and shows no
    test image from it; the operator's --data-root (the same folder) makes it readable."""
    from robustedge.checkpoint import ModelMeta, ModelSpec, save_model

    write_cifar10(tmp_path / "elsewhere")
    spec = ModelSpec("resnet20", 10, 3, 1.0, 32)
    torch.manual_seed(0)
    (tmp_path / "models" / "run").mkdir(parents=True)
    save_model(tmp_path / "models" / "run" / "best.safetensors", spec.build(),
               ModelMeta(spec, dataset="cifar10", eps=0.03, extra={"data": {"root": str(tmp_path / "elsewhere")}}))
    monkeypatch.setenv(demo.DATA_ROOT_ENV, "")
    at = app(tmp_path / "models", attack="FGSM")
    text = messages(at)
    assert not at.exception and "is outside the models folder and --data-root, so it is not read" in text
    assert "No test data for this model; use Upload." in text and not at.get("image")
    monkeypatch.setenv(demo.DATA_ROOT_ENV, str(tmp_path / "elsewhere"))
    at = app(tmp_path / "models", attack="FGSM", index="9")
    assert not at.exception and "attack took" in messages(at) and "not read" not in messages(at)
    assert at.get("image")[0].captions[0].endswith("(true 9)")  # the copy's test labels are 0..9 in order


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the server's process through /proc")
@pytest.mark.parametrize("signum", ["SIGTERM", "SIGHUP", "SIGINT", "SIGKILL"])
def test_a_signal_to_the_app_command_stops_its_server_too(tmp_path, free_port, signum):
    """`robustedge app` runs Streamlit in a process of its own: a SIGTERM (a supervisor), SIGHUP (a closed
    terminal) or SIGINT sent to the command alone must stop the server, which once went on serving, orphaned;
    so must a SIGKILL, which the command cannot see (the kernel's parent-death signal, on Linux)."""
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "robustedge.cli", "app", "--models", str(tmp_path), "--port",
                             str(port), "--host", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/_stcore/health"
    children: list[int] = []

    def serving() -> bool:
        try:
            return urllib.request.urlopen(url, timeout=2).status == 200
        except OSError:
            return False

    try:
        deadline = time.time() + 90
        while not serving():
            assert proc.poll() is None and time.time() < deadline, "the server did not come up"
            time.sleep(0.5)
        children += [int(pid) for pid in (Path("/proc") / str(proc.pid) / "task" / str(proc.pid) / "children")
                    .read_text().split()]
        assert len(children) == 1
        number = getattr(signal, signum)
        proc.send_signal(number)  # to the command's process alone, not its group
        assert proc.wait(timeout=30) in ((-number,) if signum == "SIGKILL" else (0, 128 + number))

        def server_alive() -> bool:  # an orphan's zombie waits for a reaper that may never come: not alive
            stat = Path(f"/proc/{children[0]}/stat")
            try:
                return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
            except (FileNotFoundError, ProcessLookupError):
                return False

        deadline = time.time() + 30  # a killed command does not wait for its server: give it time to stop
        while server_alive() and time.time() < deadline:
            time.sleep(0.2)
        assert not server_alive() and not serving()
    finally:  # nothing left serving when the test fails
        for pid in [proc.pid] * (proc.poll() is None) + children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
