"""The run: training loop, runtime, checkpoints, logs, configuration, method interface and registry."""
