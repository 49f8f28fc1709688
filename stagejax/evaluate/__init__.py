"""Evaluation: inference passes (``inference``), the best epoch of a run exported
and evaluated (``best``), folder prediction (``predict``), metrics and the report.

The model they run is `stagejax.model`'s; nothing here imports training.
"""
