"""Model registry, SE placement, stems, heads, pretrained loading, freezing."""
import pytest
import torch
import torchvision
from torch import nn

from train.config import ModelConfig
from train.models import PretrainedError, SqueezeExcitation, create_model, load_pretrained_weights, set_backbone_trainable
from tests.conftest import require


def _count_se(model):
    return sum(isinstance(m, SqueezeExcitation) for m in model.modules())


def test_registry_and_se_placement():
    assert _count_se(create_model(ModelConfig(), 10)) == 16
    assert _count_se(create_model(ModelConfig(se_placement="layer4"), 10)) == 3
    assert _count_se(create_model(ModelConfig(name="resnet50"), 10)) == 0


def test_small_stem_and_mlp_head_shapes():
    m = create_model(ModelConfig(stem="small", stem_stride=1, head="mlp"), 7).eval()
    assert isinstance(m.maxpool, nn.Identity) and m.conv1.kernel_size == (3, 3)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert [type(x) for x in m.fc] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]


def test_torchvision_weights_load_and_identity_se_matches_resnet50(tmp_path, caplog):
    torch.manual_seed(0)
    ref = torchvision.models.resnet50(num_classes=1000).eval()
    # non-trivial BN statistics so the comparison means something
    for mod in ref.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
            mod.weight.data.uniform_(0.5, 1.5)
    path = tmp_path / "resnet50.pth"
    torch.save(ref.state_dict(), path)
    model = create_model(ModelConfig(zero_init_residual=False), 1000, load_pretrained=False)
    caplog.set_level("INFO")
    report = load_pretrained_weights(model, path)
    backbone = [k for k in ref.state_dict()]
    assert sorted(report["loaded"]) == sorted(backbone), "every torchvision key must load"
    assert report["new"] and all(".se." in k for k in report["new"])
    assert "loaded 320 tensors" in caplog.text
    for mod in model.modules():
        if hasattr(mod, "se"):
            mod.se = nn.Identity()
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)


def test_pretrained_head_mismatch_is_reported_not_fatal(tmp_path):
    ref = torchvision.models.resnet50(num_classes=1000)
    path = tmp_path / "r.pth"
    torch.save(ref.state_dict(), path)
    model = create_model(ModelConfig(pretrained=str(path)), 5)  # loads via create_model
    report = load_pretrained_weights(model, path)
    assert any(s.startswith("fc.weight") for s in report["shape_mismatch"])


def test_missing_and_wrong_pretrained_files(tmp_path):
    model = create_model(ModelConfig(), 3, load_pretrained=False)
    with pytest.raises(PretrainedError, match="does not exist"):
        load_pretrained_weights(model, tmp_path / "none.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"encoder.w": torch.zeros(3)}, bad)
    with pytest.raises(PretrainedError, match="matches no parameter"):
        load_pretrained_weights(model, bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(PretrainedError, match="could not be read safely"):
        load_pretrained_weights(model, junk)


def test_freeze_and_unfreeze():
    m = create_model(ModelConfig(), 3)
    set_backbone_trainable(m, ())
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("fc.") or ".se." in n for n in trainable)
    set_backbone_trainable(m, ("layer3", "layer4"))
    assert m.layer4[0].conv1.weight.requires_grad and not m.layer1[0].conv1.weight.requires_grad
    set_backbone_trainable(m, None)
    assert all(p.requires_grad for p in m.parameters())


def test_se_block_exports_as_plain_ops(tmp_path):
    require("onnx")
    import onnx
    se = SqueezeExcitation(64).eval()
    path = tmp_path / "se.onnx"
    torch.onnx.export(se, torch.randn(1, 64, 8, 8), path, opset_version=17, dynamo=False)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    assert ops <= {"GlobalAveragePool", "Conv", "Relu", "Sigmoid", "Mul"}, ops
