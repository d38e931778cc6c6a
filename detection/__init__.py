"""Object-detection transfer with Detectron2 (paper Tables 3, 7 and 13)."""
