"""Train VICReg with or without Hard View Selection.

    python -m vicreg.main --config configs/vicreg_small.yaml --data-dir DATA hvs.enabled=true
    torchrun --nproc_per_node 8 -m vicreg.main --config configs/vicreg_paper.yaml ...

Variance and covariance are taken over the global batch (embeddings gathered across ranks).
Re-running the same command resumes from ``<output_dir>/checkpoint.pth``."""
from common.engine.train import main
from vicreg.method import VICRegMethod

if __name__ == "__main__":
    main(VICRegMethod)
