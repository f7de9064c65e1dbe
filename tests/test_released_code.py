"""Each distillation method against its authors' released code, written out here in the released
expressions (not the project's helpers): the attack (objective, start, steps, the student's mode) and
the adversarial examples it makes, the loss, its reduction and factor, which teacher sees which input,
the order of the student's forward passes, the learning-rate schedules, and B-MTARD's per-step block
over hundreds of steps with a learning-rate milestone in the middle.

The released lines transcribed here: zibojia/RSLAD resnet18_rslad_cifar10.py (kl_loss, torch.mean,
5/6 and 1/6; x10 in the CIFAR-100 scripts); goldblum/AdversariallyRobustDistillation main.py
(nn.KLDivLoss(), temp^2, AttackPGD in train mode); zhaoshiji123/MTARD mtard_resnet18_cifar10.py and
zhaoshiji123/MTARD-extension resnet18_mtard_cifar10.py (the weight and temperature updates);
MadryLab/cifar10_challenge pgd_attack.py and train.py (PGD-AT's attack, on Model(mode='train')).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustedge.config import AttackConfig
from robustedge.methods import get_method
from robustedge.teachers import FrozenTeacher


def kl_loss(a, b):  # RSLAD / MTARD / B-MTARD, verbatim
    loss = -a * b + torch.log(b + 1e-5) * b
    return loss


def entropy_value(a):  # B-MTARD, verbatim
    value = torch.log(a + 1e-5) * a
    return value


class Recorder(nn.Module):
    """Runs ``net`` and remembers every call: (training mode, input, output)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls: list[tuple[bool, torch.Tensor, torch.Tensor]] = []

    def forward(self, x):
        out = self.net(x)
        self.calls.append((self.net.training, x.detach().clone(), out.detach().clone()))
        return out


def _student(classes: int, seed: int = 0) -> Recorder:
    torch.manual_seed(seed)
    return Recorder(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(16, classes)))


def _teacher(classes: int, scale: float, seed: int) -> Recorder:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, classes))
    with torch.no_grad():
        net[1].weight.mul_(scale)
    return Recorder(FrozenTeacher(net))


def _batch(classes: int):
    gen = torch.Generator().manual_seed(1)
    return torch.rand(12, 1, 4, 4, generator=gen), torch.randint(0, classes, (12,), generator=gen)


ATTACK = AttackConfig(eps=0.1, steps=3, step_size=0.05)  # start and mode: auto (each method's released ones)


# the released attacks, verbatim but for the names of their arguments
def rslad_inner_loss(model, teacher_logits, x_natural, step_size, epsilon, perturb_steps):  # rslad_loss.py
    criterion_kl = nn.KLDivLoss(reduction="none")  # size_average=False, reduce=False
    model.eval()
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_kl = criterion_kl(F.log_softmax(model(x_adv), dim=1), F.softmax(teacher_logits, dim=1))
            loss_kl = torch.sum(loss_kl)
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    return torch.clamp(x_adv, 0.0, 1.0)


def mtard_inner_loss_ce(model, x_natural, y, step_size, epsilon, perturb_steps):  # mtard_loss.py
    criterion_ce_loss = torch.nn.CrossEntropyLoss()
    model.eval()
    x_adv = x_natural.detach() + 0.001 * torch.randn(x_natural.shape).detach()
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            loss_ce = criterion_ce_loss(model(x_adv), y)
        grad = torch.autograd.grad(loss_ce, [x_adv])[0]
        x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)
    model.train()
    return torch.clamp(x_adv, 0.0, 1.0)


def ard_attack_pgd(basic_net, inputs, targets, step_size, epsilon, num_steps):  # main.py AttackPGD.forward
    basic_net.train()  # net.train() in train()
    x = inputs.detach()
    x = x + torch.zeros_like(x).uniform_(-epsilon, epsilon)
    for i in range(num_steps):
        x.requires_grad_()
        with torch.enable_grad():
            loss = F.cross_entropy(basic_net(x), targets, reduction="sum")  # size_average=False
        grad = torch.autograd.grad(loss, [x])[0]
        x = x.detach() + step_size * torch.sign(grad.detach())
        x = torch.min(torch.max(x, inputs - epsilon), inputs + epsilon)
        x = torch.clamp(x, 0.0, 1.0)
    return x


def madry_perturb(model, x_nat, y, epsilon, step_size, num_steps):  # pgd_attack.py LinfPGDAttack.perturb
    model.train()  # Model(mode='train') in train.py
    x = x_nat + torch.empty_like(x_nat).uniform_(-epsilon, epsilon)  # np.random.uniform
    x = torch.clamp(x, 0, 1)
    for i in range(num_steps):
        x.requires_grad_()
        with torch.enable_grad():
            loss = F.cross_entropy(model(x), y, reduction="sum")  # model.xent: reduce_sum
        grad = torch.autograd.grad(loss, [x])[0]
        x = x.detach() + step_size * torch.sign(grad)
        x = torch.clamp(torch.min(torch.max(x, x_nat - epsilon), x_nat + epsilon), 0, 1)
    return x


def _train_calls(student: Recorder):
    return [(x, out) for training, x, out in student.calls if training]


@pytest.mark.parametrize("classes,factor", [(10, 1.0), (100, 10.0)])  # the CIFAR-10 / CIFAR-100 scripts
@pytest.mark.parametrize("name", ["ard", "rslad", "mtard", "bmtard"])
def test_the_step_loss_is_the_released_expression(name, classes, factor):
    teachers = {"robust": _teacher(classes, 3.0, 1), "clean": _teacher(classes, 0.5, 2)}
    args = {} if name == "ard" else {"kl_factor": factor}
    method = get_method(name)(args, ATTACK, teachers)
    student = _student(classes)
    x, y = _batch(classes)
    mirror = copy.deepcopy(student.net)  # the student before the step: the released attack runs on it
    student.train()
    torch.manual_seed(7)
    loss, _ = method.step(student, x, y)
    robust, clean = teachers["robust"].calls, teachers["clean"].calls
    trained = _train_calls(student)
    attack_modes = {training for training, _, _ in student.calls[:ATTACK.steps]}
    if name == "ard":
        # main.py: AttackPGD under net.train(); then S(x'), T(x), S(x) (the last even at alpha = 1)
        assert attack_modes == {True} and len(trained) == ATTACK.steps + 2
        (x_adv, outputs), (x_nat, _) = trained[-2], trained[-1]
        assert torch.equal(x_nat, x) and not torch.equal(x_adv, x)
        assert len(robust) == 1 and torch.equal(robust[0][1], x)
        temp, alpha = 30.0, 1.0
        # KL_loss = nn.KLDivLoss(): in the torch the authors ran, the elementwise mean (newer torch
        # warns that 'mean' will become 'batchmean'), so its released meaning is written out
        KL_loss = lambda a, b: torch.mean(nn.KLDivLoss(reduction="none")(a, b))  # noqa: E731
        expected = alpha * temp * temp * KL_loss(F.log_softmax(outputs / temp, dim=1),
                                                 F.softmax(robust[0][2] / temp, dim=1))
    else:
        assert attack_modes == {False} and len(trained) == 2  # eval-mode attack, then S(x'), S(x)
        (x_adv, adv_logits), (x_nat, nat_logits) = trained
        assert torch.equal(x_nat, x) and not torch.equal(x_adv, x)
        if name == "rslad":
            assert len(robust) == 1 and torch.equal(robust[0][1], x)  # the teacher sees clean x only
            teacher_probs = F.softmax(robust[0][2], dim=1)
            kl_1 = factor * torch.mean(kl_loss(F.log_softmax(adv_logits, dim=1), teacher_probs))
            kl_2 = factor * torch.mean(kl_loss(F.log_softmax(nat_logits, dim=1), teacher_probs))
            expected = 5 / 6.0 * kl_1 + 1 / 6.0 * kl_2
        else:
            assert len(robust) == 1 and torch.equal(robust[0][1], x_adv)  # robust teacher on x'
            assert len(clean) == 1 and torch.equal(clean[0][1], x)  # clean teacher on x
            kl_1 = factor * torch.mean(kl_loss(F.log_softmax(adv_logits, dim=1), F.softmax(robust[0][2] / 1, dim=1)))
            kl_2 = factor * torch.mean(kl_loss(F.log_softmax(nat_logits, dim=1), F.softmax(clean[0][2] / 1, dim=1)))
            expected = 1 / 2.0 * kl_1 + 1 / 2.0 * kl_2  # first step: both losses are their own L0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    # the adversarial examples: the released attack from the same random draw on the same student
    torch.manual_seed(7)
    if name == "ard":
        released = ard_attack_pgd(mirror, x, y, ATTACK.step_size, ATTACK.eps, ATTACK.steps)
    elif name == "rslad":
        released = rslad_inner_loss(mirror, robust[0][2], x, ATTACK.step_size, ATTACK.eps, ATTACK.steps)
    else:
        released = mtard_inner_loss_ce(mirror, x, y, ATTACK.step_size, ATTACK.eps, ATTACK.steps)
    assert torch.allclose(x_adv, released, atol=1e-6), (x_adv - released).abs().max()
    # then the released step's own forwards in train mode, S(x') and S(x): the BN statistics end alike
    # (ARD's attack moved them at every step, the others' eval-mode attacks did not)
    with torch.no_grad():
        mirror(released)
        mirror(x)
    assert torch.allclose(mirror[1].running_mean, student.net[1].running_mean, atol=1e-6)
    assert torch.allclose(mirror[1].running_var, student.net[1].running_var, atol=1e-6)


def test_pgd_at_attacks_as_madry_et_al():
    student = _student(10)
    x, y = _batch(10)
    mirror = copy.deepcopy(student.net)
    method = get_method("pgd_at")({}, ATTACK, {})
    torch.manual_seed(3)
    x_adv = method.perturb(student, x, y, loss="ce")
    torch.manual_seed(3)
    released = madry_perturb(mirror, x, y, ATTACK.eps, ATTACK.step_size, ATTACK.steps)
    assert torch.allclose(x_adv, released, atol=1e-6)
    assert torch.allclose(student.net[1].running_mean, mirror[1].running_mean)  # train mode moved both alike


def test_a_recipe_may_set_the_attack_mode_and_every_method_follows_it():
    for name in ("trades", "rslad", "pgd_at", "ard"):
        teachers = {"robust": _teacher(10, 3.0, 1), "clean": _teacher(10, 0.5, 2)}
        for mode, training in (("eval", False), ("train", True)):
            method = get_method(name)({}, AttackConfig(eps=0.1, steps=2, step_size=0.05, mode=mode), teachers)
            student = _student(10)
            student.train()
            method.step(student, *_batch(10))
            attack_modes = {t for t, _, _ in student.calls[:2]}
            assert attack_modes == {training}, (name, mode)


def test_ards_attack_moves_the_running_statistics_and_the_others_do_not():
    for name, moves in (("ard", True), ("rslad", False), ("mtard", False), ("pgd_at", True), ("trades", False)):
        teachers = {"robust": _teacher(10, 3.0, 1), "clean": _teacher(10, 0.5, 2)}
        method = get_method(name)({}, ATTACK, teachers)
        student = _student(10)
        bn = student.net[1]
        x, y = _batch(10)
        student.train()
        before = bn.running_mean.clone()
        method.perturb(student, x, y, loss="ce")
        assert (not torch.equal(bn.running_mean, before)) == moves, name
        assert student.training  # the mode it was in is restored


def test_each_method_starts_its_attack_as_released():
    x = torch.full((2, 1, 4, 4), 0.99)  # near the top of the pixel range: a clipped start differs
    seen = {}
    for name in ("ard", "rslad", "pgd_at"):
        method = get_method(name)({}, AttackConfig(eps=0.1, steps=1, step_size=0.0), {"robust": _teacher(10, 1, 1)})
        student = _student(10)
        student.eval()
        torch.manual_seed(0)
        method.perturb(student, x, torch.zeros(2, dtype=torch.long), loss="ce")
        seen[name] = student.calls[0][1]
    assert seen["ard"].max() > 1.0  # x + U(-eps, eps), not clipped before the first gradient
    assert seen["pgd_at"].max() <= 1.0 and (seen["pgd_at"] - x).abs().max() > 0.01  # uniform, clipped
    assert (seen["rslad"] - x).abs().max() < 0.01  # x + 0.001 N(0, I)


# ---- MTARD / B-MTARD: the released per-step block over hundreds of steps ----------------------

class ReleasedBlock:
    """zhaoshiji123/MTARD-extension resnet18_mtard_cifar10.py, one step's bookkeeping, on the logits the
    step used (B-MTARD); with ``entropy=False`` zhaoshiji123/MTARD mtard_resnet18_cifar10.py (MTARD)."""

    def __init__(self, entropy: bool, factor: float) -> None:
        self.entropy, self.factor = entropy, factor
        self.weight = {"adv_loss": 1 / 2.0, "nat_loss": 1 / 2.0}
        self.init_loss_nat = self.init_loss_adv = None
        self.weight_learn_rate, self.temp_learn_rate = 0.025, 0.001
        self.temp_adv = self.temp_nat = 1
        self.temp_max, self.temp_min = 10, 1

    def milestone(self) -> None:
        self.weight_learn_rate *= 0.1
        self.temp_learn_rate *= 0.1

    def __call__(self, student_adv_logits, student_nat_logits, teacher_adv_logits, teacher_nat_logits):
        weight = self.weight
        kl_Loss1 = kl_loss(F.log_softmax(student_adv_logits, dim=1), F.softmax(teacher_adv_logits.detach() / self.temp_adv, dim=1))
        kl_Loss2 = kl_loss(F.log_softmax(student_nat_logits, dim=1), F.softmax(teacher_nat_logits.detach() / self.temp_nat, dim=1))
        kl_Loss1 = self.factor * torch.mean(kl_Loss1)
        kl_Loss2 = self.factor * torch.mean(kl_Loss2)
        if self.entropy:
            adv_teacher_entropy = torch.mean(entropy_value(F.softmax(teacher_adv_logits.detach() / self.temp_adv, dim=1)))
            nat_teacher_entropy = torch.mean(entropy_value(F.softmax(teacher_nat_logits.detach() / self.temp_nat, dim=1)))
            self.temp_adv = self.temp_adv - self.temp_learn_rate * torch.sign((adv_teacher_entropy.detach() / nat_teacher_entropy.detach() - 1)).item()
            self.temp_nat = self.temp_nat - self.temp_learn_rate * torch.sign((nat_teacher_entropy.detach() / adv_teacher_entropy.detach() - 1)).item()
            self.temp_adv = max(min(self.temp_max, self.temp_adv), self.temp_min)
            self.temp_nat = max(min(self.temp_max, self.temp_nat), self.temp_min)
        if self.init_loss_nat is None:
            self.init_loss_nat = kl_Loss2.item()
        if self.init_loss_adv is None:
            self.init_loss_adv = kl_Loss1.item()
        lhat_adv = kl_Loss1.item() / self.init_loss_adv
        lhat_nat = kl_Loss2.item() / self.init_loss_nat
        if self.entropy:
            lhat_avg = (lhat_adv + lhat_nat) / len(weight)
            inv_rate_adv = lhat_adv / lhat_avg
            inv_rate_nat = lhat_nat / lhat_avg
            weight["nat_loss"] = weight["nat_loss"] - self.weight_learn_rate * (weight["nat_loss"] - inv_rate_nat / (inv_rate_adv + inv_rate_nat))
            weight["adv_loss"] = weight["adv_loss"] - self.weight_learn_rate * (weight["adv_loss"] - inv_rate_adv / (inv_rate_adv + inv_rate_nat))
            if weight["adv_loss"] < 0:
                weight["adv_loss"] = 0
            if weight["nat_loss"] < 0:
                weight["nat_loss"] = 0
            coef = 1.0 / (weight["adv_loss"] + weight["nat_loss"])
            weight["adv_loss"] *= coef
            weight["nat_loss"] *= coef
        else:  # MTARD (bert = 1)
            inv_rate_adv, inv_rate_nat = lhat_adv ** 1, lhat_nat ** 1
            weight["nat_loss"] = weight["nat_loss"] - self.weight_learn_rate * (weight["nat_loss"] - inv_rate_nat / (inv_rate_adv + inv_rate_nat))
            weight["adv_loss"] = 1 - weight["nat_loss"]
        total_loss = weight["adv_loss"] * kl_Loss1 + weight["nat_loss"] * kl_Loss2
        return kl_Loss1.item(), kl_Loss2.item(), total_loss.item()


@pytest.mark.parametrize("name,factor", [("bmtard", 1.0), ("mtard", 10.0)])
def test_the_balances_follow_the_released_block_over_hundreds_of_steps(name, factor, tmp_path):
    """300 real training steps (the trainer's own step: folded attack twin, optimiser, after_step) with
    a milestone at step 150. The released block is fed the logits our step used (recorded) and keeps
    its own Python-float state; both KL terms, the total, the weights and the temperatures must agree
    at every step. A flat robust and a sharp clean teacher make the temperatures move."""
    from robustedge.checkpoint import ModelMeta, ModelSpec, save_model
    from robustedge.config import TeacherConfig, TrainConfig
    from robustedge.training_parts import build_parts

    spec = ModelSpec("resnet20", 10, 1, 0.25, 8)
    files = {}
    for seed, (role, scale) in enumerate((("robust", 0.3), ("clean", 8.0))):
        torch.manual_seed(seed)
        model = spec.build()
        with torch.no_grad():
            model.fc.weight.mul_(scale)
        files[role] = str(save_model(tmp_path / f"{role}.safetensors", model, ModelMeta(spec, dataset="synthetic")))
    steps, milestone = 300, 150
    cfg = TrainConfig(method=name, method_args={"kl_factor": factor}, seed=0,
                      attack=AttackConfig(eps=0.1, steps=2, step_size=0.05),
                      teachers={r: TeacherConfig(checkpoint=p, precision="fp32") for r, p in files.items()})
    cfg.optim.lr, cfg.optim.milestones = 0.05, [milestone]
    cfg.amp, cfg.channels_last = "off", False
    parts = build_parts(cfg, spec, torch.device("cpu"))
    assert parts.method.attack_twin is not None  # the trainer's fast path is what is checked
    for role in ("robust", "clean"):
        parts.method.teachers[role] = Recorder(parts.method.teachers[role])
    student_outputs = []
    parts.model.register_forward_hook(lambda m, i, o: student_outputs.append(o.detach().clone()) if m.training else None)
    block = ReleasedBlock(entropy=name == "bmtard", factor=factor)
    gen = torch.Generator().manual_seed(3)
    history = []
    for step in range(steps):
        x, y = torch.rand(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        if step == milestone:
            parts.method.set_epoch(milestone)
            block.milestone()
        student_outputs.clear()
        for role in ("robust", "clean"):
            parts.method.teachers[role].calls.clear()
        logs, _ = parts.step(parts.model, x, y)
        (adv_logits, nat_logits) = student_outputs
        (_, t_adv_in, t_adv), (_, t_nat_in, t_nat) = parts.method.teachers["robust"].calls[0], \
            parts.method.teachers["clean"].calls[0]
        assert torch.equal(t_nat_in, x) and not torch.equal(t_adv_in, x)
        kl_1, kl_2, total = block(adv_logits, nat_logits, t_adv, t_nat)
        state = {k: float(v) for k, v in parts.method.state_dict().items()}
        # rel 1e-4: the state's float32 temperatures against the block's doubles move a KL of ~1e-3 by ~1e-5
        assert float(logs["loss_adv"]) == pytest.approx(kl_1, rel=1e-4), step
        assert float(logs["loss_nat"]) == pytest.approx(kl_2, rel=1e-4), step
        assert float(logs["loss"]) == pytest.approx(total, rel=1e-4), step
        # float32 state against Python floats: 300 increments of g = 0.001 round to ~1e-5; a step in
        # the wrong direction or at the wrong time is off by g = 1e-3 at once
        for key, expected, tol in (("w_adv", block.weight["adv_loss"], 1e-5), ("w_nat", block.weight["nat_loss"], 1e-5),
                                   ("tau_adv", block.temp_adv, 1e-4), ("tau_nat", block.temp_nat, 1e-4)):
            assert state[key] == pytest.approx(expected, abs=tol), (step, key)
        history.append(state)
    moved = {k for k in ("w_adv", "tau_adv", "tau_nat") if max(abs(h[k] - history[0][k]) for h in history) > 1e-3}
    assert "w_adv" in moved  # the balance did something worth checking
    assert bool(moved & {"tau_adv", "tau_nat"}) == (name == "bmtard")
    late = [h["tau_adv"] + h["tau_nat"] for h in history[milestone:]]
    assert name == "mtard" or 0 < max(late) - min(late) <= (steps - milestone) * 0.0001 + 1e-6  # g x 0.1 after it


# ---- the learning-rate schedules, epoch by epoch ---------------------------------------------

def released_rslad_mtard_lrs(epochs: int = 300) -> list[float]:
    """RSLAD, MTARD, B-MTARD: ``for epoch in range(1, epochs+1): <train>; if epoch in [215,260,285]: lr *= 0.1``
    (the loss-balance and temperature rates decay on the same lines)."""
    lr, used = 0.1, []
    for epoch in range(1, epochs + 1):
        used.append(lr)
        if epoch in [215, 260, 285]:
            lr *= 0.1
    return used


def released_ard_lrs(epochs: int = 200) -> list[float]:
    """ARD main.py: ``adjust_learning_rate(optimizer, epoch, lr)`` before each 0-based epoch, with ``lr``
    always the initial 0.1 and --lr_schedule [100, 150]: both set 0.1 * 0.1."""
    current, used = 0.1, []
    for epoch in range(epochs):
        if epoch in [100, 150]:
            current = 0.1 * 0.1
        used.append(current)
    return used


@pytest.mark.parametrize("recipe", ["cifar10_resnet18_bmtard", "cifar100_mobilenetv2_bmtard", "cifar10_resnet18_mtard",
                                    "cifar10_mobilenetv2_rslad", "cifar100_resnet18_rslad", "cifar10_mobilenetv2_ard",
                                    "cifar100_mobilenetv2_ard"])
def test_the_recipes_learning_rate_is_the_scripts_at_every_epoch(recipe):
    from robustedge.config import load_config
    from robustedge.trainer import lr_factor

    cfg = load_config(recipe)
    released = released_ard_lrs(cfg.epochs) if cfg.method == "ard" else released_rslad_mtard_lrs(cfg.epochs)
    ours = [cfg.optim.lr * lr_factor(cfg, epoch) for epoch in range(cfg.epochs)]
    assert ours == pytest.approx(released, rel=1e-12)
    if cfg.method in ("mtard", "bmtard"):  # eta and g decay with the lr, at the same epochs
        method = get_method(cfg.method)({}, cfg.attack, {"robust": _teacher(10, 1, 1), "clean": _teacher(10, 1, 2)},
                                        cfg.optim.milestones, cfg.optim.gamma)
        for epoch in range(cfg.epochs):
            method.set_epoch(epoch)
            assert method.decay() == pytest.approx(released[epoch] / 0.1, rel=1e-12), epoch
