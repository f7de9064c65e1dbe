import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustedge import RobustEdgeError
from robustedge.checkpoint import ModelMeta, ModelSpec
from robustedge.teachers import FrozenTeacher
from robustedge.training_state import load_training_state, save_training_state
from robustedge.config import AttackConfig
from robustedge.methods import get_method, method_names
from robustedge.methods.bmtard import entropy_balance
from robustedge.methods.losses import released_entropy_value
from robustedge.methods.mtard import loss_balance

G = 0.001


def test_registry_has_every_method():
    assert method_names() == ["ard", "bmtard", "mtard", "natural", "pgd_at", "rslad", "trades"]
    with pytest.raises(RobustEdgeError, match="valid methods: ard, bmtard"):
        get_method("fgsm_at")


# ---- Entropy-Based Balance -----------------------------------------------------------------

def test_entropy_balance_moves_each_temperature_by_exactly_g_in_the_documented_direction():
    sharp, flat = torch.tensor(0.3, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)  # robust sharp, clean flat
    tau_adv = tau_nat = torch.tensor(5.0, dtype=torch.float64)
    for k in range(1, 6):
        tau_adv, tau_nat = entropy_balance(tau_adv, tau_nat, sharp, flat, G)
        # lower entropy is softened (tau up), higher entropy sharpened (tau down)
        assert tau_adv.item() == pytest.approx(5.0 + k * G, abs=1e-12)
        assert tau_nat.item() == pytest.approx(5.0 - k * G, abs=1e-12)
    # the mirror case
    a, n = entropy_balance(torch.tensor(5.0), torch.tensor(5.0), flat, sharp, G)
    assert (a.item(), n.item()) == (pytest.approx(5.0 - G, abs=1e-6), pytest.approx(5.0 + G, abs=1e-6))
    # equal entropies: nothing moves
    a, n = entropy_balance(torch.tensor(3.0), torch.tensor(4.0), flat, flat, G)
    assert (a.item(), n.item()) == (3.0, 4.0)


def test_entropy_balance_stays_within_1_and_10():
    sharp, flat = torch.tensor(0.3), torch.tensor(2.0)
    a, n = entropy_balance(torch.tensor(9.9995), torch.tensor(1.0003), sharp, flat, G)
    assert a.item() == 10.0 and n.item() == 1.0
    a, n = torch.tensor(1.0), torch.tensor(1.0)  # the start of training
    for _ in range(3):
        a, n = entropy_balance(a, n, sharp, flat, G)
    assert a.item() == pytest.approx(1.0 + 3 * G, abs=1e-6) and n.item() == 1.0


def _teacher(scale: float, seed: int) -> FrozenTeacher:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    with torch.no_grad():
        net[1].weight.mul_(scale)
    return FrozenTeacher(net)


def _student(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.rand(12, 1, 4, 4, generator=gen), torch.randint(0, 4, (12,), generator=gen)


ATTACK = AttackConfig(eps=0.1, steps=2, step_size=0.05)


def test_bmtard_step_balances_a_sharp_robust_and_a_flat_clean_teacher():
    teachers = {"robust": _teacher(40.0, 1), "clean": _teacher(0.01, 2)}
    method = get_method("bmtard")({}, ATTACK, teachers, milestones=[2], gamma=0.1)
    student = _student()
    x, y = _batch()
    for k in range(1, 4):
        loss, logs = method.step(student, x, y)
        assert torch.isfinite(loss) and student.training
        h_adv, h_nat = method._entropies  # the released values: minus the entropy over C
        assert -h_adv < -h_nat  # the sharp robust teacher has the lower entropy
        method.after_step(logs)
        assert method.tau_adv.item() == pytest.approx(1.0 + k * G, abs=1e-6)
        assert method.tau_nat.item() == 1.0  # already at the lower bound
    method.set_epoch(2)  # at the lr milestone g is multiplied by 0.1 too
    method.step(student, x, y)
    method.after_step({})
    assert method.tau_adv.item() == pytest.approx(1.0 + 3 * G + 0.1 * G, abs=1e-6)
    assert all(p.grad is None for t in teachers.values() for p in t.parameters())
    assert not any(t.training for t in teachers.values())


# ---- Normalization Loss Balance --------------------------------------------------------------

def _nlb_reference(w_adv, w_nat, l_adv, l_nat, l0_adv, l0_nat, eta):
    r_adv, r_nat = l_adv / l0_adv, l_nat / l0_nat
    t_adv, t_nat = r_adv / (r_adv + r_nat), r_nat / (r_adv + r_nat)
    w_adv, w_nat = max(0.0, w_adv - eta * (w_adv - t_adv)), max(0.0, w_nat - eta * (w_nat - t_nat))
    return w_adv / (w_adv + w_nat), w_nat / (w_adv + w_nat)


def test_loss_balance_follows_the_documented_update():
    # hand-computed: r = (0.5, 0.8), target = (0.384615.., 0.615384..)
    w_adv, w_nat = loss_balance(*(torch.tensor(v, dtype=torch.float64) for v in (0.5, 0.5, 1.0, 0.8, 2.0, 1.0)), 0.025)
    assert w_adv.item() == pytest.approx(0.5 - 0.025 * (0.5 - 0.5 / 1.3), abs=1e-7)
    assert w_nat.item() == pytest.approx(0.5 - 0.025 * (0.5 - 0.8 / 1.3), abs=1e-7)
    assert w_adv.item() == pytest.approx(0.49711538461, abs=1e-7)
    # a trajectory: the term whose loss falls least gains weight; always sums to one
    w = (0.5, 0.5)
    wt = (torch.tensor(0.5), torch.tensor(0.5))
    for step in range(50):
        l_adv, l_nat = 2.0 * (1 - 0.002 * step), 1.0 * (1 - 0.015 * step)
        w = _nlb_reference(*w, l_adv, l_nat, 2.0, 1.0, 0.025)
        wt = loss_balance(*wt, torch.tensor(l_adv), torch.tensor(l_nat), torch.tensor(2.0), torch.tensor(1.0), 0.025)
        assert wt[0].item() == pytest.approx(w[0], abs=1e-7) and wt[1].item() == pytest.approx(w[1], abs=1e-7)
        assert (wt[0] + wt[1]).item() == pytest.approx(1.0, abs=1e-7)
    assert w[0] > 0.5  # the adversarial loss fell least


def test_loss_balance_clips_at_zero_and_renormalises():
    w_adv, w_nat = loss_balance(torch.tensor(0.9), torch.tensor(0.1), torch.tensor(0.001), torch.tensor(1.0),
                                torch.tensor(1.0), torch.tensor(1.0), eta=1.5)
    assert w_adv.item() == 0.0 and w_nat.item() == 1.0


def test_mtard_records_first_losses_and_keeps_temperatures_at_one():
    teachers = {"robust": _teacher(3.0, 1), "clean": _teacher(1.0, 2)}
    method = get_method("mtard")({}, ATTACK, teachers)
    student, (x, y) = _student(), _batch()
    _, logs = method.step(student, x, y)
    method.after_step(logs)
    assert method.l0_adv.item() == pytest.approx(logs["loss_adv"].item())
    assert method.w_adv.item() == pytest.approx(0.5, abs=1e-7)  # r = 1 for both at the first step
    _, logs2 = method.step(student, x, y)
    method.after_step(logs2)
    expected = _nlb_reference(0.5, 0.5, logs2["loss_adv"].item(), logs2["loss_nat"].item(),
                              logs["loss_adv"].item(), logs["loss_nat"].item(), 0.025)
    assert method.w_adv.item() == pytest.approx(expected[0], abs=1e-6)
    assert method.tau_adv.item() == method.tau_nat.item() == 1.0


def test_bmtard_state_round_trips_through_a_checkpoint(tmp_path):
    teachers = {"robust": _teacher(40.0, 1), "clean": _teacher(0.01, 2)}
    method = get_method("bmtard")({}, ATTACK, teachers)
    student, (x, y) = _student(), _batch()
    for _ in range(3):
        _, logs = method.step(student, x, y)
        method.after_step(logs)
    spec = ModelSpec("resnet20", 4, 1, 0.25, 8)
    path = save_training_state(tmp_path / "s.safetensors", spec.build(), ModelMeta(spec),
                               {"method": method.state_dict(), "epoch": 3})
    _, _, state = load_training_state(path)
    fresh = get_method("bmtard")({}, ATTACK, teachers)
    fresh.load_state_dict(state["method"])
    for key, value in method.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with pytest.raises(RobustEdgeError, match="state needs"):
        fresh.load_state_dict({"w_adv": torch.tensor(0.5)})


def test_methods_check_teachers_and_arguments():
    with pytest.raises(RobustEdgeError, match="needs teacher.*clean"):
        get_method("bmtard")({}, ATTACK, {"robust": _teacher(1.0, 1)})
    with pytest.raises(RobustEdgeError, match="has no argument.*betta; valid: beta"):
        get_method("trades")({"betta": 6}, ATTACK, {})


def test_released_entropy_value_is_minus_the_entropy_over_the_classes():
    assert released_entropy_value(torch.full((3, 8), 1 / 8)).item() == pytest.approx(math.log(1 / 8 + 1e-5) / 8)
    sharp, flat = F.softmax(torch.tensor([[4.0, 0.0, 0.0]]), 1), F.softmax(torch.tensor([[0.5, 0.0, 0.0]]), 1)
    entropy = lambda p: -(p * p.log()).sum().item()  # noqa: E731
    ratio = released_entropy_value(sharp) / released_entropy_value(flat)
    assert ratio.item() == pytest.approx(entropy(sharp) / entropy(flat), rel=1e-3)  # only the ratio is used (the 1e-5 moves it a little)


def test_this_steps_loss_uses_the_weights_updated_from_this_steps_losses():
    teachers = {"robust": _teacher(3.0, 1), "clean": _teacher(1.0, 2)}
    method = get_method("mtard")({}, AttackConfig(eps=0.1, steps=0, step_size=0.0, start="none"), teachers)
    student, (x, y) = _student(), _batch()
    _, first = method.step(student, x, y)  # records L0; weights stay 0.5
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(0.5)  # a different student: different losses at the second step
    loss, logs = method.step(student, x, y)
    w_adv, w_nat = _nlb_reference(0.5, 0.5, logs["loss_adv"].item(), logs["loss_nat"].item(),
                                  first["loss_adv"].item(), first["loss_nat"].item(), 0.025)
    assert loss.item() == pytest.approx(w_adv * logs["loss_adv"].item() + w_nat * logs["loss_nat"].item(), rel=1e-6)
    assert w_adv != pytest.approx(0.5, abs=1e-6)  # the previous step's weights would give a different loss
