"""Model registry: SE-ResNet50 (TensorRT-friendly SE blocks) and ResNet-50, stems, heads, pretrained loading, freezing."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from train.checkpoint import loader_refusal
from train.config import ModelConfig

log = logging.getLogger(__name__)


class SqueezeExcitation(nn.Module):
    """Channel attention as global average pool + two 1x1 convs: exports to ONNX/TensorRT as plain conv ops."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(8, channels // reduction)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))


class SEBottleneck(Bottleneck):
    """torchvision's Bottleneck (same parameter names) with SE applied to the residual branch before the add."""

    se_reduction = 16

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.se: nn.Module = SqueezeExcitation(self.conv3.out_channels, self.se_reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.se(self.bn3(self.conv3(out)))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


def _make_head(kind: str, num_classes: int) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(2048, 512), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(512, num_classes))
    return nn.Linear(2048, num_classes)


def _apply_small_stem(model: ResNet, stride: int) -> None:
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=stride, padding=1, bias=False)
    model.maxpool = nn.Identity()
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")


def _zero_init_last_bn(model: ResNet) -> None:
    for m in model.modules():
        if isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)


def se_resnet50(cfg: ModelConfig, num_classes: int) -> ResNet:
    block = type("SEBottleneck", (SEBottleneck,), {"se_reduction": cfg.se_reduction})
    model = ResNet(block, [3, 4, 6, 3], num_classes=num_classes)
    if cfg.se_placement == "layer4":
        for layer in (model.layer1, model.layer2, model.layer3):
            for b in layer:
                b.se = nn.Identity()
    return model


def resnet50(cfg: ModelConfig, num_classes: int) -> ResNet:
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes)


MODELS: dict[str, Callable[[ModelConfig, int], ResNet]] = {"se_resnet50": se_resnet50, "resnet50": resnet50}


def create_model(cfg: ModelConfig, num_classes: int, load_pretrained: bool = True) -> ResNet:
    """Build the configured model; optionally initialise it from ``cfg.pretrained`` (a local file)."""
    if cfg.name not in MODELS:
        raise ValueError(f"Unknown model '{cfg.name}'; choose one of {sorted(MODELS)}.")
    model = MODELS[cfg.name](cfg, num_classes)
    if cfg.stem == "small":
        _apply_small_stem(model, cfg.stem_stride)
    model.fc = _make_head(cfg.head, num_classes)
    if cfg.zero_init_residual:
        _zero_init_last_bn(model)
    if load_pretrained and cfg.pretrained:
        load_pretrained_weights(model, cfg.pretrained)
    return model


class PretrainedError(RuntimeError):
    pass


def _extract_state_dict(obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # one of our checkpoints
    elif isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PretrainedError("holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_pretrained_weights(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Load a torchvision ResNet-50 state dict or our checkpoint by explicit key match; print what loaded."""
    p = Path(path)
    if not p.is_file():
        raise PretrainedError(f"Pretrained weights file '{p}' does not exist; set model.pretrained to a local .pth file or null.")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
        source = _extract_state_dict(obj)
    except PretrainedError as err:
        raise PretrainedError(f"Pretrained weights file '{p}' {err}; expected a torchvision ResNet-50 state dict or a seresnet-stack checkpoint.") from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure is the same user error
        raise PretrainedError(f"Pretrained weights file '{p}' could not be read safely ({loader_refusal(err)}); "
                              f"expected a torchvision ResNet-50 state dict of tensors.") from None
    target = model.state_dict()
    loaded, shape_mismatch = {}, []
    for key, tensor in source.items():
        if key in target:
            if target[key].shape == tensor.shape:
                loaded[key] = tensor
            else:
                shape_mismatch.append(f"{key} {tuple(tensor.shape)} -> {tuple(target[key].shape)}")
    if not loaded:
        raise PretrainedError(f"Pretrained weights file '{p}' matches no parameter of model '{type(model).__name__}'; is it a ResNet-50?")
    model.load_state_dict(loaded, strict=False)
    missing = [k for k in target if k not in loaded]
    unused = [k for k in source if k not in target]
    report = {"loaded": sorted(loaded), "new": missing, "shape_mismatch": shape_mismatch, "unused": unused}
    groups = sorted({k.split(".")[0] + ("/se" if ".se." in k else "") for k in missing})
    log.info("pretrained %s: loaded %d tensors; new (not in file) %d [%s]; shape mismatch %d %s; unused %d %s",
             p, len(loaded), len(missing), ", ".join(groups), len(shape_mismatch), shape_mismatch[:4], len(unused), unused[:4])
    return report


BACKBONE_STAGES = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")


def set_backbone_trainable(model: nn.Module, trainable_stages: tuple[str, ...] | None) -> None:
    """Freeze the backbone except ``trainable_stages`` (None = unfreeze all). Head and SE blocks always train."""
    for name, param in model.named_parameters():
        stage = name.split(".")[0]
        if trainable_stages is None or stage not in BACKBONE_STAGES or ".se." in name:
            param.requires_grad = True
        else:
            param.requires_grad = stage in trainable_stages
