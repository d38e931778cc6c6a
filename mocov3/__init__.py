"""MoCo v3 (Chen, Xie & He 2021) with Hard View Selection: model, contrastive loss over the global batch, method."""
