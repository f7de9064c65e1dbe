import os
import pickle

import pytest
import torch

from robustedge import RobustEdgeError
from robustedge.checkpoint import ModelMeta, ModelSpec, read_meta, save_model
from robustedge.weights import load_model
from robustedge.files import atomic_path
from robustedge.weights import load_weights, read_state_dict
from robustedge.models import build_model


def _model_and_meta():
    spec = ModelSpec("resnet20", 10, 1, 0.25, 16, mean=[0.5], std=[0.5])
    return spec.build(), ModelMeta(spec, dataset="digits", eps=0.1, method="natural", metrics={"clean": 0.9})


def test_round_trip_keeps_weights_metadata_and_normalisation(tmp_path):
    model, meta = _model_and_meta()
    path = save_model(tmp_path / "m.safetensors", model, meta)
    loaded, meta2 = load_model(path)
    assert meta2 == meta and not loaded.training
    assert loaded.normalization == ([0.5], [0.5])
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temp files left behind


def test_a_training_state_measures_as_the_weights_file_it_holds(tmp_path):
    """Export tables quote the torch model's size: a run's last.safetensors, with the optimizer's
    momentum (as large as the model), must not count twice the model."""
    from robustedge.checkpoint import weights_file_bytes
    from robustedge.training_state import save_training_state

    model, meta = _model_and_meta()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(4, 1, 16, 16)).sum().backward()
    optimizer.step()  # the momentum buffers exist now
    weights = save_model(tmp_path / "best.safetensors", model, meta)
    state = save_training_state(tmp_path / "last.safetensors", model, meta, {"optimizer": optimizer.state_dict()})
    assert state.stat().st_size > 1.8 * weights.stat().st_size
    assert weights_file_bytes(weights) == weights.stat().st_size
    assert weights_file_bytes(state) == weights.stat().st_size


def test_atomic_path_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_broken_checkpoints_are_refused_with_a_reason(tmp_path):
    model, meta = _model_and_meta()
    good = save_model(tmp_path / "m.safetensors", model, meta)
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(RobustEdgeError, match="truncated or corrupt"):
        load_model(truncated)
    with pytest.raises(RobustEdgeError, match="not found"):
        load_model(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(RobustEdgeError, match="not a RobustEdge model"):
        read_meta(tmp_path / "foreign.safetensors")
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    with pytest.raises(RobustEdgeError, match="not a readable safetensors"):
        load_model(text)


def test_architecture_and_class_count_mismatch_name_keys_and_shapes(tmp_path):
    model, meta = _model_and_meta()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    with pytest.raises(RobustEdgeError, match=r"shape mismatch: fc.weight \(10, 16\) in file vs \(100, 16\)"):
        load_weights(ModelSpec("resnet20", 100, 1, 0.25), tmp_path / "w.pt")
    with pytest.raises(RobustEdgeError, match="missing keys: layers.0.conv1.weight.*unexpected keys: layer1.0"):
        load_weights(ModelSpec("mobilenetv2", 10, 1, 0.25), tmp_path / "w.pt")


def test_foreign_torch_files_load_weights_only_and_unwrap_prefixes(tmp_path):
    model = build_model("resnet20", 10, 3, 0.25)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pth")
    loaded = load_weights(ModelSpec("resnet20", 10, 3, 0.25), tmp_path / "wrapped.pth")
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    with open(tmp_path / "evil.pt", "wb") as fh:
        pickle.dump({"state_dict": Exploit()}, fh)
    with pytest.raises(RobustEdgeError, match="not a weights-only torch checkpoint"):
        read_state_dict(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
