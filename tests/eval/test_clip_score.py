from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ldmkit.eval.clip_score import CLIPScore, PromptAccuracy, clip_image_preprocess


@pytest.fixture(scope="module")
def tiny_open_clip():
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
    ).eval()
    tokenizer = open_clip.SimpleTokenizer(context_length=16)
    return model, tokenizer


PROMPTS = ["a red circle", "a blue square", "two green triangles", "a yellow star on grey",
           "a purple circle", "an orange square", "a cyan triangle", "a white star"]


def test_clip_score_equals_direct_open_clip_computation(tiny_open_clip):
    import open_clip

    model, tokenizer = tiny_open_clip
    pixels = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    images = pixels.float() / 127.5 - 1  # the batch convention, [-1, 1]

    metric = CLIPScore.from_open_clip(model, tokenizer, model_name="tiny-vit")
    per_pair = torch.cat([metric.update(images[:3], PROMPTS[:3]), metric.update(images[3:], PROMPTS[3:])])

    # Truth: open_clip's own eval transform on PIL images, then encode_image / encode_text.
    transform = open_clip.image_transform(32, is_train=False)
    with torch.no_grad():
        pil = [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
        img = F.normalize(model.encode_image(torch.stack([transform(im) for im in pil])), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer(PROMPTS)), dim=-1)
    cos = (img * txt).sum(-1)
    assert cos.std() > 1e-3  # pairs differ, so a mix-up of pairs would show
    expected = (100 * cos.clamp(min=0)).mean().item()

    assert metric.num_samples == 8
    assert metric.compute() == pytest.approx(expected, rel=1e-5, abs=1e-4)
    torch.testing.assert_close(per_pair, 100 * cos.clamp(min=0), rtol=1e-5, atol=1e-4)
    assert metric.model_name == "tiny-vit"


def test_preprocess_resizes_shortest_side_and_centre_crops():
    preprocess = clip_image_preprocess(16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    wide = torch.linspace(-1, 1, 64).expand(1, 3, 32, 64)  # horizontal ramp
    out = preprocess(wide)
    assert out.shape == (1, 3, 16, 16)
    # Centre crop of a ramp over [-1, 1] keeps the middle half: values within about [-0.5, 0.5].
    assert out.min() > -0.6 and out.max() < 0.6 and out[..., 0].mean() < 0 < out[..., -1].mean()
    same = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(preprocess(same), same)  # mean=std=0.5 maps [0,1] back to [-1,1]


def test_clip_score_clamps_negative_cosine_at_zero():
    image_emb = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    text_emb = torch.tensor([[1.0, 1.0], [0.0, -1.0], [1.0, 0.0]])  # cos: 0.707, -1, 0.707
    metric = CLIPScore(lambda x: image_emb[: len(x)], lambda t: text_emb[: len(t)], "fixed")
    scores = metric.update(torch.zeros(3, 3, 4, 4), ["a", "b", "c"])
    torch.testing.assert_close(scores, torch.tensor([100 / 2**0.5, 0.0, 100 / 2**0.5]))
    assert metric.compute() == pytest.approx(200 / 2**0.5 / 3)


def test_clip_score_rejects_mismatched_batch():
    metric = CLIPScore(lambda x: torch.ones(len(x), 4), lambda t: torch.ones(len(t), 4), "const")
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        metric.update(torch.zeros(2, 3, 8, 8), ["a", "b", "c"])
    with pytest.raises(ValueError, match="before any update"):
        metric.compute()


def test_prompt_accuracy_counts_colour_shape_and_both():
    targets = [
        {"objects": [{"shape": "circle", "colour": "red"}]},
        {"objects": [{"shape": "square", "colour": "blue"}, {"shape": "circle", "colour": "green"}]},
        {"objects": [{"shape": "star", "colour": "red"}]},
        {},
    ]
    predicted = [
        {"objects": [{"shape": "circle", "colour": "red"}]},  # all right
        # order-free; colours and shapes each right, but swapped between objects: "both" wrong
        {"objects": [{"shape": "circle", "colour": "blue"}, {"shape": "square", "colour": "green"}]},
        {"objects": [{"shape": "triangle", "colour": "red"}]},  # colour right only
        {"objects": [{"shape": "star", "colour": "red"}]},  # nothing asked: not counted
    ]
    calls = []

    def predictor(images):
        calls.append(len(images))
        return predicted[: len(images)]

    metric = PromptAccuracy(predictor)
    metric.update(torch.zeros(4, 3, 8, 8), targets)
    assert calls == [4]
    result = metric.compute()
    assert result == {"colour": 1.0, "shape": 0.75, "both": 0.25}
    assert PromptAccuracy().compute() is None
    with pytest.raises(ValueError, match="predictor"):
        PromptAccuracy().update(torch.zeros(1, 3, 8, 8), targets[:1])
    assert not math.isnan(result["both"])
