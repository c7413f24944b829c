"""Rectified flow's non-linspace sampling grids (spacing=karras / exponential / beta) against diffusers'
FlowMatchEulerDiscreteScheduler with use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas (static and
dynamic shift), step by step with the same model and noise; Gaussian truth on those grids; and the clear errors
for spacings and options that are not defined on the flow path."""

from __future__ import annotations

import pytest
import torch

from ldmkit.diffusion import sample
from ldmkit.diffusion.flow import FLOW_SPACINGS, RectifiedFlow
from ldmkit.diffusion.processes import ProcessError

from ldmkit.diffusion.flow import static_shift

from .test_flow import TOL, _diffusers_trajectory, _noise, _rel, flow_model
from .test_flow_samplers import MEAN, STD, _moment_errors, _white_noise, gaussian_flow_model

diffusers = pytest.importorskip("diffusers")

FLAGS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas", "beta": "use_beta_sigmas"}


def _ours_trajectory(process, model, noise, sampler, steps, spacing):
    states = []
    sample(model, noise.clone(), process, sampler, steps, prediction="flow", spacing=spacing,
           callback=lambda i, n, x, x0: states.append(x.clone()))
    return states, None


def _grid(process, steps, spacing, **options):
    return torch.tensor([level.t for level in process.sampling_grid(steps, spacing, **options)], dtype=torch.float64)


@pytest.mark.parametrize("spacing", list(FLAGS))
@pytest.mark.parametrize("shift,steps", [(1.0, 10), (3.0, 10), (3.0, 28), (3.0, 1)])
def test_grid_and_euler_match_diffusers_sigma_spacings(spacing, shift, steps):
    process = RectifiedFlow(shift=shift)
    model = flow_model(process)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift, **{FLAGS[spacing]: True})
    theirs, scheduler = _diffusers_trajectory(scheduler, model, _noise(), steps)
    grid = _grid(process, steps, spacing)
    assert (grid - scheduler.sigmas.to(torch.float64)).abs().max() < 1e-6
    assert (grid[1:] < grid[:-1]).all() and grid[0] == pytest.approx(1.0) and grid[-1] == 0
    ours, _ = _ours_trajectory(process, model, _noise(), "euler", steps, spacing=spacing)
    errs = [_rel(a, b) for a, b in zip(ours, theirs)]
    assert len(ours) == len(theirs) == steps and max(errs) <= TOL, errs


@pytest.mark.parametrize("spacing", list(FLAGS))
def test_sigma_spacings_follow_the_dynamic_shift_end_points_as_diffusers(spacing):
    process = RectifiedFlow(dynamic_shift=True)
    shape = (1, 4, 64, 8)
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift((64 // 2) * (8 // 2), 256, 4096, 0.5, 1.15)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, **{FLAGS[spacing]: True})
    scheduler.set_timesteps(12, mu=mu)
    grid = _grid(process.for_shape(shape), 12, spacing)
    assert (grid - scheduler.sigmas.to(torch.float64)).abs().max() < 1e-6


def test_shift_moves_only_the_end_points_of_sigma_spacings():
    # diffusers applies the karras formula to the shifted grid's end points: shift=3 changes sigma_min only (its
    # last linspace point 1/1000 is shifted twice, as in diffusers: once as sigma_min, once with the grid)
    plain, shifted = _grid(RectifiedFlow(), 8, "karras"), _grid(RectifiedFlow(shift=3.0), 8, "karras")
    assert plain[0] == shifted[0] == 1.0 and plain[-2] == pytest.approx(1e-3)
    assert shifted[-2] == pytest.approx(static_shift(static_shift(1e-3, 3.0), 3.0))
    explicit = _grid(RectifiedFlow(shift=3.0), 8, "karras", sigma_min=0.01, sigma_max=0.9, rho=3.0)
    assert explicit[0] == pytest.approx(0.9) and explicit[-2] == pytest.approx(0.01)
    assert not torch.allclose(explicit, _grid(RectifiedFlow(shift=3.0), 8, "karras", sigma_min=0.01, sigma_max=0.9))
    log_t = _grid(RectifiedFlow(), 6, "exponential")[:-1].log()
    assert torch.allclose(log_t.diff(), log_t.diff()[0].expand(5))  # uniform in log t


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "unipc", "lms"])
@pytest.mark.parametrize("spacing", ["karras", "exponential", "beta"])
def test_gaussian_moments_on_sigma_spaced_flow_grids(name, spacing):
    # sigma_max = 1 (the first level is pure noise): x_1 ~ N(0, I) is exactly q(x_1), so the moments must come out as
    # steps grow (karras / exponential in t leave long first steps: Euler needs ~400 for 1%; measured 25/100/400
    # steps: euler karras 14% / 3.7% / 0.9%, heun 0.4% / 0.02% / 0%)
    process = RectifiedFlow(shift=3.0)
    errors = {}
    for steps in (25, 400):
        out = sample(gaussian_flow_model(process), _white_noise(), process, name, steps, prediction="flow",
                     spacing=spacing)
        errors[steps] = _moment_errors(out)
    assert errors[400][0] < 1e-3 and errors[400][1] < 0.015 and errors[400][1] < errors[25][1], (errors, MEAN, STD)


def test_unsupported_grids_and_options_say_what_to_use_instead():
    process = RectifiedFlow()
    with pytest.raises(ProcessError, match="no spacing 'leading'.*trailing, linspace, flow_sigmas, karras, exponential, beta"):
        process.sampling_grid(10, "leading")
    with pytest.raises(ProcessError, match=r"sigma_min / sigma_max / rho apply to spacing karras.*spacing='trailing'"):
        process.sampling_grid(10, "trailing", sigma_min=0.01)
    with pytest.raises(ProcessError, match=r"0 < sigma_min < sigma_max <= 1.*got 0.001 and 14.6"):
        process.sampling_grid(10, "karras", sigma_max=14.6)  # a VP-style k-sigma: not a time on the flow path
    with pytest.raises(ProcessError, match="rho shapes the karras spacing only"):
        process.sampling_grid(10, "beta", rho=3.0)
    with pytest.raises(ProcessError, match=r"no option\(s\) \['steps_offset'\].*discrete VP"):
        process.sampling_grid(10, "trailing", steps_offset=1)
    with pytest.raises(ProcessError, match="no spacing 'leading'"):  # through the public entry too
        sample(gaussian_flow_model(process), _white_noise(8), process, "euler", 4, prediction="flow", spacing="leading")
    assert set(FLOW_SPACINGS) == {"trailing", "linspace", "flow_sigmas", "karras", "exponential", "beta"}


# diffusers' DPM-Solver++ on flow models (use_flow_sigmas=True): its grid is `spacing="flow_sigmas"`. (diffusers'
# UniPCMultistepScheduler builds another grid under the same flag, linspace(1, 1/1000, N + 1)[:-1]: not compared.)
@pytest.mark.parametrize("shift,steps", [(1.0, 4), (1.0, 10), (3.0, 8), (3.0, 20)])
def test_dpmpp_2m_matches_diffusers_dpm_solver_with_flow_sigmas(shift, steps):
    process = RectifiedFlow(shift=shift)
    model = flow_model(process)
    scheduler = diffusers.DPMSolverMultistepScheduler(
        use_flow_sigmas=True, flow_shift=shift, prediction_type="flow_prediction", algorithm_type="dpmsolver++",
        solver_order=2, solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero")
    scheduler.set_timesteps(steps)
    x, theirs = _noise(), []
    for i, t in enumerate(scheduler.timesteps):
        # diffusers hands the network int(1000 σ) (749 for σ = 0.7492); the solver's σ is what both must share
        t_model = (scheduler.sigmas[i].to(torch.float64) * 1000).expand(x.shape[0])
        x = scheduler.step(model(x, t_model), t, x).prev_sample.to(torch.float64)
        theirs.append(x)
    grid = _grid(process, steps, "flow_sigmas")
    assert (grid - scheduler.sigmas.to(torch.float64)).abs().max() < 1e-6
    assert grid[0] == pytest.approx(static_shift(1 - 1e-3, shift)) and grid[-1] == 0
    ours, _ = _ours_trajectory(process, model, _noise(), "dpmpp_2m", steps, spacing="flow_sigmas")
    errs = [_rel(a, b) for a, b in zip(ours, theirs)]
    assert len(ours) == len(theirs) == steps and max(errs) <= TOL, errs


def test_flow_sigmas_follow_the_dynamic_shift_as_diffusers():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    shape = (1, 4, 64, 8)
    mu = calculate_shift((64 // 2) * (8 // 2), 256, 4096, 0.5, 1.15)
    scheduler = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, use_dynamic_shifting=True,
                                                      prediction_type="flow_prediction")
    scheduler.set_timesteps(12, mu=mu)
    grid = _grid(RectifiedFlow(dynamic_shift=True).for_shape(shape), 12, "flow_sigmas")
    assert (grid - scheduler.sigmas.to(torch.float64)).abs().max() < 1e-6


def test_the_euler_grid_makes_dpmpp_2m_extrapolate_its_last_step_and_flow_sigmas_does_not():
    # the Euler grid's stop at t = 1/1000 makes the last real step long in λ: DPM-Solver++(2M)'s correction
    # (h / 2h_prev)(x0 - x0_prev) then extrapolates 2.2x at 4 steps; on flow_sigmas the steps are even in t
    def last_ratio(spacing):
        grid = RectifiedFlow().sampling_grid(4, spacing)
        h = [b.lam - a.lam for a, b in zip(grid, grid[1:])]
        return h[-2] / (2 * h[-3])  # the last finite step's correction coefficient

    assert last_ratio("trailing") > 2.0 and last_ratio("flow_sigmas") == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("name", ["dpmpp_2m", "unipc", "euler"])
def test_gaussian_moments_on_the_flow_sigmas_grid(name):
    process = RectifiedFlow(shift=3.0)
    errors = {steps: _moment_errors(sample(gaussian_flow_model(process), _white_noise(), process, name, steps,
                                           prediction="flow", spacing="flow_sigmas")) for steps in (10, 200)}
    assert errors[200][0] < 1e-3 and errors[200][1] < 0.015 and errors[200][1] <= errors[10][1] + 1e-3, (errors, MEAN, STD)
