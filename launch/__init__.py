"""Launchers: run any entry point of this repository elsewhere (``launch.submitit``: SLURM via submitit)."""
