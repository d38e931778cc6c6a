"""Train iBOT with or without Hard View Selection.

    python -m ibot.main --config configs/ibot_small.yaml --data-dir DATA hvs.enabled=true
    torchrun --nproc_per_node 8 -m ibot.main --config configs/ibot_paper.yaml ...

Re-running the same command resumes from ``<output_dir>/checkpoint.pth``."""
from common.engine.train import main
from ibot.method import IBOTMethod

if __name__ == "__main__":
    main(IBOTMethod)
