"""Train Barlow Twins with or without Hard View Selection.

    python -m barlowtwins.main --config configs/barlowtwins_small.yaml --data-dir DATA hvs.enabled=true
    torchrun --nproc_per_node 8 -m barlowtwins.main --config configs/barlowtwins_paper.yaml ...

The cross-correlation is taken over the global batch (embeddings gathered across ranks).
Re-running the same command resumes from ``<output_dir>/checkpoint.pth``."""
from barlowtwins.method import BarlowTwinsMethod
from common.engine.train import main

if __name__ == "__main__":
    main(BarlowTwinsMethod)
