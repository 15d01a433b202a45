"""Cluster launchers: torchrun command builders (one machine, several nodes), Kubernetes job rendering from
the training config, manifest validation and monitoring-as-code. CLI: ``python -m launch --help``."""
