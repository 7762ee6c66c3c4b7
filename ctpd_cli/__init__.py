"""ctpd_cli: the `ctpd` console entry point. Nothing imports it; each command imports what it needs."""
