"""Train SimCLR with or without Hard View Selection.

    python -m simclr.main --config configs/simclr_small.yaml --data-dir DATA hvs.enabled=true
    torchrun --nproc_per_node 8 -m simclr.main --config configs/simclr_paper.yaml ...

Negatives come from the whole global batch (features gathered across ranks).
Re-running the same command resumes from ``<output_dir>/checkpoint.pth``."""
from common.engine.train import main
from simclr.method import SimCLRMethod

if __name__ == "__main__":
    main(SimCLRMethod)
