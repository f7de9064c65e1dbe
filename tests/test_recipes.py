"""The paper recipes: docs/design/training.md's tables ("Paper recipes": field, value per recipe, released line)
against the shipped YAML files and against what `robustedge distill --dry-run` prints."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from robustedge.cli import main
from robustedge.config import RECIPES, config_from_dict, config_to_dict, load_config
from robustedge.methods import get_method
from robustedge.options import parse_number

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "design" / "training.md"
DISTILLATION = ("bmtard", "mtard", "rslad", "ard")


def _cell(text: str):
    text = text.strip()
    if re.fullmatch(r"\d+/\d+", text):
        return parse_number(text, "cell")
    if text.startswith("["):
        return [_cell(v) for v in text.strip("[]").split(",") if v.strip()]
    if text in ("true", "false"):
        return text == "true"
    if text == "null":
        return None
    try:
        return float(text)
    except ValueError:
        return text


def recipe_tables() -> dict[str, dict[str, object]]:
    """{recipe: {field: value}} from every table of the "Paper recipes" section."""
    text = DESIGN.read_text(encoding="utf-8")
    section = text[text.index("### Paper recipes"):]
    section = section[:section.index("\n## ")]
    recipes: dict[str, dict[str, object]] = {}
    header: list[str] = []
    for line in section.splitlines():
        if not line.startswith("|"):
            header = []
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "field":
            header = [c.strip("`") for c in cells[1:-1]]
            for name in header:
                recipes.setdefault(name, {})
        elif header and cells[0].startswith("`"):
            for name, cell in zip(header, cells[1:-1]):
                recipes[name][cells[0].strip("`")] = _cell(cell)
    return recipes


def _value(cfg, field: str):
    if field.startswith("method_args."):
        return {**get_method(cfg.method).defaults, **cfg.method_args}[field.split(".", 1)[1]]
    node = config_to_dict(cfg)
    for part in field.split("."):
        node = node[part]
    return node


def _same(documented, actual) -> bool:
    if isinstance(documented, list):
        return isinstance(actual, list) and len(actual) == len(documented) and \
            all(_same(d, a) for d, a in zip(documented, actual))
    if isinstance(documented, float) and not isinstance(actual, bool) and isinstance(actual, (int, float)):
        return actual == pytest.approx(documented, rel=1e-9)
    return documented == actual


def test_every_distillation_recipe_is_documented_field_by_field():
    tables = recipe_tables()
    shipped = sorted(p.stem for p in RECIPES.glob("cifar*.yaml") if p.stem.rsplit("_", 1)[-1] in DISTILLATION)
    assert sorted(tables) == shipped
    for name, fields in tables.items():
        cfg = load_config(name)
        assert len(fields) >= 15, name
        for field, documented in fields.items():
            assert _same(documented, _value(cfg, field)), (name, field, documented, _value(cfg, field))


def test_the_dry_run_prints_the_documented_recipe(capsys):
    code = main(["distill", "--config", "cifar10_resnet18_bmtard", "--dry-run", "--timing-steps", "0"])
    out = capsys.readouterr().out
    assert code == 0
    printed = out.split("# resolved config\n", 1)[1].split("\n\n", 1)[0]
    cfg = config_from_dict(yaml.safe_load(printed))
    documented = recipe_tables()["cifar10_resnet18_bmtard"]
    for field, value in documented.items():
        assert _same(value, _value(cfg, field)), (field, value)
    assert "timing skipped" in out


def test_the_cifar100_recipes_carry_the_authors_factor_of_ten():
    for path in RECIPES.glob("cifar100_*.yaml"):
        cfg = load_config(path)
        if cfg.method in ("rslad", "mtard", "bmtard"):
            assert cfg.method_args.get("kl_factor") == 10.0, path.name
        elif cfg.method == "ard":  # the ARD script has no such factor
            assert "kl_factor" not in cfg.method_args
