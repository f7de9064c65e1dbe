"""The attack-failure flags judge masking of the attacks that ran, within a budget of the suite's cost:
nothing for clean accuracy alone, a note (not a failure) for FGSM alone, and never the flags' own Square
or FGSM as the figure a stronger attack must not beat."""

import json

import numpy as np
import pytest

from robustedge.cli import main
from robustedge.flags import FlagSettings, check_passes, checks_budget_n
from robustedge.verifier import comparison_flags, reported_worst


def _eval(checkpoint, out, attacks, *extra):
    return main(["eval", str(checkpoint), "--n", "200", "--attacks", attacks, "--device", "cpu", "--no-progress",
                 "--out", str(out), *map(str, extra)])


def test_clean_accuracy_alone_runs_no_check_and_exits_0(digits_checkpoint, tmp_path, capsys):
    assert _eval(digits_checkpoint, tmp_path / "ev", "clean") == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert saved["flags"] is None and saved["checks"] == {"skipped": "no robustness attack ran"}
    assert "flags" not in saved["seconds"] and "not run (no robustness attack ran)" in out


def test_fgsm_alone_is_a_note_not_a_failure(digits_checkpoint, tmp_path, capsys):
    # the cheap suite leaves no budget for the checks; with budget, FGSM is still never what they judge
    for extra, ran in (((), False), (("--flags-budget", 1000), True)):
        assert _eval(digits_checkpoint, tmp_path / f"ev{ran}", "clean,fgsm", *extra) == 0
        out = capsys.readouterr().out
        saved = json.loads((tmp_path / f"ev{ran}" / "eval.json").read_text())
        assert "fgsm alone is a weak attack" in out and saved["notes"]
        assert (saved["flags"] is not None) == ran
        if ran:  # PGD-100 and Square never ran: no reported iterative attack to hold them against
            assert "strong_pgd_accuracy" not in saved["checks"] and "square_accuracy" not in saved["checks"]
            assert not any(f["check"] in ("more_steps", "blackbox_below_whitebox") for f in saved["flags"])
            assert f"attack-failure checks: {saved['checks']['n']} examples" in out


def test_reported_worst_is_over_iterative_attacks_only():
    results = {"clean": np.array([1, 1, 1, 1], bool), "whitebox_fgsm": np.array([1, 0, 1, 1], bool),
               "whitebox_pgd20": np.array([1, 1, 0, 1], bool), "whitebox_autoattack": np.array([1, 1, 1, 0], bool),
               "square": np.array([0, 1, 1, 1], bool)}
    assert reported_worst(results).tolist() == [True, True, False, False]  # not FGSM's, not Square's
    assert reported_worst({"clean": results["clean"], "whitebox_fgsm": results["whitebox_fgsm"]}) is None
    transfer = {"clean": results["clean"], "transfer_pgd20": results["whitebox_pgd20"]}
    assert reported_worst(transfer).tolist() == [True, True, False, True]
    # Square beating FGSM alone is ordinary; beating PGD-20 is the masking symptom
    fgsm_only = {"clean": results["clean"], "whitebox_fgsm": np.ones(4, bool), "square": results["square"]}
    assert comparison_flags(fgsm_only, tolerance=0.0) == []
    assert [f["check"] for f in comparison_flags(results, tolerance=0.0)] == ["blackbox_below_whitebox"]


@pytest.mark.parametrize("suite_passes,n_examples,expected", [
    (1e9, 10_000, 100),   # an AutoAttack suite on a test set: the default 100 examples
    (1e9, 40, 40),        # never more than were evaluated
    (50_000, 10_000, 45),  # a cheap suite: as many as half its passes allow
    (5_000, 10_000, 0),   # fewer than min_n fit: none
])
def test_the_checks_cost_a_fraction_of_the_suite(suite_passes, n_examples, expected):
    settings = FlagSettings()
    per_example = check_passes(settings, pgd20_given=True, judge_reported=True)
    assert per_example == pytest.approx(1 + 20 + 2 / 3 + 200 + 1000 / 3)
    n = checks_budget_n(settings, n_examples, suite_passes, per_example)
    assert n == expected and n * per_example <= max(settings.budget * suite_passes, 0) + 1e-9 or n == 0


def test_an_unbounded_budget_checks_the_configured_examples():
    settings = FlagSettings(budget=1e308)
    assert checks_budget_n(settings, 1000, 1e10, 555.0) == 100
