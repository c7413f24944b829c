"""Our samplers against diffusers' schedulers (test-only dependency), driven by the same model and noise.

Both sides get the same deterministic model `model(x_t, t)` (the exact Gaussian denoiser plus a smooth
nonlinear term, in eps / v / x0 form), the same initial noise, and, for the stochastic samplers, the same
noise stream. Our schedule is built from the scheduler's own `alphas_cumprod` so that only sampler math
is compared (schedule construction is compared in test_schedules.py). Tolerance: max |ours - theirs| /
max |theirs| <= 1e-4 everywhere; diffusers keeps sigmas (and for some schedulers the sample) in float32,
which bounds the agreement at ~1e-6 relative; see TOLERANCE notes per case.

diffusers configuration choices, so both sides compute the same algorithm:
- Initial latents: ours start from x_T = noise in the VP scale. For sigma-space schedulers (Euler, Euler-a,
  Heun, LMS) we pass `noise * sqrt(1 + σ_max²)`, the same point in their scale (diffusers' `init_noise_sigma`
  is σ_max for linspace/trailing spacings, a sqrt(1+σ²) vs σ quirk we do not copy).
- `clip_sample=False`, `thresholding=False`: we never clip x̂_0.
- DDIM/PNDM: `set_alpha_to_one=True` (last step goes to clean data, as ours). Their previous timestep is
  `t - T // steps`, so we use step counts that divide T (otherwise trailing grids disagree by one index).
- PNDM: `skip_prk_steps=True` is PLMS (pseudo improved Euler warm-up), which is what `plms` implements.
- DPM-Solver++ / UniPC: `final_sigmas_type="zero"`, `lower_order_final=True`, `euler_at_final=False`,
  `solver_type="midpoint"` (DPM) / `"bh2"` or `"bh1"` (UniPC), `predict_x0=True`, no disabled correctors.
  Their `leading`/`linspace` grids use steps + 1 points, so we compare `trailing` and `karras`; with
  Karras sigmas they round the model's timestep to an integer, so that case uses a model that depends on
  round(t) (the sigma used for the update is the Karras sigma on both sides).
- Euler/Heun/LMS with `linspace`: diffusers interpolates σ linearly between integer timesteps, we
  interpolate log σ (so that sigma -> t -> sigma is exact); the fractional grid points differ by ~1e-6.
- Zero terminal SNR: diffusers' DDIM/DDPM keep ᾱ_{T-1} = 0 (exact, as ours); their Euler / Euler-a /
  DPM / UniPC replace it by 2**-24 (we then compare on that schedule); PNDM, Heun and LMS lack the option.
- Cosine grids that start at t = T-1 (ᾱ = 2.4e-9, σ̃ ≈ 2·10⁴): our heun/plms take a first-order first step
  there by default, which fixes their samples (test_samplers.py, samplers.py "Effectively infinite noise");
  diffusers takes the plain step, so those comparisons pass `infinite_noise_alpha_bar=0` (the plain method).
- Stochastic samplers: DDIM(η>0), DDPM and Euler-a draw N(0, I) from the generator each step in the
  sample dtype, as we do; DPM-SDE draws float32 noise, so we hand it our float64 stream via `variance_noise`.
"""

from __future__ import annotations

import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from ldmkit.diffusion.parameterization import to_eps  # noqa: E402
from ldmkit.diffusion.samplers import SAMPLERS  # noqa: E402
from ldmkit.diffusion.sampling import make_denoiser  # noqa: E402
from ldmkit.diffusion.schedules import Schedule  # noqa: E402

from .helpers import Gaussian, rel_err  # noqa: E402

SHAPE = (2, 2, 4, 4)
DATA = Gaussian(mean=torch.linspace(-1, 1, 4), std=torch.linspace(0.4, 1.2, 4))
PRED_NAMES = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}
BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
BETA_RANGES = {"scaled_linear": {"beta_start": 0.00085, "beta_end": 0.012}}  # Stable Diffusion's


def _noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _run_diffusers(scheduler, model, noise, steps, *, sigma_space: bool, step_kwargs=lambda i: {}):
    scheduler.set_timesteps(steps)
    x = noise * math.sqrt(1 + float(scheduler.sigmas[0]) ** 2) if sigma_space else noise.clone()
    for i, t in enumerate(scheduler.timesteps):
        model_in = scheduler.scale_model_input(x, t)
        out = model(model_in, torch.full((noise.shape[0],), float(t), dtype=torch.float64))
        x = scheduler.step(out, t, x, **step_kwargs(i)).prev_sample
    return x.to(torch.float64)


def _ours(name, scheduler, prediction, noise, steps, *, spacing, round_t=False, generator=None, callback=None, **options):
    schedule = Schedule(scheduler.alphas_cumprod.to(torch.float64))
    model = DATA.model(schedule, prediction, wiggle=0.1, round_t=round_t)
    out = SAMPLERS[name](make_denoiser(model, prediction), noise.clone(), schedule, steps, spacing=spacing,
                         generator=generator, callback=callback, **options)
    return out, model


def _compare(name, cls, prediction, steps, *, spacing, beta="scaled_linear", zsnr=False, sigma_space=False,
             karras=False, step_kwargs=None, ours_options=None, generator_seed=None, tol=None, theirs_eps=False, **config):
    their_prediction = "eps" if theirs_eps else prediction
    kwargs = dict(beta_schedule=BETA_SCHEDULES[beta], prediction_type=PRED_NAMES[their_prediction], timestep_spacing=spacing,
                  **BETA_RANGES.get(beta, {}), **config)
    if zsnr:
        kwargs["rescale_betas_zero_snr"] = True
    if karras:
        kwargs["use_karras_sigmas"] = True
    scheduler = cls(**kwargs)
    if cls in (diffusers.DDIMScheduler, diffusers.DDPMScheduler, diffusers.PNDMScheduler):
        # these step with alphas_cumprod directly: give them float64 so the comparison is exact
        scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
    noise = _noise()
    ours_gen = torch.Generator().manual_seed(generator_seed) if generator_seed is not None else None
    ours, model = _ours(name, scheduler, prediction, noise, steps, spacing="karras" if karras else spacing,
                        round_t=karras and not sigma_space, generator=ours_gen, **(ours_options or {}))
    theirs_gen = torch.Generator().manual_seed(generator_seed) if generator_seed is not None else None
    kw = step_kwargs(theirs_gen) if step_kwargs else (lambda i: {})
    if theirs_eps:
        schedule = Schedule(scheduler.alphas_cumprod.to(torch.float64))
        raw = model
        model = lambda x, t: to_eps(raw(x, t), x, schedule.alpha_bar_at(t), prediction)  # noqa: E731
    theirs = _run_diffusers(scheduler, model, noise, steps, sigma_space=sigma_space, step_kwargs=kw)
    err = rel_err(ours, theirs)
    variant = f"{config.get('solver_order', '')}{config.get('solver_type', '')}"
    print(f"\nRELERR {name} {cls.__name__} {beta} {prediction} {spacing} karras={karras} zsnr={zsnr} {variant} {err:.2e}")
    if tol is None:
        float32_sigmas = cls not in (diffusers.DDIMScheduler, diffusers.DDPMScheduler, diffusers.PNDMScheduler)
        tol = COSINE_TOL if float32_sigmas and beta == "cosine" and (spacing != "leading" or karras) else TOL
    assert torch.isfinite(ours).all()
    assert err <= tol, f"{name} vs {cls.__name__} ({beta}, {prediction}, {spacing}, zsnr={zsnr}): rel err {err:.2e}"
    return err


PREDICTIONS = ("eps", "v", "x0")
# Agreement reached: <= 1e-5 relative everywhere (typically 1e-7, the float32 in diffusers' sigmas and
# samples), except the cosine schedule on grids that start at t = T-1, where σ̃ ≈ 2·10⁴ and diffusers'
# float32 sigmas/samples lose ~1e-3 to cancellation; test_cosine_gap_is_diffusers_float32 shows the gap
# closes to < 1e-6 when diffusers' sigmas are recomputed in float64.
TOL, COSINE_TOL = 1e-5, 3e-3
PLAIN_FIRST_STEP = {"infinite_noise_alpha_bar": 0.0}  # heun/plms as diffusers runs them (module docstring)


def matrix(names: str, *axes):
    """Cartesian product of `axes` as pytest params; a Latin-square third of it (every value of every axis
    still appears) runs by default, the rest is marked slow."""
    import itertools

    params = []
    for idx in itertools.product(*(range(len(a)) for a in axes)):
        values = tuple(a[i] for a, i in zip(axes, idx))
        marks = () if sum(idx) % 3 == 0 else (pytest.mark.slow,)
        params.append(pytest.param(*values, marks=marks))
    return pytest.mark.parametrize(names, params)


@matrix("beta,prediction,spacing", list(BETA_SCHEDULES), PREDICTIONS, ["leading", "trailing"])
def test_ddim_deterministic(beta, prediction, spacing):
    # TOLERANCE: ~1e-15 (both float64 end to end)
    _compare("ddim", diffusers.DDIMScheduler, prediction, 10, spacing=spacing, beta=beta, clip_sample=False,
             set_alpha_to_one=True)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta(eta):
    _compare("ddim", diffusers.DDIMScheduler, "eps", 10, spacing="trailing", clip_sample=False, set_alpha_to_one=True,
             ours_options={"eta": eta}, generator_seed=7, step_kwargs=lambda g: lambda i: {"eta": eta, "generator": g},
             )


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_ddim_zero_terminal_snr_exact(prediction):
    # ᾱ_{T-1} = 0 exactly on both sides: the first step leaves pure noise
    _compare("ddim", diffusers.DDIMScheduler, prediction, 10, spacing="trailing", zsnr=True, clip_sample=False,
             set_alpha_to_one=True)


@matrix("beta,prediction", list(BETA_SCHEDULES), PREDICTIONS)
def test_ddpm(beta, prediction):
    # TOLERANCE: ~1e-10: diffusers clamps the last (zero) posterior variance to 1e-20 and still adds noise
    _compare("ddpm", diffusers.DDPMScheduler, prediction, 10, spacing="trailing", beta=beta, clip_sample=False,
             variance_type="fixed_small", generator_seed=3, step_kwargs=lambda g: lambda i: {"generator": g})


@pytest.mark.parametrize("spacing,zsnr", [("leading", False), ("trailing", True)])
def test_ddpm_spacings_and_zero_snr(spacing, zsnr):
    _compare("ddpm", diffusers.DDPMScheduler, "v", 20, spacing=spacing, zsnr=zsnr, clip_sample=False,
             generator_seed=4, step_kwargs=lambda g: lambda i: {"generator": g})


def test_ddpm_sigmoid_beta_schedule():
    # diffusers' "sigmoid" (GeoDiff) betas; ours is make_schedule("sigmoid_beta"), compared in test_schedules
    scheduler = diffusers.DDPMScheduler(beta_schedule="sigmoid", clip_sample=False, timestep_spacing="trailing")
    noise = _noise()
    ours, model = _ours("ddpm", scheduler, "eps", noise, 10, spacing="trailing", generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    theirs = _run_diffusers(scheduler, model, noise, 10, sigma_space=False, step_kwargs=lambda i: {"generator": g})
    assert rel_err(ours, theirs) < TOL


@matrix("beta,prediction,spacing", list(BETA_SCHEDULES), PREDICTIONS, ["leading", "trailing"])
def test_plms(beta, prediction, spacing):
    # PNDM is a linear multistep method on ε. diffusers' PNDM combines raw outputs across steps before
    # converting, which for v-models mixes v's taken at different timesteps; so diffusers gets our model's
    # ε̂ (an eps-model) and we get the model in its own parameterisation.
    _compare("plms", diffusers.PNDMScheduler, prediction, 10, spacing=spacing, beta=beta, skip_prk_steps=True,
             set_alpha_to_one=True, theirs_eps=True, ours_options=PLAIN_FIRST_STEP if beta == "cosine" else None)


DPM = dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True,
           euler_at_final=False, final_sigmas_type="zero")


@matrix("beta,prediction", list(BETA_SCHEDULES), PREDICTIONS)
def test_dpmpp_2m(beta, prediction):
    # TOLERANCE: ~1e-6, diffusers keeps sigmas and the sample in float32
    _compare("dpmpp_2m", diffusers.DPMSolverMultistepScheduler, prediction, 10, spacing="trailing", beta=beta, **DPM)


@pytest.mark.parametrize("karras,zsnr", [(True, False), (False, True), (True, True)])
def test_dpmpp_2m_karras_and_zero_snr(karras, zsnr):
    _compare("dpmpp_2m", diffusers.DPMSolverMultistepScheduler, "v", 12, spacing="trailing", karras=karras, zsnr=zsnr, **DPM)


def _variance_noise(g):
    return lambda i: {"variance_noise": torch.randn(SHAPE, generator=g, dtype=torch.float64)}


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("zsnr", [False, True])
def test_dpmpp_2m_sde(prediction, zsnr):
    if zsnr and prediction == "eps":
        pytest.skip("eps-prediction is undefined at zero SNR")
    _compare("dpmpp_2m_sde", diffusers.DPMSolverMultistepScheduler, prediction, 10, spacing="trailing", zsnr=zsnr,
             generator_seed=11, step_kwargs=_variance_noise, **{**DPM, "algorithm_type": "sde-dpmsolver++"})


UNIPC = dict(solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True, disable_corrector=[],
             final_sigmas_type="zero")


@matrix("beta,prediction", list(BETA_SCHEDULES), PREDICTIONS)
def test_unipc(beta, prediction):
    _compare("unipc", diffusers.UniPCMultistepScheduler, prediction, 10, spacing="trailing", beta=beta, **UNIPC)


@pytest.mark.parametrize("order", [1, 3])
def test_unipc_orders(order):
    _compare("unipc", diffusers.UniPCMultistepScheduler, "eps", 12, spacing="trailing",
             ours_options={"order": order}, **{**UNIPC, "solver_order": order})


@pytest.mark.parametrize("order", [2, 3])
def test_unipc_bh1_up_to_the_last_step(order):
    # diffusers' bh1 returns NaN on the step into σ = 0 (B(h) = -h = -inf times a zero correction), so we
    # compare the state before that last step (which is the same first-order step for bh1 and bh2).
    steps = 12
    scheduler = diffusers.UniPCMultistepScheduler(beta_schedule="scaled_linear", timestep_spacing="trailing", **BETA_RANGES["scaled_linear"],
                                                  **{**UNIPC, "solver_order": order, "solver_type": "bh1"})
    noise = _noise()
    states = {}
    _ours("unipc", scheduler, "eps", noise, steps, spacing="trailing", order=order, variant="bh1",
          callback=lambda i, n, x, x0: states.setdefault(i, x))
    model = DATA.model(Schedule(scheduler.alphas_cumprod.to(torch.float64)), "eps", wiggle=0.1)
    scheduler.set_timesteps(steps)
    x = noise.clone()
    for t in scheduler.timesteps[:-1]:
        x = scheduler.step(model(x, torch.full((SHAPE[0],), float(t), dtype=torch.float64)), t, x).prev_sample
    assert rel_err(states[steps - 2], x.double()) < TOL
    assert rel_err(states[steps - 2], states[steps - 3]) > 1e-3  # the states do move: the check can fail


@pytest.mark.parametrize("karras,zsnr", [(True, False), (False, True)])
def test_unipc_karras_and_zero_snr(karras, zsnr):
    _compare("unipc", diffusers.UniPCMultistepScheduler, "v", 12, spacing="trailing", karras=karras, zsnr=zsnr, **UNIPC)


@matrix("beta,prediction,spacing", list(BETA_SCHEDULES), PREDICTIONS, ["leading", "trailing", "linspace"])
def test_euler(beta, prediction, spacing):
    # TOLERANCE: ~1e-6 (float32 sigmas/sample in diffusers; linspace adds the σ-interpolation difference)
    _compare("euler", diffusers.EulerDiscreteScheduler, prediction, 10, spacing=spacing, beta=beta, sigma_space=True,
             interpolation_type="linear", final_sigmas_type="zero")


@pytest.mark.parametrize("karras,zsnr", [(True, False), (False, True)])
def test_euler_karras_and_zero_snr(karras, zsnr):
    _compare("euler", diffusers.EulerDiscreteScheduler, "v", 10, spacing="linspace" if karras else "trailing",
             karras=karras, zsnr=zsnr, sigma_space=True, final_sigmas_type="zero")


@pytest.mark.parametrize("prediction", ["eps", "v"])  # diffusers' Euler-a has no x0 prediction
@pytest.mark.parametrize("spacing,zsnr", [("linspace", False), ("trailing", False), ("trailing", True)])
def test_euler_ancestral(prediction, spacing, zsnr):
    if zsnr and prediction == "eps":
        pytest.skip("eps-prediction is undefined at zero SNR")
    _compare("euler_a", diffusers.EulerAncestralDiscreteScheduler, prediction, 10, spacing=spacing, zsnr=zsnr,
             sigma_space=True, generator_seed=13, step_kwargs=lambda g: lambda i: {"generator": g})


@matrix("beta,prediction,spacing", list(BETA_SCHEDULES), PREDICTIONS, ["trailing", "linspace", "karras"])
def test_heun(beta, prediction, spacing):
    # "karras": diffusers' use_karras_sigmas on its linspace grid (σ_min, σ_max = the schedule's)
    karras = spacing == "karras"
    _compare("heun", diffusers.HeunDiscreteScheduler, prediction, 8, spacing="linspace" if karras else spacing,
             beta=beta, karras=karras, sigma_space=True, ours_options=PLAIN_FIRST_STEP if beta == "cosine" else None)


@matrix("beta,prediction,spacing", list(BETA_SCHEDULES), PREDICTIONS, ["trailing", "linspace", "karras"])
def test_lms(beta, prediction, spacing):
    karras = spacing == "karras"
    _compare("lms", diffusers.LMSDiscreteScheduler, prediction, 10, spacing="linspace" if karras else spacing,
             beta=beta, karras=karras, sigma_space=True, step_kwargs=lambda g: lambda i: {"order": 4})


@pytest.mark.parametrize("cls,name", [(diffusers.EulerDiscreteScheduler, "euler"), (diffusers.HeunDiscreteScheduler, "heun")])
def test_cosine_gap_is_diffusers_float32(cls, name):
    scheduler = cls(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing")
    noise = _noise()
    ours, model = _ours(name, scheduler, "v", noise, 8, spacing="trailing", **(PLAIN_FIRST_STEP if name == "heun" else {}))
    theirs32 = _run_diffusers(scheduler, model, noise, 8, sigma_space=True)
    # the same run with their sigma grid rebuilt in float64 (trailing timesteps are integers: no interpolation)
    scheduler.set_timesteps(8)
    timesteps = scheduler.timesteps if name == "euler" else torch.cat([scheduler.timesteps[:1], scheduler.timesteps[1::2]])
    sigmas64 = Schedule(scheduler.alphas_cumprod.to(torch.float64)).sigmas[timesteps.long()]
    sigmas64 = torch.cat([sigmas64, sigmas64.new_zeros(1)])
    if name == "heun":  # Heun repeats every inner sigma for its corrector
        sigmas64 = torch.cat([sigmas64[:1], sigmas64[1:-1].repeat_interleave(2), sigmas64[-1:]])
    scheduler.sigmas = sigmas64
    x = noise * math.sqrt(1 + float(sigmas64[0]) ** 2)
    for t in scheduler.timesteps:
        out = model(scheduler.scale_model_input(x, t), torch.full((noise.shape[0],), float(t), dtype=torch.float64))
        x = scheduler.step(out, t, x).prev_sample
    assert rel_err(ours, theirs32) > 1e-5  # the float32 gap is real ...
    assert rel_err(ours, x.double()) < 1e-6  # ... and is all of it
