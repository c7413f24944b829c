"""Rectified flow against outside references: diffusers' FlowMatchEuler / FlowMatchHeun schedulers (static and
dynamic shift) driven by the same model and noise, step by step; diffusers' SD3 training utilities
(`compute_density_for_timestep_sampling`, `compute_loss_weighting_for_sd3`) under the same generator; plus the
process's own closed forms (path, shifts, grid, artifact round trip) and its clear errors."""

from __future__ import annotations

import math

import pytest
import torch

from ldmkit.diffusion import nfe, sample
from ldmkit.diffusion.flow import RectifiedFlow, dynamic_shift_mu, static_shift
from ldmkit.diffusion.weightings import loss_weight, sd3_weight
from ldmkit.diffusion.objectives import DenoisingObjective
from ldmkit.diffusion.parameterization import convert, from_x0, target, to_x0
from ldmkit.diffusion.processes import ProcessError, process_from_artifact
from ldmkit.diffusion.vp import make_schedule

from .helpers import Gaussian

diffusers = pytest.importorskip("diffusers")
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3  # noqa: E402

SHAPE = (2, 4, 8, 8)  # 4·4 = 16 tokens at patch_size 2
DATA = Gaussian(mean=torch.linspace(-1, 1, 8), std=torch.linspace(0.4, 1.2, 8))
TOL = 1e-5  # max |ours - theirs| / max |theirs|, step by step


def flow_model(process: RectifiedFlow, prediction: str = "flow", wiggle: float = 0.1):
    """`model(x_t, 1000·t)`: the exact Gaussian denoiser under x_t = (1-t) x_0 + t ε (Gaussian over the last dim),
    plus a smooth nonlinear term so that solver corrections matter, in `prediction` form."""

    def model(x, t_model):
        t = process.from_model_time(t_model.to(torch.float64))
        point = process.path(t)
        a, s = point.alpha.view(-1, 1, 1, 1), point.sigma.view(-1, 1, 1, 1)
        var = DATA.std**2
        x0 = DATA.mean + var * a / (a * a * var + s * s) * (x.to(torch.float64) - a * DATA.mean)
        x0 = x0 + wiggle * torch.sin(3 * x + t.view(-1, 1, 1, 1))
        return from_x0(x0, x.to(torch.float64), point, prediction).to(x.dtype)

    return model


def _noise(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _diffusers_trajectory(scheduler, model, noise, steps, **set_kwargs):
    scheduler.set_timesteps(steps, **set_kwargs)
    x, states = noise.clone(), []
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t.expand(x.shape[0])), t, x).prev_sample
        if getattr(scheduler, "state_in_first_order", True):  # Heun: a step is done after its corrector
            states.append(x.to(torch.float64))
    if len(states) < steps:
        states.append(x.to(torch.float64))  # Heun's last step is Euler (leaves the scheduler mid-pair)
    return states, scheduler


def _ours_trajectory(process, model, noise, sampler, steps):
    states = []
    out = sample(model, noise.clone(), process, sampler, steps, prediction="flow",
                 callback=lambda i, n, x, x0: states.append(x.clone()))
    return states, out


@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_matches_flow_match_euler_step_by_step(shift, steps):
    process = RectifiedFlow(shift=shift)
    model = flow_model(process)
    theirs, scheduler = _diffusers_trajectory(diffusers.FlowMatchEulerDiscreteScheduler(shift=shift), model, _noise(), steps)
    ours, _ = _ours_trajectory(process, model, _noise(), "euler", steps)
    grid = torch.tensor([level.t for level in process.sampling_grid(steps)])
    assert (grid - scheduler.sigmas.to(torch.float64)).abs().max() < 1e-6  # the same grid, shift and end point
    errs = [_rel(a, b) for a, b in zip(ours, theirs)]
    print(f"\nRELERR flow euler shift={shift} steps={steps} max={max(errs):.2e}")
    assert len(ours) == len(theirs) == steps and max(errs) <= TOL, errs


@pytest.mark.parametrize("height", [16, 512])
def test_euler_matches_dynamic_shift_with_mu_from_the_latent_size(height):
    process = RectifiedFlow(dynamic_shift=True)
    shape = (1, 4, height, 8)  # the Gaussian lives on the last dim (8)
    tokens = (height // 2) * 4
    # diffusers' Flux pipeline: mu = calculate_shift(image_seq_len, 256, 4096, 0.5, 1.15)
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
    assert process.for_shape(shape).mu() == pytest.approx(mu, abs=1e-12)
    assert dynamic_shift_mu(tokens) == pytest.approx(mu, abs=1e-12)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model = flow_model(process)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    theirs, scheduler = _diffusers_trajectory(scheduler, model, noise, 10, mu=mu)
    ours, _ = _ours_trajectory(process, model, noise, "euler", 10)
    errs = [_rel(a, b) for a, b in zip(ours, theirs)]
    print(f"\nRELERR flow euler dynamic tokens={tokens} mu={mu:.4f} max={max(errs):.2e}")
    assert max(errs) <= TOL, errs


@pytest.mark.parametrize("shift,steps", [(1.0, 10), (3.0, 10), (3.0, 3)])
def test_heun_matches_flow_match_heun_step_by_step(shift, steps):
    process = RectifiedFlow(shift=shift)
    model = flow_model(process)
    calls = {"ours": 0}

    def counted(x, t):
        calls["ours"] += 1
        return model(x, t)

    theirs, _ = _diffusers_trajectory(diffusers.FlowMatchHeunDiscreteScheduler(shift=shift), model, _noise(), steps)
    ours, _ = _ours_trajectory(process, counted, _noise(), "heun", steps)
    errs = [_rel(a, b) for a, b in zip(ours, theirs)]
    print(f"\nRELERR flow heun shift={shift} steps={steps} max={max(errs):.2e}")
    assert len(ours) == steps and max(errs) <= TOL, errs
    assert calls["ours"] == 2 * steps - 1 == nfe("heun", steps, from_zero_snr=True, process=process)


def test_path_model_time_and_shift_closed_forms():
    process = RectifiedFlow(shift=3.0)
    t = torch.tensor([0.0, 0.25, 0.5, 1.0])
    point = process.path(t)
    assert torch.equal(point.alpha, 1 - t.double()) and torch.equal(point.sigma, t.double())
    assert torch.equal(process.model_time(t), 1000 * t)
    assert torch.allclose(process.from_model_time(process.model_time(t)), t)
    shifted = static_shift(t.double(), 3.0)
    assert torch.allclose(shifted, 3 * t.double() / (1 + 2 * t.double()))
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:-1] > t[1:-1]).all()  # shift > 1 is noisier
    # Flux's exponential shift is the static one with s = e^μ
    mu = 0.8
    flux = math.exp(mu) / (math.exp(mu) + (1 / t[1:].double() - 1))
    assert torch.allclose(RectifiedFlow(dynamic_shift=True, image_seq_len=1).apply_shift(t[1:].double(), 1), static_shift(
        t[1:].double(), math.exp(dynamic_shift_mu(1))))
    assert torch.allclose(static_shift(t[1:].double(), math.exp(mu)), flux)


@pytest.mark.parametrize("method,kwargs", [("uniform", {}), ("logit_normal", {"logit_mean": 0.3, "logit_std": 1.2}),
                                           ("mode", {"mode_scale": 1.29})])
def test_timestep_densities_match_diffusers_under_the_same_generator(method, kwargs):
    ours_kwargs = {"mean": kwargs.get("logit_mean", 0.0), "std": kwargs.get("logit_std", 1.0),
                   "mode_scale": kwargs.get("mode_scale", 1.29)}
    ours = RectifiedFlow().sample_time(4096, method=method, generator=torch.Generator().manual_seed(3), **ours_kwargs)
    theirs = compute_density_for_timestep_sampling(method if method != "uniform" else "none", 4096,
                                                   generator=torch.Generator().manual_seed(3), **kwargs)
    print(f"\nABSERR density {method} {(ours - theirs).abs().max().item():.2e}")
    assert (ours - theirs.clamp(min=1e-5)).abs().max() <= 1e-6
    # with a shift, the same draws go through the shift (diffusers' SD3 script reads shifted scheduler sigmas)
    shifted = RectifiedFlow(shift=3.0).sample_time(4096, method=method, generator=torch.Generator().manual_seed(3),
                                                   **ours_kwargs)
    assert torch.allclose(shifted, static_shift(ours, 3.0).clamp(min=1e-5), atol=1e-6)
    unshifted = RectifiedFlow(shift=3.0, train_shift=False).sample_time(
        4096, method=method, generator=torch.Generator().manual_seed(3), **ours_kwargs)
    assert torch.equal(unshifted, ours)


@pytest.mark.parametrize("scheme", ["sigma_sqrt", "cosmap", "none"])
def test_sd3_weightings_match_diffusers_and_mean_one_objective_across_predictions(scheme):
    sigmas = torch.linspace(0.01, 1.0, 100, dtype=torch.float64)
    theirs = compute_loss_weighting_for_sd3(scheme, sigmas).double()
    assert torch.allclose(sd3_weight(scheme, sigmas), theirs, rtol=1e-6)  # diffusers returns sigma_sqrt in float32
    if scheme == "none":
        return
    # as our x0-space weighting on the flow path: SNR = ((1-t)/t)², converted back to t exactly
    snr = ((1 - sigmas) / sigmas) ** 2
    assert torch.allclose(loss_weight(scheme, snr, "x0"), theirs, rtol=1e-6)
    # diffusers' SD3 loss (precondition_outputs: x0-space error times the weight) equals ours for every prediction
    process = RectifiedFlow()
    x0, noise = torch.randn(6, 3, 4, 4, dtype=torch.float64), torch.randn(6, 3, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.02, 0.1, 0.3, 0.5, 0.8, 1.0], dtype=torch.float64)
    point = process.path(t)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    x0_hat = x0 + 0.1 * torch.randn_like(x0)
    reference = compute_loss_weighting_for_sd3(scheme, t).double() * (x0_hat - x0).square().flatten(1).mean(1)
    for prediction in ("flow", "v", "x0"):
        objective = DenoisingObjective(process, prediction=prediction, weighting=scheme)
        pred = convert(x0_hat, x_t, point, "x0", prediction)
        ours = objective.weight(t, point) * (pred - target(prediction, x0, noise, point)).square().flatten(1).mean(1)
        assert torch.allclose(ours, reference, rtol=1e-9), prediction


def test_sigma_sqrt_with_flow_prediction_is_plain_flow_matching():
    t = torch.tensor([0.01, 0.4, 0.99], dtype=torch.float64)
    objective = DenoisingObjective(RectifiedFlow(), prediction="flow", weighting="sigma_sqrt")
    assert torch.allclose(objective.weight(t, objective.process.path(t)), torch.ones(3, dtype=torch.float64))


def test_objective_trains_flow_target_u_equals_eps_minus_x0():
    seen = {}

    def model(x_t, t_model, cond):
        seen["x_t"], seen["t"] = x_t, t_model
        return torch.zeros_like(x_t)

    objective = DenoisingObjective(RectifiedFlow(), prediction="flow", timestep_sampling="logit_normal")
    x0 = torch.randn(3, 2, 4, 4)
    loss = objective(model, x0, None, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    t = torch.sigmoid(torch.randn(3, generator=gen))
    noise = torch.randn(x0.shape, generator=gen)
    assert torch.allclose(seen["t"], 1000 * t)  # the network sees 1000·t
    assert torch.allclose(seen["x_t"], (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise, atol=1e-6)
    assert torch.allclose(loss, (noise - x0).square().flatten(1).mean(1), rtol=1e-5)


def test_dynamic_shift_reads_the_latent_size_in_training_and_sampling():
    process = RectifiedFlow(dynamic_shift=True)
    small, large = process.for_shape((1, 4, 16, 16)), process.for_shape((1, 4, 128, 128))
    assert (small.image_seq_len, large.image_seq_len) == (64, 4096)
    assert large.mu() == pytest.approx(1.15) and small.mu() < large.mu()
    t_small = small.sampling_grid(10)[5].t
    assert t_small < large.sampling_grid(10)[5].t  # larger images are sampled noisier
    with pytest.raises(ProcessError, match="token count"):
        process.sampling_grid(4)


def test_artifact_round_trip_and_registry():
    process = RectifiedFlow(shift=3.0, patch_size=1, train_shift=False)
    config, tensors = process.to_artifact()
    assert config["kind"] == "rectified_flow" and tensors == {}
    rebuilt = process_from_artifact({**config, "prediction": "flow"}, tensors)
    assert rebuilt == process


def test_clear_errors_for_pairs_that_cannot_work():
    with pytest.raises(ValueError, match="velocity dx_t/dt.*rectified_flow"):
        DenoisingObjective(make_schedule("scaled_linear"), prediction="flow")
    with pytest.raises(ValueError, match="eps.*t = 1"):
        DenoisingObjective(RectifiedFlow(), prediction="eps")
    with pytest.raises(ValueError, match="either shift"):
        RectifiedFlow(shift=3.0, dynamic_shift=True)
    with pytest.raises(ProcessError, match="no spacing 'leading'"):  # karras & co. are supported: test_flow_grids.py
        RectifiedFlow().sampling_grid(4, "leading")
    with pytest.raises(ProcessError, match=r"steps_offset"):
        RectifiedFlow().sampling_grid(4, steps_offset=1)
    with pytest.raises(ValueError, match="eps.*pure noise"):
        sample(lambda x, t: x, torch.randn(1, 2, 4, 4), RectifiedFlow(), "euler", 4, prediction="eps")
    for name in ("ddim", "ddpm"):
        with pytest.raises(ProcessError, match="variance-preserving.*rectified_flow"):
            sample(lambda x, t: x, torch.randn(1, 2, 4, 4), RectifiedFlow(), name, 4, prediction="flow")


@pytest.mark.parametrize("prediction", ["flow", "v", "x0"])
def test_validation_x0_mse_is_the_same_number_for_every_prediction(prediction):
    # one exact denoiser expressed in each parameterisation: val/x0_mse must not depend on the choice
    process = RectifiedFlow(shift=3.0)
    model = flow_model(process, prediction, wiggle=0.0)
    x0 = torch.randn(8, 8, 4, 8, dtype=torch.float64) * DATA.std + DATA.mean
    objective = DenoisingObjective(process, prediction=prediction)
    t, _, x0_mse = objective.validation_losses(lambda x, tm, c: model(x, tm), x0, None, torch.Generator().manual_seed(4))
    reference = DenoisingObjective(process, prediction="x0")
    t_ref, _, x0_ref = reference.validation_losses(lambda x, tm, c: flow_model(process, "x0", 0.0)(x, tm), x0, None,
                                                   torch.Generator().manual_seed(4))
    assert torch.equal(t, t_ref) and torch.allclose(x0_mse, x0_ref, rtol=1e-5)  # the model output is cast to float32
    assert torch.equal(t, RectifiedFlow().validation_time(8, generator=torch.Generator().manual_seed(4)))  # unshifted
    x_t = torch.zeros(1, 8, 4, 8, dtype=torch.float64)
    assert to_x0(model(x_t, torch.tensor([1000.0])), x_t, process.path(torch.tensor([1.0])), prediction).isfinite().all()


def test_objective_with_dynamic_shift_draws_noisier_times_for_larger_latents():
    seen = []
    objective = DenoisingObjective(RectifiedFlow(dynamic_shift=True), prediction="flow")
    for size in (8, 128):
        objective(lambda x, t, c: seen.append(t) or torch.zeros_like(x), torch.zeros(64, 1, size, size), None,
                  torch.Generator().manual_seed(0))
    small, large = seen
    mu_small, mu_large = dynamic_shift_mu(16), dynamic_shift_mu(4096)
    u = torch.rand(64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(small, 1000 * static_shift(u, math.exp(mu_small)).clamp(min=1e-5))
    assert torch.allclose(large, 1000 * static_shift(u, math.exp(mu_large)).clamp(min=1e-5))


def test_val_x0_mse_is_comparable_across_processes():
    # the exact denoiser's x0 error depends on the noise level only through the SNR; every process validates at
    # the SNRs of uniform flow time from the same generator, so VP (zero terminal SNR) and flow agree per sample
    def exact(process):
        def model(x, t_model, cond):
            point = process.path(process.from_model_time(t_model.to(torch.float64)))
            a, s = point.alpha.view(-1, 1, 1, 1), point.sigma.view(-1, 1, 1, 1)
            var = DATA.std**2
            x0 = DATA.mean + var * a / (a * a * var + s * s) * (x.to(torch.float64) - a * DATA.mean)
            return from_x0(x0, x.to(torch.float64), point, "v")
        return model

    x0 = torch.randn(256, 2, 2, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * DATA.std + DATA.mean
    results = {}
    for name, process in (("flow", RectifiedFlow(shift=3.0)), ("zsnr", make_schedule("scaled_linear", zero_terminal_snr=True)),
                          ("sd", make_schedule("scaled_linear"))):
        objective = DenoisingObjective(process, prediction="v")
        results[name] = objective.validation_losses(exact(process), x0, None, torch.Generator().manual_seed(6))[2]
    # levels outside a VP schedule's range are clipped to its ends: t = 0 (σ̃ = 0.029 for scaled_linear) and,
    # without zero terminal SNR, t = T-1
    u = torch.rand(256, generator=torch.Generator().manual_seed(6)).double()
    sd = make_schedule("scaled_linear")
    inside = u > sd.sigma_min / (1 + sd.sigma_min)
    assert torch.allclose(results["zsnr"][inside], results["flow"][inside], rtol=1e-3, atol=1e-6)
    assert (~inside).sum() < 10
    clipped = u > 1 / (1 + sd.snr[-1].sqrt())
    both = inside & ~clipped
    assert torch.allclose(results["sd"][both], results["flow"][both], rtol=1e-3, atol=1e-6)
    gap = (results["sd"][clipped].mean() / results["flow"][clipped].mean() - 1).abs()
    assert clipped.any() and gap < 0.05  # SNR 0.0047 instead of ~0: nearly the same x0 error
