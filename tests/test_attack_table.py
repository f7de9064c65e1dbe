"""The one attack table: every consumer reads its settings, and running a row is exactly the attack the
papers' protocol writes out (the released step sizes, bit for bit)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from robustedge.attack_table import ATTACK_TABLE, ATTACKS, CIFAR_EPS, SUITE_ATTACKS
from robustedge.attacks import cw_inf, fgsm, pgd, run_table_attack
from robustedge.errors import RobustEdgeError


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 10)).eval()


# row -> the call the protocol writes out (robustedge eval's suite before the table, the flags' PGD-100)
WRITTEN_OUT = {
    "fgsm": lambda m, x, y, e, u: fgsm(m, x, y, e),
    "pgd20": lambda m, x, y, e, u: pgd(m, x, y, eps=e, step_size=e / 4, steps=20, noise=u),
    "pgd20_trades": lambda m, x, y, e, u: pgd(m, x, y, eps=e, step_size=e * 0.003 / CIFAR_EPS, steps=20, noise=u),
    "cw": lambda m, x, y, e, u: cw_inf(m, x, y, eps=e, step_size=e / 4, steps=30, noise=u),
    "pgd100": lambda m, x, y, e, u: pgd(m, x, y, eps=e, step_size=e / 10, steps=100, noise=u),
}


@pytest.mark.parametrize("name", sorted(WRITTEN_OUT))
@pytest.mark.parametrize("eps", [8 / 255, 0.1])
def test_a_row_runs_the_written_out_attack_bit_for_bit(name, eps):
    model, gen = _model(), torch.Generator().manual_seed(1)
    x, y = torch.rand(6, 3, 8, 8, generator=gen), torch.randint(0, 10, (6,), generator=gen)
    u = torch.rand(x.shape, generator=gen)
    assert torch.equal(run_table_attack(name, model, x, y, eps, noise=u), WRITTEN_OUT[name](model, x, y, eps, u))


def test_the_suite_is_the_tables_rows_in_order():
    from robustedge.eval_report import DEFAULT_ATTACKS, SUITE

    assert list(SUITE) == list(SUITE_ATTACKS) == DEFAULT_ATTACKS
    for name, row in SUITE.items():
        assert row.description == ATTACKS[name].description and row.iterative == ATTACKS[name].iterative


def test_the_flags_and_the_verifier_read_the_table():
    from robustedge.flags import FlagSettings
    from robustedge.verifier import ITERATIVE_ATTACKS  # torch-free copy: the bundle's verifier cannot import

    assert (FlagSettings().steps, FlagSettings().restarts) == (ATTACKS["pgd100"].steps, ATTACKS["pgd100"].restarts)
    assert FlagSettings().square_queries == ATTACKS["square"].queries
    assert set(ITERATIVE_ATTACKS) == {spec.name for spec in ATTACK_TABLE if spec.iterative}


@pytest.mark.parametrize("name, message", [
    ("pgd7", "unknown attack 'pgd7'; valid attacks: "),
    ("autoattack", "is not a gradient attack"),
    ("square", "is not a gradient attack"),
])
def test_rows_that_are_not_gradient_attacks_are_refused(name, message):
    with pytest.raises(RobustEdgeError, match=message):
        run_table_attack(name, _model(), torch.zeros(1, 3, 8, 8), torch.zeros(1, dtype=torch.long), 0.1)
