import math
import pickle

import pytest
import torch

from ldmkit.diffusion.schedules import (
    SCHEDULES,
    NoiseLevel,
    Schedule,
    exponential_sigmas,
    karras_sigmas,
    make_schedule,
    q_sample,
    rescale_zero_terminal_snr,
    sampling_grid,
    timestep_spacing,
)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_schedule_identities(name, zero_terminal_snr):
    s = make_schedule(name, zero_terminal_snr=zero_terminal_snr)
    ab = s.alphas_cumprod
    assert s.num_timesteps == 1000 and ab.dtype == torch.float64
    assert (ab[1:] < ab[:-1]).all()  # strictly decreasing: every step adds noise
    assert 0.99 < ab[0] < 1
    assert ((s.betas > 0) & (s.betas <= 1)).all()
    assert torch.allclose(torch.cumprod(1 - s.betas, 0), ab, rtol=1e-12, atol=1e-15)
    finite = slice(0, -1) if zero_terminal_snr else slice(None)
    assert torch.allclose(s.snr[finite], 1 / s.sigmas[finite] ** 2, rtol=1e-10)
    assert torch.allclose(s.log_snr[finite], s.snr[finite].log(), rtol=1e-10)
    if zero_terminal_snr:
        assert ab[-1] == 0 and s.snr[-1] == 0 and math.isinf(s.sigmas[-1]) and s.has_zero_terminal_snr
        assert ab[0] == pytest.approx(float(make_schedule(name).alphas_cumprod[0]), rel=1e-12)  # ᾱ_0 kept (Alg. 1)
    else:
        assert ab[-1] > 0 and not s.has_zero_terminal_snr


def test_zero_terminal_snr_rescale_is_affine_in_sqrt_alpha_bar():
    ab = make_schedule("scaled_linear").alphas_cumprod
    rescaled = rescale_zero_terminal_snr(ab)
    # Lin et al. Alg. 1: sqrt(ᾱ') = a sqrt(ᾱ) + b with sqrt(ᾱ'_0) = sqrt(ᾱ_0), sqrt(ᾱ'_{T-1}) = 0
    a = ab[0].sqrt() / (ab[0].sqrt() - ab[-1].sqrt())
    assert torch.allclose(rescaled.sqrt(), a * (ab.sqrt() - ab[-1].sqrt()), rtol=1e-12, atol=1e-15)


def test_known_values():
    # published: terminal SNR 0.0047 for Stable Diffusion's schedule, 4.04e-5 for DDPM's (Lin et al. 2023, Table 1)
    assert float(make_schedule("scaled_linear").snr[-1]) == pytest.approx(0.004682, rel=1e-3)
    assert float(make_schedule("linear").snr[-1]) == pytest.approx(4.04e-5, rel=2e-3)
    cosine = make_schedule("cosine")
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert float(cosine.alphas_cumprod[499]) == pytest.approx(f(0.5) / f(0.0), rel=1e-12)  # unclipped there
    sig = make_schedule("sigmoid", 100)
    assert float(sig.alphas_cumprod[49]) == pytest.approx(0.5, abs=1e-12)  # symmetric sigmoid: ᾱ(1/2) = 1/2


def test_make_schedule_errors_say_what_to_do():
    with pytest.raises(ValueError, match="choose one of"):
        make_schedule("quadratic")
    with pytest.raises(ValueError, match="drop beta_start"):
        make_schedule("cosine", beta_start=0.1)
    with pytest.raises(ValueError, match="options are"):
        make_schedule("linear", cosine_s=0.1)
    with pytest.raises(ValueError, match="non-increasing"):
        Schedule(torch.tensor([0.5, 0.9]))


diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize(
    "name,theirs", [("linear", "linear"), ("scaled_linear", "scaled_linear"), ("cosine", "squaredcos_cap_v2"),
                    ("sigmoid_beta", "sigmoid")]
)
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_schedules_match_diffusers(name, theirs, zero_terminal_snr):
    betas = {"beta_start": 0.00085, "beta_end": 0.012} if name == "scaled_linear" else {}  # SD's range
    ref = diffusers.DDPMScheduler(beta_schedule=theirs, rescale_betas_zero_snr=zero_terminal_snr, **betas).alphas_cumprod
    ours = make_schedule(name, zero_terminal_snr=zero_terminal_snr).alphas_cumprod
    # diffusers builds betas in float32 and takes a float32 cumprod: ~1e-6 relative at the noisy end
    assert torch.allclose(ours, ref.to(torch.float64), rtol=2e-5, atol=1e-9)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 7, 10, 50, 333])
def test_timestep_spacings_match_diffusers(spacing, steps):
    scheduler = diffusers.EulerDiscreteScheduler(timestep_spacing=spacing)  # keeps fractional linspace timesteps
    scheduler.set_timesteps(steps)
    ours = timestep_spacing(1000, steps, spacing)
    if spacing == "linspace" and steps == 1:
        assert ours.tolist() == [999.0]  # diffusers would start a 1-step sampler at t=0; we start at T-1
        return
    assert torch.allclose(ours, scheduler.timesteps.to(torch.float64), atol=1e-4)


def test_spacings_follow_lin_et_al_table_2():
    assert timestep_spacing(1000, 10, "leading").tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert timestep_spacing(1000, 10, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert timestep_spacing(1000, 10, "leading", steps_offset=1)[0] == 901
    assert timestep_spacing(1000, 10, "linspace")[1].item() == pytest.approx(999 - 111)


def test_karras_and_exponential_sigmas():
    sig = karras_sigmas(10, 0.03, 15.0, rho=7.0)
    assert sig[0] == pytest.approx(15.0) and sig[-1] == pytest.approx(0.03) and (sig[1:] < sig[:-1]).all()
    ramp = sig ** (1 / 7)  # Karras eq. 5: uniform in σ^{1/ρ}
    assert torch.allclose(ramp.diff(), ramp.diff()[:1].expand(9), rtol=1e-10)
    exp = exponential_sigmas(10, 0.03, 15.0)
    assert torch.allclose(exp.log().diff(), exp.log().diff()[:1].expand(9), rtol=1e-10)
    scheduler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                 use_karras_sigmas=True)
    scheduler.set_timesteps(10)
    s = make_schedule("scaled_linear")
    # σ̃_min = sqrt((1 - ᾱ_0)/ᾱ_0) amplifies the float32 rounding of diffusers' ᾱ_0 to ~1e-5
    assert torch.allclose(karras_sigmas(10, s.sigma_min, s.sigma_max), scheduler.sigmas[:-1].double(), rtol=5e-5)


def test_sigma_timestep_mapping():
    s = make_schedule("scaled_linear")
    t = torch.arange(1000, dtype=torch.float64)
    assert torch.equal(s.alpha_bar_at(t), s.alphas_cumprod)  # integers are exact table lookups
    assert torch.allclose(s.timestep_at_sigma(s.sigmas), t, atol=1e-9)
    frac = torch.tensor([0.25, 10.5, 500.75, 998.9], dtype=torch.float64)
    assert torch.allclose(s.timestep_at_sigma(s.sigma_at(frac)), frac, atol=1e-9)  # exact inverse
    # log σ̃ is linear between integers
    mid = s.sigma_at(torch.tensor(10.5, dtype=torch.float64))
    assert float(mid) == pytest.approx(math.sqrt(float(s.sigmas[10] * s.sigmas[11])), rel=1e-12)
    # agrees with diffusers' sigma -> t (used for Karras grids)
    scheduler = diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    log_sigmas = torch.log(((1 - scheduler.alphas_cumprod) / scheduler.alphas_cumprod) ** 0.5).double().numpy()
    for sigma in (0.05, 1.0, 7.3):
        assert float(s.timestep_at_sigma(torch.tensor(sigma))) == pytest.approx(
            float(scheduler._sigma_to_t(torch.tensor(sigma).numpy(), log_sigmas)), abs=1e-3)
    with pytest.raises(ValueError, match="must lie in"):
        s.alpha_bar_at(torch.tensor([1000.0]))


def test_zero_snr_interpolation_and_grids():
    s = make_schedule("scaled_linear", zero_terminal_snr=True)
    assert float(s.alpha_bar_at(torch.tensor(999.0))) == 0.0  # exact at the integer
    assert 0 < float(s.alpha_bar_at(torch.tensor(998.5))) < float(s.alphas_cumprod[998])  # finite stand-in between
    assert s.sigma_max == pytest.approx(math.sqrt(2**24 - 1))
    trailing = sampling_grid(s, 10, "trailing")
    assert trailing[0].alpha_bar == 0 and trailing[0].lam == -math.inf and trailing[0].sigma_ve == math.inf
    karras = sampling_grid(s, 10, "karras")
    assert karras[0].sigma_ve == pytest.approx(s.sigma_max) and karras[0].t == pytest.approx(999.0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace", "karras", "exponential"])
def test_sampling_grid_shape(spacing):
    s = make_schedule("scaled_linear")
    grid = sampling_grid(s, 8, spacing)
    assert len(grid) == 9 and grid[-1] == NoiseLevel.from_alpha_bar(-1.0, 1.0) and grid[-1].is_clean
    ab = [lv.alpha_bar for lv in grid]
    assert all(a < b for a, b in zip(ab, ab[1:]))
    for lv in grid[:-1]:  # ᾱ at a grid point is the schedule's ᾱ at its timestep
        assert lv.alpha_bar == pytest.approx(float(s.alpha_bar_at(torch.tensor(lv.t, dtype=torch.float64))), rel=1e-9)
        assert lv.alpha**2 + lv.sigma**2 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="sigma spacings"):
        sampling_grid(s, 8, "trailing", sigma_max=3.0)
    with pytest.raises(ValueError, match="choose one of"):
        sampling_grid(s, 8, "uniform")


def test_q_sample_and_device_tables():
    s = make_schedule("linear")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    ab = s.alphas_cumprod[t].view(3, 1, 1)
    x_t = q_sample(s, x0, t, noise)
    assert x_t.dtype == torch.float32
    assert torch.allclose(x_t.double(), ab.sqrt() * x0.double() + (1 - ab).sqrt() * noise.double(), atol=1e-6)
    assert s.tables("cpu") is s.tables(torch.device("cpu"))  # cached: no copy per training step
    restored = pickle.loads(pickle.dumps(s))  # checkpoints / spawn carry ᾱ, not the device caches
    assert restored._device_tables == {} and torch.equal(restored.alphas_cumprod, s.alphas_cumprod)
    ref = diffusers.DDPMScheduler(beta_schedule="linear")
    assert torch.allclose(q_sample(s, x0.double(), t, noise.double()), ref.add_noise(x0.double(), noise.double(), t), rtol=1e-5)
