"""BentoML explanation service: ``/explain``, ``/explain_batch``, ``/predict``, concept cards, ``/model``, metrics.

``service.service`` declares the HTTP service; ``service.engine`` holds the model-side logic. The
library in :mod:`fact_model` is usable on its own.
"""
