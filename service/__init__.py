"""BentoML explanation service (``/explain``, ``/predict``, concept cards, metrics).

Not implemented yet (issue 4); the library in :mod:`fact_model` is usable on its own.
"""
