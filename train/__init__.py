"""Training: configs, parallelism, the pretraining and instruction-tuning loops."""
