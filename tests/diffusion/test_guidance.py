import pytest
import torch

from ldmkit.diffusion import classifier_free_guidance, make_schedule, sample
from ldmkit.diffusion.parameterization import PREDICTIONS, from_x0, to_v, to_x0

SCHEDULE = make_schedule("scaled_linear", zero_terminal_snr=True)


class Net:
    """x̂_0 = 0.5 x_t + cond-dependent shift, answered in `prediction` form; records batch sizes."""

    def __init__(self, prediction):
        self.prediction, self.batches = prediction, []

    def __call__(self, x, t, cond):
        self.batches.append(x.shape[0])
        context, pooled = cond["context"], cond["pooled"]
        shift = context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + pooled.view(-1, 1, 1, 1) * torch.linspace(-1, 1, 4)
        x0 = 0.5 * x + shift
        return from_x0(x0, x, SCHEDULE.alpha_bar_at(t), self.prediction)


def _inputs(batch=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([999.0, 500.0, 20.0][:batch], dtype=torch.float64)
    cond = {"context": torch.randn(batch, 5, 8, generator=g, dtype=torch.float64),
            "pooled": torch.randn(batch, 1, generator=g, dtype=torch.float64)}
    uncond = {"context": torch.zeros(1, 5, 8, dtype=torch.float64), "pooled": torch.zeros(1, 1, dtype=torch.float64)}
    return x, t, cond, uncond


def test_one_batched_forward_and_the_cfg_formula():
    x, t, cond, uncond = _inputs()
    net = Net("v")
    guided = classifier_free_guidance(net, cond, uncond, 4.0)(x, t)
    assert net.batches == [6]  # cond and uncond (broadcast from batch 1) in one forward of 2B
    c, u = net(x, t, cond), net(x, t, {k: v.expand(3, *v.shape[1:]) for k, v in uncond.items()})
    assert torch.allclose(guided, u + 4.0 * (c - u), atol=1e-12)
    net.batches.clear()
    assert torch.allclose(classifier_free_guidance(net, cond, uncond, 1.0)(x, t), c)
    assert net.batches == [3]  # scale 1 skips the unconditional pass


def test_pytrees_tuples_and_shape_errors():
    x, t, cond, uncond = _inputs()
    seen = []

    def net(x, t, c):
        seen.append(tuple(v.shape for v in c))
        return x * c[1].view(-1, 1, 1, 1)

    out = classifier_free_guidance(net, (cond["context"], cond["pooled"]), (uncond["context"], uncond["pooled"]), 2.0)(x, t)
    assert seen == [((6, 5, 8), (6, 1))] and out.shape == x.shape
    with pytest.raises(ValueError, match="same structure"):
        classifier_free_guidance(net, (cond["context"], cond["pooled"]), (uncond["context"][:, :, :4], uncond["pooled"]), 2.0)(x, t)


def test_guidance_is_the_same_in_every_parameterisation():
    # the raw-space combination equals guiding x̂_0: eps-, v- and x0-models guide identically
    x, t, cond, uncond = _inputs()
    x0s = [to_x0(classifier_free_guidance(Net(p), cond, uncond, 7.5)(x, t), x, SCHEDULE.alpha_bar_at(t), p)
           for p in ("v", "x0")]
    assert torch.allclose(x0s[0], x0s[1], atol=1e-10)
    xs, ts = x[1:], t[1:]  # eps is undefined at the zero-SNR timestep
    c1 = {k: v[1:] for k, v in cond.items()}
    eps = classifier_free_guidance(Net("eps"), c1, uncond, 7.5)(xs, ts)
    assert torch.allclose(to_x0(eps, xs, SCHEDULE.alpha_bar_at(ts), "eps"), x0s[0][1:], atol=1e-10)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_rescale_matches_lin_et_al_in_x0_space(prediction):
    x, t, cond, uncond = _inputs()
    x, t, cond = x[1:], t[1:], {k: v[1:] for k, v in cond.items()}
    ab = SCHEDULE.alpha_bar_at(t)
    net = Net(prediction)
    plain = classifier_free_guidance(net, cond, uncond, 7.5)(x, t)
    for phi in (0.0, 0.7, 1.0):
        out = classifier_free_guidance(net, cond, uncond, 7.5, rescale=phi, schedule=SCHEDULE, prediction=prediction)(x, t)
        x0_out, x0_cfg = to_x0(out, x, ab, prediction), to_x0(plain, x, ab, prediction)
        x0_pos = to_x0(net(x, t, cond), x, ab, prediction)
        # Lin et al. 2023 Alg. 2: x_final = φ · x_cfg · std(x_pos)/std(x_cfg) + (1 - φ) · x_cfg, per sample
        std = lambda z: z.std(dim=(1, 2, 3), keepdim=True)  # noqa: E731
        expected = phi * x0_cfg * std(x0_pos) / std(x0_cfg) + (1 - phi) * x0_cfg
        assert torch.allclose(x0_out, expected, atol=1e-10)
        if phi == 1.0:
            assert torch.allclose(std(x0_out), std(x0_pos), atol=1e-10)


def test_rescale_in_v_space_is_the_paper_on_v_outputs():
    x, t, cond, uncond = _inputs()
    net = Net("eps")
    x, t, cond = x[1:], t[1:], {k: v[1:] for k, v in cond.items()}
    ab = SCHEDULE.alpha_bar_at(t)
    out = classifier_free_guidance(net, cond, uncond, 5.0, rescale=0.5, schedule=SCHEDULE, prediction="eps",
                                   rescale_space="v")(x, t)
    v_cfg = to_v(classifier_free_guidance(net, cond, uncond, 5.0)(x, t), x, ab, "eps")
    v_pos = to_v(net(x, t, cond), x, ab, "eps")
    factor = v_pos.std(dim=(1, 2, 3), keepdim=True) / v_cfg.std(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(to_v(out, x, ab, "eps"), 0.5 * v_cfg * factor + 0.5 * v_cfg, atol=1e-10)


def test_sample_binds_schedule_and_prediction_for_rescale():
    x, t, cond, uncond = _inputs()
    guided = classifier_free_guidance(Net("v"), cond, uncond, 4.0, rescale=0.7)
    with pytest.raises(ValueError, match="needs the schedule"):
        guided(x, t)
    out = sample(guided, x, SCHEDULE, "dpmpp_2m", 5, prediction="v")
    bound = classifier_free_guidance(Net("v"), cond, uncond, 4.0, rescale=0.7, schedule=SCHEDULE, prediction="v")
    assert torch.allclose(out, sample(bound, x, SCHEDULE, "dpmpp_2m", 5, prediction="v"), atol=1e-12)
    assert not torch.allclose(out, sample(classifier_free_guidance(Net("v"), cond, uncond, 4.0), x, SCHEDULE,
                                          "dpmpp_2m", 5, prediction="v"), atol=1e-3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        classifier_free_guidance(Net("v"), cond, uncond, 4.0, rescale=1.5)
