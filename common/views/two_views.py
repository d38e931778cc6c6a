"""BYOL's two view recipes, as BYOL, MoCo v3, Barlow Twins and VICReg train with
them, and how Hard View Selection draws candidates for them.

The two views of an image share the crop, flip, colour jitter and grayscale
settings and differ in blur and solarisation (BYOL, Appendix B: view 1 always
blurred, never solarised; view 2 blurred with p 0.1, solarised with p 0.2).
With HVS the candidates keep their recipe, as DINO's two global crops do
(:mod:`common.views.multicrop`): ``hvs.n_views`` = N candidates are split N/2 per
recipe, pools ``[(N/2, 1), (N/2, 1)]``, and a compared pair is one candidate of
each recipe, (N/2)^2 pairs (4 with N = 4, where a single pool would give
C(4, 2) = 6 pairs, some of two views of one recipe, which these methods never
train on).  Without HVS the loader draws one view of each recipe."""
from __future__ import annotations

from dataclasses import replace

from common.views.augment import MultiViewTransform, ViewRecipe, augment_spec, recipe_from_cfg
from common.engine.config import ConfigError, setting

N_RECIPES = 2


def two_views_spec(interpolation: str = "bicubic", jitter=(0.4, 0.4, 0.2, 0.1)) -> dict:
    """The ``augment.*`` keys (BYOL's recipe by default) and ``hvs.n_views``."""
    return {
        **augment_spec(scale=(0.08, 1.0), jitter=jitter),
        "augment.blur_p": setting([1.0, 0.1], "probability of Gaussian blur of view 1 and view 2", range="[0, 1]",
                                  length=2),
        "augment.solarize_p": setting([0.0, 0.2], "probability of solarisation of view 1 and view 2",
                                      range="[0, 1]", length=2),
        "augment.interpolation": setting(interpolation, "crop resize interpolation", ["bicubic", "bilinear"]),
        "hvs.n_views": setting(4, "candidate views per image with HVS (even), half drawn with each view's recipe; "
                               "every pair of one candidate of each recipe is compared ((N/2)^2 pairs)",
                               range="[2, inf)"),
    }


def recipes(cfg: dict) -> list[ViewRecipe]:
    """The :class:`common.views.augment.ViewRecipe` of view 1 and of view 2."""
    a = cfg["augment"]
    return [replace(recipe_from_cfg({**a, "blur_p": a["blur_p"][v]}), solarize_p=a["solarize_p"][v],
                    interpolation=a["interpolation"]) for v in range(N_RECIPES)]


def per_recipe(cfg: dict) -> int:
    """Candidates per recipe with HVS, ``hvs.n_views / 2``; an odd number is a config error."""
    n = int(cfg["hvs"]["n_views"])
    if n % N_RECIPES:
        raise ConfigError(f"hvs.n_views={n} must be even: the candidates are split evenly over the two view "
                          f"recipes of {cfg.get('method', 'this method')}")
    return n // N_RECIPES


def two_views_transform(cfg: dict, hvs_on: bool) -> MultiViewTransform:
    """N/2 candidates of each recipe with HVS, one of each without."""
    n = per_recipe(cfg) if hvs_on else 1
    return MultiViewTransform([(recipe, n) for recipe in recipes(cfg)])


def two_views_pools(cfg: dict) -> list:
    return [(per_recipe(cfg), 1)] * N_RECIPES


class TwoViews:
    """The data hooks of a method trained on BYOL's two view recipes (mix it in
    before :class:`common.engine.method.SSLMethod` or ``PairMethod``)."""

    def view_transform(self, hvs_on):
        return two_views_transform(self.cfg, hvs_on)

    def pools(self):
        return two_views_pools(self.cfg)
