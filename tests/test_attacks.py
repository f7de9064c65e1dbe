import pytest
import torch
import torch.nn.functional as F

from robustedge import RobustEdgeError
from robustedge.attacks import autoattack, cw_inf, cw_margin, fgsm, pgd
from robustedge.eval_report import SUITE
from robustedge.suite import evaluate

EPS = 0.1


@pytest.fixture(scope="module")
def batch(digits):
    x = digits.test.float_images()[:64]
    return x, digits.test.labels[:64]


def _attacks(model, x, y):
    with torch.no_grad():
        target = F.softmax(model(x), 1)
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    return {
        "fgsm": fgsm(model, x, y, EPS),
        "pgd_ce": pgd(model, x, y, eps=EPS, step_size=EPS / 4, steps=10, generator=gen()),
        "pgd_kl": pgd(model, x, eps=EPS, step_size=EPS / 4, steps=10, loss="kl", target_probs=target,
                      start="gaussian", generator=gen()),
        "pgd_cw": pgd(model, x, y, eps=EPS, step_size=EPS / 4, steps=10, loss="cw", start="none"),
        "cw_inf": cw_inf(model, x, y, eps=EPS, step_size=EPS / 4, steps=10, generator=gen()),
    }


def test_attacks_stay_in_the_eps_ball_and_the_image_range(digits_model, batch):
    x, y = batch
    for name, x_adv in _attacks(digits_model, x, y).items():
        assert (x_adv - x).abs().max() <= EPS + 1e-6, name
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0, name
        assert not x_adv.requires_grad, name
        assert (x_adv != x).any(), name


def test_attacks_raise_their_loss(digits_model, batch):
    x, y = batch
    with torch.no_grad():
        clean_logits = digits_model(x)
        target = F.softmax(clean_logits, 1)
        advs = _attacks(digits_model, x, y)
        ce = lambda z: F.cross_entropy(z, y).item()  # noqa: E731
        assert ce(digits_model(advs["fgsm"])) > ce(clean_logits)
        assert ce(digits_model(advs["pgd_ce"])) > ce(digits_model(advs["fgsm"]))
        kl = F.kl_div(F.log_softmax(digits_model(advs["pgd_kl"]), 1), target, reduction="batchmean")
        assert kl.item() > 0.1
        assert cw_margin(digits_model(advs["cw_inf"]), y).mean() > cw_margin(clean_logits, y).mean()


def test_accuracy_falls_monotonically_with_eps(digits_model, batch):
    x, y = batch
    accs = []
    for eps in (0.0, 0.02, 0.05, 0.1, 0.2):
        gen = torch.Generator().manual_seed(0)
        x_adv = pgd(digits_model, x, y, eps=eps, step_size=eps / 4, steps=10, generator=gen)
        with torch.no_grad():
            accs.append((digits_model(x_adv).argmax(1) == y).float().mean().item())
    assert accs[0] > 0.9
    assert all(a >= b for a, b in zip(accs, accs[1:])), accs
    assert accs[-1] < 0.2 < accs[0]


def test_attacks_keep_the_model_mode_and_touch_no_parameter_gradients(digits_model, batch):
    import copy

    digits_model = copy.deepcopy(digits_model)  # train mode moves BN statistics: never on the shared model
    x, y = batch
    for mode in (True, False):
        digits_model.train(mode)
        digits_model.zero_grad(set_to_none=True)
        snapshot = {k: v.clone() for k, v in digits_model.state_dict().items()}
        pgd(digits_model, x[:8], y[:8], eps=EPS, step_size=EPS / 4, steps=2)
        assert digits_model.training is mode
        assert all(p.grad is None for p in digits_model.parameters())
        if not mode:  # in eval mode not even BN statistics move
            assert all(torch.equal(v, digits_model.state_dict()[k]) for k, v in snapshot.items())


def test_pgd_argument_checks():
    model = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match="target_probs"):
        pgd(model, torch.rand(2, 4), eps=0.1, step_size=0.01, steps=1, loss="kl")
    with pytest.raises(ValueError, match="labels"):
        pgd(model, torch.rand(2, 4), eps=0.1, step_size=0.01, steps=1)


def test_autoattack_custom_square_and_bad_lists(digits_model, batch):
    x, y = batch[0][:8], batch[1][:8]
    x_adv, y_adv = autoattack(digits_model, x, y, eps=EPS, version="custom", attacks=["square"], seed=0)
    assert (x_adv - x).abs().max() <= EPS + 1e-6 and y_adv.shape == y.shape
    with pytest.raises(RobustEdgeError, match="unknown: pgd"):
        autoattack(digits_model, x, y, eps=EPS, version="custom", attacks=["pgd"])
    with pytest.raises(RobustEdgeError, match="eps must be in"):
        autoattack(digits_model, x, y, eps=1.5)


def test_suite_report_has_w_robust_and_all_attacks(digits_model, batch):
    x, y = batch[0][:32], batch[1][:32]
    names = [n for n in SUITE if n != "autoattack"]
    report = evaluate(digits_model, x, y, attacks=names, eps=EPS, batch_size=16, show_progress=False)
    assert list(report.accuracy) == names
    for name in names[1:]:
        assert report.accuracy[name] <= report.accuracy["clean"]
        assert report.w_robust(name) == pytest.approx((report.accuracy["clean"] + report.accuracy[name]) / 2)
    assert "| pgd20 |" in report.to_markdown()


def test_the_training_attack_scales_its_loss_under_fp16_autocast():
    """Under amp fp16 the input gradients of confidently classified examples underflow to zero and PGD
    stalls on them; the methods' attack scales its loss first (the sign is unchanged)."""
    from torch import nn

    from robustedge.attacks import pgd
    from robustedge.config import AttackConfig
    from robustedge.methods import get_method

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 4))
    with torch.no_grad():
        model[1].weight.mul_(40)  # confident: some fp32 input gradients are ~1e-7 and below
    x = torch.rand(8, 1, 4, 4)
    y = model(x).argmax(1)
    method = get_method("pgd_at")({}, AttackConfig(eps=0.1, steps=1, step_size=0.05, start="none"), {})
    reference = pgd(model, x, y, eps=0.1, step_size=0.05, steps=1, start="none")  # fp32
    with torch.autocast("cpu", dtype=torch.float16):
        stalled = pgd(model, x, y, eps=0.1, step_size=0.05, steps=1, start="none")
        scaled = method.pgd(model, x, y)
    moved = lambda adv: (adv - x).flatten(1).abs().amax(1) > 0  # noqa: E731
    assert moved(reference).all() and not moved(stalled).all()  # fp16 without scaling: stuck examples
    assert moved(scaled).all() and torch.equal(scaled, reference)
