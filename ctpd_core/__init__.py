"""ctpd_core: the CTPD method as a library (alignment, log-probs, weights, losses, pipeline)."""
