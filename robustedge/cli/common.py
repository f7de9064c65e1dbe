"""What the commands' parsers share: the one-line error parser, the help formatter, option types built on
:mod:`robustedge.options`, and the flags that describe a foreign model file."""

from __future__ import annotations

import argparse
import re
from typing import Callable

from robustedge import options
from robustedge.errors import RobustEdgeError


class Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line on stderr (and exit 2) like every other error."""

    def error(self, message: str):
        message = re.sub(r"^argument (\S+): \1 ", r"\1 ", message)  # "argument --n: --n must..." -> "--n must..."
        self.exit(2, f"{self.prog}: error: {message}\n")


class Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in --help, but not "(default: None)" after a help text that already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or action.default == [] or "default" in text:
            return text
        return super()._get_help_string(action)


def typed(parse: Callable, *args) -> Callable[[str], object]:
    """An argparse ``type`` from one of :mod:`robustedge.options`' parsers (their message, one line)."""
    def convert(text: str):
        try:
            return parse(text, *args)
        except RobustEdgeError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def count(minimum: int, name: str) -> Callable[[str], object]:
    return typed(options.parse_int, name, minimum)


SEED = typed(options.parse_seed, "--seed")
EPS = typed(options.parse_eps, "--eps")
SOURCE_HELP = ("a RobustEdge checkpoint, a .pt/.pth/.safetensors state dict (with --arch) or robustbench:<name> "
               "(the zoo extra)")


def floats(name: str) -> Callable[[str], object]:
    def convert(text: str):
        try:
            return [options.parse_number(v, name) for v in text.split(",")]
        except RobustEdgeError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def fact(field: str) -> Callable[[str], object]:
    """The argparse type of a model fact: the rule the API applies to the same keyword (loading.FACT_RULES)."""
    from robustedge.loading import check_fact

    return typed(lambda text: check_fact(field, text, cli=True))


def add_model_facts(p: argparse.ArgumentParser, dataset_and_eps: bool = False) -> None:
    """What a foreign model file does not say (robustedge/loading.py); RobustEdge checkpoints ignore these."""
    g = p.add_argument_group("foreign models (state dicts, RobustBench): what the file does not say")
    g.add_argument("--arch", help="registry architecture of a state dict file (robustedge models lists them)")
    g.add_argument("--num-classes", type=fact("num_classes"), help="default: the dataset's")
    g.add_argument("--in-channels", type=fact("in_channels"), help="default: the dataset's")
    g.add_argument("--image-size", type=fact("image_size"), help="default: the dataset's")
    g.add_argument("--width", type=fact("width"), default=1.0, help="width multiplier")
    g.add_argument("--mean", type=floats("--mean"), help="input normalisation the weights expect, e.g. "
                                                         "0.4914,0.4822,0.4465 (kuangliu's CIFAR-10)")
    g.add_argument("--std", type=floats("--std"), help="with --mean, e.g. 0.2023,0.1994,0.2010")
    if dataset_and_eps:
        g.add_argument("--dataset", default=None, help="dataset the model is for (default: the checkpoint's; "
                                                       "cifar10 for foreign models)")
        g.add_argument("--eps", type=EPS, default=None,
                       help="L-inf radius in [0, 1], e.g. 8/255 (default: the checkpoint's or the dataset's)")


def facts(args: argparse.Namespace):
    from robustedge.loading import ModelFacts

    return ModelFacts(args.arch, args.num_classes, args.in_channels, args.image_size, args.width, args.mean,
                      args.std, args.dataset, args.eps).checked(cli=True)
