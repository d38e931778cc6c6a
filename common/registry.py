"""Method name -> class, imported lazily so that each method's folder stays
self-contained."""
import importlib

METHODS = {
    "simsiam": "simsiam.method:SimSiamMethod",
    "simclr": "simclr.method:SimCLRMethod",
    "dino": "dino.method:DINOMethod",
    "dino_stn": "dino.stn:STNDINOMethod",
    "ibot": "ibot.method:IBOTMethod",
    "byol": "byol.method:BYOLMethod",
    "mocov3": "mocov3.method:MoCoV3Method",
    "barlowtwins": "barlowtwins.method:BarlowTwinsMethod",
    "vicreg": "vicreg.method:VICRegMethod",
}


def get_method(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; this repository has {sorted(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)
