"""Train SimSiam with or without Hard View Selection.

    python -m simsiam.main --config configs/simsiam_small.yaml --data-dir DATA hvs.enabled=true
    torchrun --nproc_per_node 8 -m simsiam.main --config configs/simsiam_paper.yaml ...

Re-running the same command resumes from ``<output_dir>/checkpoint.pth``."""
from common.engine.train import main
from simsiam.method import SimSiamMethod

if __name__ == "__main__":
    main(SimSiamMethod)
