"""How views are made: augmentation recipes, photometric and resampling ops, data sets, two-view and multi-crop pipelines."""
