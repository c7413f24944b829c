"""Caption noise for the contrastive text tower: `insert_random_tokens` and ClipModule's text_noise_* options."""

from __future__ import annotations

import pytest
import torch

from ldmkit.nn.clip import build_tokenizer, insert_random_tokens

SOT, EOT = 49406, 49407


def tokenize(captions, length=16):
    return build_tokenizer(context_length=length)(captions)


def strip(row: torch.Tensor) -> list[int]:
    ids = row.tolist()
    return ids[: ids.index(EOT) + 1]


def is_subsequence(small: list[int], big: list[int]) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


def test_every_chosen_caption_keeps_its_words_in_order_and_gains_one_to_max_tokens():
    tokens = tokenize(["a small red circle on the left", "blue square, top", "a star"])
    noisy = insert_random_tokens(tokens, 1.0, 3, 49408, EOT, torch.Generator().manual_seed(0), [SOT, 0])
    assert noisy.shape == tokens.shape and noisy.dtype == tokens.dtype
    for before, after in zip(tokens, noisy):
        old, new = strip(before), strip(after)
        assert 1 <= len(new) - len(old) <= 3
        assert new[0] == SOT and new[-1] == EOT and new.count(EOT) == 1 and new.count(SOT) == 1
        assert is_subsequence(old, new)
        assert all(t == 0 for t in after.tolist()[len(new):])  # padding after the end token stays padding
        inserted = list(new)
        for t in old:
            inserted.remove(t)
        assert inserted and all(t not in (SOT, EOT, 0) for t in inserted)


def test_deterministic_share_and_off():
    tokens = tokenize([f"a red circle number {i}" for i in range(400)], length=24)
    a = insert_random_tokens(tokens, 0.5, 2, 49408, EOT, torch.Generator().manual_seed(7), [SOT, 0])
    b = insert_random_tokens(tokens, 0.5, 2, 49408, EOT, torch.Generator().manual_seed(7), [SOT, 0])
    c = insert_random_tokens(tokens, 0.5, 2, 49408, EOT, torch.Generator().manual_seed(8), [SOT, 0])
    assert torch.equal(a, b) and not torch.equal(a, c)
    changed = (a != tokens).any(dim=1).float().mean().item()
    assert 0.4 < changed < 0.6  # ~prob of the captions (400 draws: +-0.05 at 2 sigma)
    assert insert_random_tokens(tokens, 0.0, 2, 49408, EOT, torch.Generator().manual_seed(7)) is tokens


def test_full_caption_is_left_alone_and_padding_with_end_tokens_works():
    full = tokenize(["red " * 30], length=8)  # truncated: start, 6 words, end
    assert torch.equal(insert_random_tokens(full, 1.0, 3, 49408, EOT, torch.Generator().manual_seed(0)), full)
    padded = tokenize(["a red circle"], length=10)
    padded[padded == 0] = EOT  # SD-1 style padding with the end token
    noisy = insert_random_tokens(padded, 1.0, 2, 49408, EOT, torch.Generator().manual_seed(0), [SOT])
    assert is_subsequence(strip(padded[0]), strip(noisy[0])) and len(strip(noisy[0])) > len(strip(padded[0]))


@pytest.mark.parametrize("prob, count, match", [(1.5, 3, "prob must be in"), (0.5, 0, "max_tokens must be a positive")])
def test_bad_values_are_named(prob, count, match):
    with pytest.raises(ValueError, match=match):
        insert_random_tokens(tokenize(["a"]), prob, count, 49408, EOT, torch.Generator())


def test_clip_module_noises_training_captions_only_and_the_same_step_draws_the_same_noise():
    from tests.lit.test_clip import tiny_module

    module = tiny_module(text_noise_prob=1.0, text_noise_max_tokens=2)
    tokens = module.tokenizer(["a red circle", "a blue square on the left"])
    first, again = module.noisy_tokens(tokens), module.noisy_tokens(tokens)
    assert torch.equal(first, again) and not torch.equal(first, tokens)
    calls = []
    module.net.encode_text = lambda t, normalize=True: calls.append(t) or torch.nn.functional.normalize(torch.randn(len(t), 16), dim=1)
    batch = {"caption": ["a red circle", "a blue square on the left"], "image": torch.rand(2, 3, 16, 16)}
    module.encode(batch)
    module.encode(batch, text_noise=True)
    assert torch.equal(calls[0], tokens) and torch.equal(calls[1], first)
    rebuilt = tiny_module(text_noise_prob=1.0, text_noise_max_tokens=2)  # same seed: a resumed run draws the same noise
    assert torch.equal(rebuilt.noisy_tokens(tokens), first)


@pytest.mark.parametrize("options, match", [({"text_noise_prob": -0.1}, "model.text_noise_prob"),
                                            ({"text_noise_max_tokens": 0}, "model.text_noise_max_tokens"),
                                            ({"text_noise_max_tokens": 1.5}, "model.text_noise_max_tokens")])
def test_clip_module_refuses_bad_options(options, match):
    from tests.lit.test_clip import tiny_module

    with pytest.raises(ValueError, match=match):
        tiny_module(**options)


# ---- the LDM: caption noise before the frozen text encoder ---------------------------------------------------------


@pytest.mark.parametrize("options, match", [({"text_noise_prob": 2.0}, "model.text_noise_prob"),
                                            ({"text_noise_max_tokens": 0}, "model.text_noise_max_tokens")])
def test_ldm_module_refuses_bad_text_noise_options(tiny_artifacts, options, match):
    from tests.artifacts import ldm_module

    with pytest.raises(ValueError, match=match):
        ldm_module(tiny_artifacts["autoencoder"], tiny_artifacts["clip"], **options)


def test_frozen_text_encoder_reads_noisy_tokens_as_open_clip_does(tiny_artifacts):
    from ldmkit.nn.clip import load_clip, load_text_encoder

    model, _, _ = load_clip(tiny_artifacts["clip"])
    encoder = load_text_encoder(tiny_artifacts["clip"], clip_skip=1)
    clean = encoder.tokenize(["a red circle", "an image showing one blue star"])
    noisy = insert_random_tokens(clean, 1.0, 3, encoder.vocab_size, EOT, torch.Generator().manual_seed(0), [SOT])
    for tokens in (clean, noisy):  # the pooled embedding is open_clip's own unnormalised text feature
        torch.testing.assert_close(encoder.encode_tokens(tokens)[1], model.encode_text(tokens, normalize=False), rtol=0, atol=1e-6)
    assert torch.equal(encoder(["a red circle", "an image showing one blue star"])[0], encoder.encode_tokens(clean)[0])


def test_ldm_noises_training_captions_only(tiny_artifacts):
    from tests.artifacts import ldm_module

    module = ldm_module(tiny_artifacts["autoencoder"], tiny_artifacts["clip"], text_noise_prob=1.0, text_noise_max_tokens=2)
    encoder = module.text_encoder
    seen = []
    original = encoder.encode_tokens
    encoder.encode_tokens = lambda tokens: seen.append(tokens.clone()) or original(tokens)
    captions = ["a red circle", "a blue square on the left"]
    clean = encoder.tokenize(captions)
    batch = {"caption": captions}
    plain_context, _ = module.conditioning(batch, 0.0)  # validation / sampling: the captions as written
    noisy_context, _ = module.conditioning(batch, 0.0, text_noise=True)
    again_context, _ = module.conditioning(batch, 0.0, text_noise=True)  # same step: the same noise (resumes agree)
    assert torch.equal(seen[0], clean)
    assert not torch.equal(seen[1], clean) and torch.equal(seen[1], seen[2])
    for row_clean, row_noisy in zip(clean, seen[1]):  # every caption token kept, in order, with 1..2 more
        kept, noisy = strip(row_clean), strip(row_noisy)
        assert is_subsequence(kept, noisy) and 1 <= len(noisy) - len(kept) <= 2
    assert not torch.allclose(plain_context, noisy_context) and torch.equal(noisy_context, again_context)


def test_ldm_text_noise_reencodes_a_latent_caches_captions(tiny_artifacts):
    from tests.artifacts import ldm_module

    module = ldm_module(tiny_artifacts["autoencoder"], tiny_artifacts["clip"], text_noise_prob=1.0)
    captions = ["a red circle", "a blue square"]
    cached_context, cached_pooled = module.encode_text(captions)
    batch = {"caption": captions, "context": cached_context, "pooled": cached_pooled}
    context, pooled = module.conditioning(batch, 0.0)
    assert context is cached_context and pooled is cached_pooled  # no noise: the cache's states as stored
    noisy_context, _ = module.conditioning(batch, 0.0, text_noise=True)
    assert noisy_context.shape == cached_context.shape and not torch.allclose(noisy_context, cached_context)


def test_ldm_training_step_with_text_noise_through_the_configs(compose_cfg, tiny_artifacts):
    from ldmkit.pipeline import train
    from tests.lit.test_ldm import TINY, artifacts_overrides

    cfg = compose_cfg([*TINY, *artifacts_overrides(tiny_artifacts), "model.text_noise_prob=0.5", "debug=fast_dev_run"])
    metrics, objects = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss"])) and objects["model"].text_noise.prob == 0.5
