"""Train DINO with or without Hard View Selection.

    python -m dino.main --config configs/dino_small.yaml --data-dir DATA hvs.enabled=true
    torchrun --nproc_per_node 8 -m dino.main --config configs/dino_paper.yaml ...

Re-running the same command resumes from ``<output_dir>/checkpoint.pth``."""
from common.engine.train import main
from dino.method import DINOMethod

if __name__ == "__main__":
    main(DINOMethod)
