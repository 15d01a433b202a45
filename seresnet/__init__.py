"""seresnet-stack's one command, ``seresnet`` (``seresnet/cli.py``): train, evaluate, preflight, serve and launch."""
