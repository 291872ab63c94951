"""Dataset-level analysis of a FaCT model: evaluation figures (spec section 5) and concept statistics."""
