"""Train DINO with the adversarial spatial transformer as its view generator
(HVS paper, Section 5.3 and Appendix E, Table 6).

    python -m stn.main --config configs/dino_stn_small.yaml [--output-dir DIR] stn.mode=affine

Re-running the same command resumes from ``<output_dir>/checkpoint.pth``."""
from common.engine.train import main
from stn.method import STNDINOMethod

if __name__ == "__main__":
    main(STNDINOMethod)
