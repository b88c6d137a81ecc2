"""Downstream evaluation: retrieval today; zero-shot, linear probe and kNN with the evaluation work."""
