"""``robustedge models | methods | datasets | recipes``: the registries' names, one a line."""

from __future__ import annotations

import argparse
from typing import Callable


def add(sub: argparse._SubParsersAction) -> None:
    def lister(names: Callable[[], list[str]]):
        return lambda args: _print_lines(names())

    def models() -> list[str]:
        from robustedge.models import model_names
        return model_names()

    def methods() -> list[str]:
        from robustedge.methods import method_names
        return method_names()

    def datasets() -> list[str]:
        from robustedge.data import DATASETS
        return list(DATASETS)

    def recipes() -> list[str]:
        from robustedge.config import recipe_names
        return recipe_names()

    for name, helptext, names in (("models", "list the model registry", models),
                                  ("methods", "list the training methods", methods),
                                  ("datasets", "list the dataset registry", datasets),
                                  ("recipes", "list the YAML recipes shipped with RobustEdge (for --config)", recipes)):
        sub.add_parser(name, help=helptext).set_defaults(func=lister(names))


def _print_lines(lines: list[str]) -> int:
    print("\n".join(lines))
    return 0
