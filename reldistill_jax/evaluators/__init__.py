"""Evaluators: segmentation metrics, zero-shot prediction, the structural gap."""
