"""Classifier Lab engine: datasets, model zoo, memory calculator, trainer, metrics, prediction.

Nothing in this package imports Gradio; the dashboard in ``ui/`` only drives it.
"""
