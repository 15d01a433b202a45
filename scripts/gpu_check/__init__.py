"""The GPU self-check behind scripts/gpu_check.sh: a runner (``python -m scripts.gpu_check``) that runs each step in
its own process under its own timeout and rewrites <out>/gpu_check.json after every step, and the steps themselves
(``python -m scripts.gpu_check.step NAME``), one module per subject. Step and figure names: docs/cluster.md, section 9."""
