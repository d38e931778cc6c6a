"""Train BYOL with or without Hard View Selection.

    python -m byol.main --config configs/byol_small.yaml --data-dir DATA hvs.enabled=true
    torchrun --nproc_per_node 8 -m byol.main --config configs/byol_paper.yaml ...

Re-running the same command resumes from ``<output_dir>/checkpoint.pth``."""
from byol.method import BYOLMethod
from common.engine.train import main

if __name__ == "__main__":
    main(BYOLMethod)
