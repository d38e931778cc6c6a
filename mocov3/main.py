"""Train MoCo v3 with or without Hard View Selection.

    python -m mocov3.main --config configs/mocov3_small.yaml --data-dir DATA hvs.enabled=true
    python -m mocov3.main --config configs/mocov3_vit_small.yaml --data-dir DATA
    torchrun --nproc_per_node 8 -m mocov3.main --config configs/mocov3_paper.yaml ...

Keys come from the whole global batch (gathered across ranks).
Re-running the same command resumes from ``<output_dir>/checkpoint.pth``."""
from common.engine.train import main
from mocov3.method import MoCoV3Method

if __name__ == "__main__":
    main(MoCoV3Method)
