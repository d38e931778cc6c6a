"""SimCLR (Chen et al. 2020) with Hard View Selection: model, NT-Xent over the global batch, method."""
