"""Filling modalities from other modalities with a trained model: `polymodal predict` (MultiMAE today)."""
