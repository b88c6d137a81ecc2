"""Pretraining: the config, the DeepSpeed engine, the loop, checkpoints, export and the objectives."""


class TrainingAborted(RuntimeError):
    """Training stopped on purpose (too many non-finite steps); the message says what to do. Exit code 3."""
