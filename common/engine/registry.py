"""The one list of methods: name -> class, imported lazily so that each
method's folder stays self-contained.

Everything else that needs the list of methods reads it from here, through the
class attributes every method declares (:class:`common.engine.method.SSLMethod`):
``run_all.sh`` (its method tokens, through ``python -m common.engine.registry --list``),
``bench/overhead.py`` and ``bench/gpu_check.py`` (what they time and smoke-test),
``eval/linear.py`` (each method's linear-probe protocol) and ``eval/summary.py``
(the paper's rows beside ours).  Adding a method is its folder plus one line
below (docs/add_a_method.md).

    python -m common.engine.registry --list methods     # the registered names
    python -m common.engine.registry --list tokens      # run_all.sh's tokens: "<token> <entry module> <family>"
    python -m common.engine.registry --list protocols   # the linear-probe protocols the methods use
"""
from __future__ import annotations

import argparse
import importlib
import sys

METHODS = {
    "simsiam": "simsiam.method:SimSiamMethod",
    "simclr": "simclr.method:SimCLRMethod",
    "dino": "dino.method:DINOMethod",
    "dino_stn": "stn.method:STNDINOMethod",
    "ibot": "ibot.method:IBOTMethod",
    "byol": "byol.method:BYOLMethod",
    "mocov3": "mocov3.method:MoCoV3Method",
    "barlowtwins": "barlowtwins.method:BarlowTwinsMethod",
    "vicreg": "vicreg.method:VICRegMethod",
}
FAMILIES = ("resnet", "vit")


def get_method(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; this repository has {sorted(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def method_classes() -> dict:
    """{name: class} of every registered method, in the registry's order."""
    return {name: get_method(name) for name in METHODS}


def run_all_tokens() -> dict:
    """{token: (method class, entry module, backbone family)} of every run_all.sh
    token; the entry module is ``<the method's folder>.main``."""
    tokens = {}
    for name, cls in method_classes().items():
        for token, family in cls.run_all_tokens.items():
            if token in tokens:
                raise ValueError(f"run_all.sh token {token!r} is declared by both {tokens[token][0].name} and {name}")
            if family not in FAMILIES:
                raise ValueError(f"{name}: token {token!r} has backbone family {family!r}, not one of {FAMILIES}")
            tokens[token] = (cls, f"{cls.__module__.split('.')[0]}.main", family)
    return tokens


def linear_protocols() -> list:
    """The linear-probe protocols the registered methods use, each once, in order."""
    return list(dict.fromkeys(p for cls in method_classes().values() for p in cls.linear_protocols.values()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="List the registered methods and what the scripts read of them.")
    parser.add_argument("--list", required=True, choices=["methods", "tokens", "protocols"],
                        help="methods: the names; tokens: run_all.sh's '<token> <entry module> <family>'; "
                             "protocols: the linear-probe protocols")
    args = parser.parse_args(argv)
    if args.list == "methods":
        lines = list(METHODS)
    elif args.list == "tokens":
        lines = [f"{token} {entry} {family}" for token, (_, entry, family) in run_all_tokens().items()]
    else:
        lines = linear_protocols()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
