"""Sources of the Triton python models, copied by `serve.repository` into every generated repository.

Nothing here is imported on the host: inside a repository each model's version folder holds `model.py` (one of
`preprocess.py`, `classifier.py`, `postprocess.py`), `seresnet_serving.py` (decode guards, labels, metrics),
`seresnet_contract.py` (a copy of `serve/contract.py`) and, for `preprocess`, `seresnet_eval.py` (a verbatim copy
of `train/transforms.py`, the one eval transform) with `eval_spec.json`. A repository therefore stands alone: the
python stub needs torch, torchvision, Pillow, numpy<2 and onnxruntime, never this project.
"""
