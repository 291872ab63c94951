"""Dataset-level analysis of a FaCT model: evaluation figures (spec section 5), concept statistics, the
C²-score and concept quality, the HTML report, and the faithfulness benchmark against other attribution
methods (``faithfulness.py``, with its metrics in ``attribution_metrics.py``)."""
