"""Evaluation: one model builder (``model``) shared by evaluation, prediction,
the explanations and the coming section pipeline; inference passes
(``inference``), the best checkpoint of a run (``best``), folder prediction
(``predict``), metrics and the report.
"""
