"""BYOL (Grill et al. 2020) with Hard View Selection: online and target networks, the
normalised-MSE loss and its pair scores, the method."""
