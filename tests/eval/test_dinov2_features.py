"""DINOv2 features: Meta's checkpoint format read through our key map agrees with timm (an
independent reader of that format); preprocessing agrees with dgm-eval's PIL transform; missing
weights say where to get them. Networks are tiny and random, written to tmp_path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldmkit.eval.distribution import frechet_feature_distance
from ldmkit.eval.features.common import FeatureMismatchError, FeatureSet
from ldmkit.eval.features.dinov2 import (DINOV2_ENV, DINOv2FeatureExtractor, DINOv2WeightsNotFoundError,
                                         UnofficialDINOv2WeightsWarning, load_dinov2)


def timm_dinov2(img_size: int = 56, seed: int = 0):
    """A tiny ViT/14 with LayerScale, in timm: its state dict has Meta's DINOv2 key names."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    model = VisionTransformer(img_size=img_size, patch_size=14, embed_dim=64, depth=2, num_heads=1, mlp_ratio=4,
                              init_values=0.5, num_classes=0, global_pool="token")
    with torch.no_grad():  # timm zero-inits biases and ones the norms: make every tensor matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def official_checkpoint(path, img_size: int = 56, seed: int = 0):
    model = timm_dinov2(img_size, seed)
    state = dict(model.state_dict(), mask_token=torch.zeros(1, 64))  # Meta's files carry the iBOT mask token
    torch.save(state, path)
    return model


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, patch_size=14,
                                     image_size=518, layerscale_value=0.5)).eval()
    folder = tmp_path_factory.mktemp("dinov2-hf")
    model.save_pretrained(folder)
    return folder


def test_official_checkpoint_through_key_map_equals_timm(tmp_path):
    path = tmp_path / "dinov2_vitl14_pretrain.pth"
    timm_model = official_checkpoint(path)
    model, digest = load_dinov2(path)
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        ours = model(pixel_values=x).pooler_output
        ref = timm_model.forward_features(x)[:, 0]  # CLS after the final norm
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert len(digest) == 16


def test_position_embeddings_interpolate_as_facebookresearch_dinov2(hf_folder):
    model, _ = load_dinov2(hf_folder)
    emb = model.embeddings
    pos = emb.position_embeddings  # (1, 1 + 37 * 37, D)
    got = emb.interpolate_pos_encoding(torch.zeros(1, 1 + 16 * 16, 32), 224, 224)
    # dinov2/models/vision_transformer.py interpolate_pos_encoding, transcribed:
    w0 = h0 = 224 // 14 + 0.1
    n = math.isqrt(pos.shape[1] - 1)
    ref = F.interpolate(pos[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2), mode="bicubic",
                        scale_factor=(w0 / n, h0 / n)).permute(0, 2, 3, 1).reshape(1, -1, 32)
    torch.testing.assert_close(got, torch.cat([pos[:, :1], ref], dim=1))
    size_based = F.interpolate(pos[:, 1:].reshape(1, n, n, -1).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic")
    assert not torch.allclose(got[:, 1:], size_based.permute(0, 2, 3, 1).reshape(1, -1, 32))  # transformers' own


def test_preprocessing_matches_dgm_eval_pil_transform():
    import torchvision.transforms as TF
    from PIL import Image

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 40, 56, 3), dtype=np.uint8)
    # dgm-eval models/dinov2.py transform: Resize((224, 224), BICUBIC) on the PIL image, ToTensor, Normalize.
    reference = TF.Compose([TF.Resize((224, 224), TF.InterpolationMode.BICUBIC), TF.ToTensor(),
                            TF.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    ref = torch.stack([reference(Image.fromarray(im)) for im in images])
    ours = DINOv2FeatureExtractor.preprocess(torch.from_numpy(images).permute(0, 3, 1, 2))
    diff = (ours - ref).abs() * 0.224  # back to [0, 1] units (about)
    assert diff.max() <= 2.5 / 255 and diff.mean() < 0.05 / 255  # PIL rounding: a few pixels off by 1-2 levels


def test_extractor_features_and_fd_on_image_sets(hf_folder):
    from transformers import Dinov2Model

    extractor = DINOv2FeatureExtractor(hf_folder)
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    features = extractor(images)
    assert features.shape == (6, 32) and extractor.dim == 32
    plain = Dinov2Model.from_pretrained(hf_folder).eval()  # CLS after the final LayerNorm, via the preprocessing
    with torch.no_grad():
        hidden = plain(pixel_values=extractor.preprocess(images)).last_hidden_state[:, 0]
    assert features.sub(hidden).abs().max() < 0.05  # only the pos-embed interpolation differs
    generated, reference = FeatureSet.of(extractor), FeatureSet.of(extractor)
    generated.update(images[:3]), generated.update(images[3:])
    reference.update(torch.flip(images, dims=[-1]))
    assert generated.identity["preprocessing"]["resize"].startswith("224x224 bicubic")
    fd = frechet_feature_distance(reference, generated)
    expected_set = FeatureSet(extractor.identity)
    expected_set.update_features(features, (32, 32))
    assert fd == pytest.approx(frechet_feature_distance(reference, expected_set), rel=1e-6) and fd > 0


def test_features_from_other_weights_are_refused(tmp_path, hf_folder):
    official_checkpoint(tmp_path / "other.pth", seed=1)
    a = DINOv2FeatureExtractor(hf_folder)
    with pytest.warns(UnofficialDINOv2WeightsWarning):  # not Meta's file (tests/eval/test_dinov2_weights.py)
        b = DINOv2FeatureExtractor(tmp_path / "other.pth")
    set_a, set_b = FeatureSet.of(a), FeatureSet.of(b)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    set_a.update(images), set_b.update(images)
    with pytest.raises(FeatureMismatchError, match="weights"):
        frechet_feature_distance(set_a, set_b)


def test_missing_weights_say_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv(DINOV2_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(DINOv2WeightsNotFoundError, match=r"(?s)Looked in:.*nope.pth \(does not exist\).*"
                       r"dinov2_vitl14_pretrain.pth.*LDMKIT_DINOV2_WEIGHTS"):
        DINOv2FeatureExtractor(tmp_path / "nope.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DINOv2WeightsNotFoundError, match=r"no model.safetensors"):
        DINOv2FeatureExtractor(tmp_path / "empty")
