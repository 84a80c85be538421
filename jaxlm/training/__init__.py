"""The training job's parts: optimizer, step, checkpoints, metrics and the device peak (for MFU)."""
