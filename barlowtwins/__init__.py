"""Barlow Twins (Zbontar et al. 2021) with Hard View Selection: model, redundancy-reduction loss over the global batch, method."""
