"""Closed-form truth on the rectified-flow path: Gaussian data N(μ, diag s²) has the exact denoiser
x̂_0 = μ + s² α / (α² s² + σ²) (x_t - α μ) with α = 1 - t, σ = t, and x_1 ~ N(0, I) is exactly q(x_1), so every
sampler that supports the process must reproduce the data's mean and std as steps grow; the VP-only ones say
so. Classifier-free guidance and its rescale in flow space."""

from __future__ import annotations

import pytest
import torch

from ldmkit.diffusion import SAMPLERS, classifier_free_guidance, sample
from ldmkit.diffusion.flow import RectifiedFlow
from ldmkit.diffusion.parameterization import convert, from_x0
from ldmkit.diffusion.processes import ProcessError

MEAN = torch.tensor([1.0, -0.5, 0.0, 2.0], dtype=torch.float64)
STD = torch.tensor([0.8, 1.0, 1.5, 2.0], dtype=torch.float64)
VP_ONLY = ("ddpm", "ddim")
DETERMINISTIC = ["plms", "dpmpp_2m", "unipc", "euler", "heun", "lms"]
STOCHASTIC = ["dpmpp_2m_sde", "euler_a"]


def gaussian_flow_model(process, prediction="flow", mean=MEAN):
    def model(x, t_model):
        point = process.path(process.from_model_time(t_model.to(torch.float64)))
        a, s = point.alpha.view(-1, *[1] * (x.ndim - 1)), point.sigma.view(-1, *[1] * (x.ndim - 1))
        x0 = mean + STD**2 * a / (a * a * STD**2 + s * s) * (x - a * mean)
        return from_x0(x0, x, point, prediction)

    return model


def _white_noise(n=4096, seed=0):
    z = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (z - z.mean(0)) / z.std(0)


def _moment_errors(samples):
    mean_err = ((samples.mean(0) - MEAN).abs() / STD).max().item()
    std_err = (samples.std(0) / STD - 1).abs().max().item()
    return mean_err, std_err


@pytest.mark.parametrize("name", [n for n in SAMPLERS if n not in VP_ONLY])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_every_flow_sampler_reproduces_gaussian_moments_and_improves_with_steps(name, shift):
    process = RectifiedFlow(shift=shift)
    noise, errors = _white_noise(), {}
    for steps in (10, 25, 100):
        out = sample(gaussian_flow_model(process), noise, process, name, steps, prediction="flow",
                     generator=torch.Generator().manual_seed(1))
        errors[steps] = _moment_errors(out)
    mean_err, std_err = errors[100]
    print(f"\nMOMENTS flow shift={shift} {name} {errors}")
    # spacing "auto" gives dpmpp_2m / dpmpp_2m_sde / unipc diffusers' flow_sigmas grid, which starts at t = 1 - 1/1000
    # (shifted): x_1 is read as x_0.999, a bias of ~1e-3 of the data's mean (0.0019-0.0020 at every step count)
    start_bias = 1.0 - process.sampling_grid(steps, process.default_spacing(name))[0].t
    if name in DETERMINISTIC:
        assert mean_err < 1e-3 + 2 * start_bias and std_err < 0.025, errors
        assert errors[10][1] >= errors[25][1] >= errors[100][1], errors
    else:  # plus Monte-Carlo error of 4096 samples
        assert mean_err < 0.06 and std_err < 0.05, errors


@pytest.mark.parametrize("name,min_ratio", [("euler", 1.8), ("heun", 3.5), ("dpmpp_2m", 3.5), ("unipc", 3.5)])
def test_solvers_follow_the_exact_ode_with_their_order(name, min_ratio):
    # the PF-ODE maps the standard-normal quantile z of x_1 to x_0 = μ + s z; doubling the steps (20 -> 40 -> 80)
    # divides the error by ~2^order. (On diffusers' grid, linspace in t down to ~1e-3, the last steps are long in
    # λ, so DPM-Solver++ / UniPC only overtake Euler beyond ~20 steps; Heun and LMS do at 10.)
    process = RectifiedFlow(shift=3.0)
    z = torch.randn(256, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = MEAN + STD * z

    def err(steps):  # on the grid that starts at t = 1 (flow_sigmas starts at 0.9997: an error floor of its own)
        out = sample(gaussian_flow_model(process), z, process, name, steps, prediction="flow", spacing="trailing")
        return (out - exact).square().mean().sqrt().item()

    errors = [err(steps) for steps in (20, 40, 80)]
    assert errors[0] / errors[1] > min_ratio and errors[1] / errors[2] > min_ratio, errors


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_v_and_x0_models_sample_the_flow_process_identically(prediction):
    process = RectifiedFlow()
    noise = _white_noise(256)
    ref = sample(gaussian_flow_model(process, "flow"), noise, process, "dpmpp_2m", 12, prediction="flow")
    out = sample(gaussian_flow_model(process, prediction), noise, process, "dpmpp_2m", 12, prediction=prediction)
    assert (out - ref).abs().max() < 1e-10


@pytest.mark.parametrize("name", VP_ONLY)
def test_vp_only_samplers_say_so(name):
    with pytest.raises(ProcessError, match="variance-preserving.*'rectified_flow'.*euler"):
        sample(gaussian_flow_model(RectifiedFlow()), _white_noise(8), RectifiedFlow(), name, 4, prediction="flow")


def _conditional_model(process, prediction):
    # cond c ∈ {0, 1} shifts the data mean by 2c: the exact denoiser of each conditional Gaussian
    def model(x, t_model, cond):
        shifted = MEAN + 2 * cond.view(-1, 1)
        return gaussian_flow_model(process, prediction, shifted)(x, t_model)

    return model


@pytest.mark.parametrize("rescale", [0.0, 0.7])
def test_cfg_in_flow_space_equals_cfg_in_x0_space(rescale):
    # guidance is affine in the output, so guiding u or x̂_0 samples the same; the rescale runs in x̂_0 space
    process = RectifiedFlow(shift=3.0)
    noise = _white_noise(64)
    cond, uncond = torch.ones(64, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    outs = {}
    for prediction in ("flow", "x0"):
        guided = classifier_free_guidance(_conditional_model(process, prediction), cond, uncond, 3.0, rescale=rescale)
        outs[prediction] = sample(guided, noise, process, "euler", 10, prediction=prediction)
    assert (outs["flow"] - outs["x0"]).abs().max() < 1e-9
    plain = sample(classifier_free_guidance(_conditional_model(process, "flow"), cond, uncond, 1.0), noise, process,
                   "euler", 10, prediction="flow")
    assert (outs["flow"].mean(0) - plain.mean(0)).mean() > 1.0  # guidance pushes past the conditional mean (+2)


def test_guidance_rescale_in_flow_space_is_lin_et_al_on_the_velocity():
    process = RectifiedFlow()
    model = _conditional_model(process, "flow")
    x = torch.randn(3, 4, dtype=torch.float64)
    t_model = torch.full((3,), 600.0, dtype=torch.float64)
    cond, uncond = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    guided = classifier_free_guidance(model, cond, uncond, 5.0, rescale=0.7, rescale_space="flow", process=process,
                                      prediction="flow")(x, t_model)
    u_c, u_u = model(x, t_model, cond), model(x, t_model, uncond)
    cfg = u_u + 5.0 * (u_c - u_u)
    expected = 0.7 * cfg * u_c.std(1, keepdim=True) / cfg.std(1, keepdim=True) + 0.3 * cfg
    assert torch.allclose(guided, expected, atol=1e-12)
    # the same rescale asked in x0 space, on a flow model, differs and equals the x0-model's rescale converted
    in_x0 = classifier_free_guidance(model, cond, uncond, 5.0, rescale=0.7, process=process, prediction="flow")(x, t_model)
    x0_model = _conditional_model(process, "x0")
    ref = classifier_free_guidance(x0_model, cond, uncond, 5.0, rescale=0.7, process=process, prediction="x0")(x, t_model)
    point = process.path(process.from_model_time(t_model))
    assert torch.allclose(convert(in_x0, x, point, "flow", "x0"), ref, atol=1e-10)
    assert not torch.allclose(in_x0, guided)
