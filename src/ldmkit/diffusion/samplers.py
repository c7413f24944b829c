"""Samplers: small functions `(denoiser, x_T, process, steps, *, generator, callback, **options) -> x_0`.

One file on purpose (over 400 lines): the ten samplers share the conventions written below and the private
step helpers, and are meant to be read and compared side by side; each stays a short function.

`process` (the argument is still called `schedule`) is any `ldmkit.diffusion.processes.NoiseProcess`: every
sampler is written in α, σ, λ and σ̃ = σ/α of the grid's `NoiseLevel`s, so it runs on any x = α x_0 + σ ε path,
except `ddpm` and `ddim`, whose updates are written in ᾱ for variance-preserving processes and say so
(`euler` is DDIM η=0 and `euler_a` DDPM-like ancestral sampling on any process). On rectified flow, `euler`
is flow Euler x' = x + (t' - t) u (the DDIM step is the same point) and `heun` integrates in t, as diffusers'
FlowMatch schedulers; DPM-Solver++ and UniPC step in λ = log(α/σ) as everywhere.

Inside the library a *denoiser* is `denoiser(x, level) -> x̂_0`: x is in the variance-preserving scale
(x = α x_0 + σ ε) at the `NoiseLevel` `level` of the grid, and the result is the x_0 prediction
(`ldmkit.diffusion.sample` builds it from a raw eps/v/x0 network). Every sampler walks the same grid,
`sampling_grid(schedule, steps, **grid_options)` (`spacing`, `sigma_min`, `sigma_max`, `rho`,
`steps_offset`), so samplers given the same steps and spacing are compared on the same noise levels.
Coordinates used in the comments: α, σ (VP), λ = log(α/σ), and k-diffusion's x̃ = x/α, σ̃ = σ/α.

Randomness comes only from `generator` (a torch.Generator, or one per sample so a batch reproduces
whatever its size). `callback(i, n, x, x0)` is called after step i of n with the new state x and the
x_0 prediction that step used.

Zero terminal SNR (ᾱ = 0 at the first grid point, σ̃ = ∞, λ = -∞): every sampler takes the exact
first-order (DDIM) step out of pure noise; no sampler uses that point for a higher-order correction or as
multistep history, because across an infinite λ or σ̃ interval those terms vanish (multistep weights,
Lagrange bases) or are undefined (Heun/PLMS correctors). Steps into clean data (ᾱ = 1) are first order
for the λ-based solvers (DPM-Solver++, UniPC), as in their papers.

Effectively infinite noise. `cosine` and `sigmoid` clip β at 0.999 (Nichol & Dhariwal 2021, §3.2), so their
last timestep is a finite stand-in for ᾱ(1) = 0: ᾱ_{T-1} = 2.4e-9 (σ̃ ≈ 2·10⁴) and 3.0e-7 (σ̃ ≈ 1.8·10³) at
T = 1000. Heun's trapezoid and PLMS's warm-up/Adams–Bashforth terms (uniform in the step index) weight the
change of ε̂ between the first two grid points by ≈ σ̃_0: on Gaussian data of std s the first step is then off
by ≈ σ̃_0 s² / (4 σ̃_1³) of the sample std (1900% for Heun on cosine at 20 trailing steps), while the first-order
step errs by s² / (2 σ̃_1²), as it does out of exact zero SNR. Along the probability-flow ODE ε̂ differs from its
ᾱ = 0 value by a relative ≈ ᾱ s² / 2, ≤ 5·10⁻⁷ for unit-scale data at ᾱ ≤ 10⁻⁶ (σ̃ ≥ 10³): a few float32 ulps,
nothing a correction can use. So `heun` and `plms` treat a first grid point with ᾱ ≤ `infinite_noise_alpha_bar`
(default INFINITE_NOISE_ALPHA_BAR = 1e-6) as ᾱ = 0. The default sits between sigmoid's 3.0e-7 and the DDPM
`linear` schedule's 4.0e-5 (σ̃ ≈ 157, where the corrections are accurate and agree with diffusers); Karras /
exponential grids on zero-SNR schedules start at the 2^-24 stand-in and take the same first-order step (their
correction there is ~1e-8 relative). `infinite_noise_alpha_bar=0` restores the plain methods (what diffusers and
k-diffusion do). LMS, DPM-Solver++ and UniPC need no rule: their weight on the first point vanishes as
σ̃_0/σ̃_1 grows (Lagrange basis in σ̃, step ratio in λ), and they stay accurate there.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from ldmkit.diffusion.processes import NoiseLevel, NoiseProcess, sampling_grid

Schedule = NoiseProcess  # annotation name kept from the VP-only days

Denoiser = Callable[[Tensor, NoiseLevel], Tensor]
Callback = Callable[[int, int, Tensor, Tensor], None]
Generator = torch.Generator | Sequence[torch.Generator] | None

INFINITE_NOISE_ALPHA_BAR = 1e-6  # see the module docstring, "Effectively infinite noise"


def randn_like(x: Tensor, generator: Generator = None) -> Tensor:
    """N(0, I) shaped like x; a sequence of generators draws sample i from generator i (edm's
    StackedRandomGenerator), so a sample's noise does not depend on the batch it is in."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    if len(generator) != x.shape[0]:
        raise ValueError(f"Got {len(generator)} generators for a batch of {x.shape[0]}; pass one per sample.")
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generator])


def _eps(x: Tensor, x0: Tensor, level: NoiseLevel) -> Tensor:
    """ε̂ = (x - α x̂_0)/σ, which is also dx̃/dσ̃ of the probability-flow ODE (Karras et al. 2022, eq. 3)."""
    return (x - level.alpha * x0) / level.sigma


def _at_infinite_noise(i: int, level: NoiseLevel, threshold: float) -> bool:
    """Step i starts at ᾱ = 0 or, being the first step, at effectively infinite noise (module docstring)."""
    return level.alpha_bar == 0 or (i == 0 and level.alpha_bar <= threshold)


def _report(callback: Callback | None, i: int, n: int, x: Tensor, x0: Tensor) -> None:
    if callback is not None:
        callback(i, n, x, x0)


def _ddim_step(x0: Tensor, eps: Tensor, nxt: NoiseLevel) -> Tensor:
    # x' = α' x̂_0 + σ' ε̂. Equal to the k-diffusion Euler step x̃' = x̃ + (σ̃' - σ̃) ε̂, rewritten as
    # x̃' = x̂_0 + σ̃' ε̂ so that it stays exact when σ̃ = ∞ (zero terminal SNR).
    return nxt.alpha * x0 + nxt.sigma * eps


def sample_ddim(denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, *, eta: float = 0.0,
                generator: Generator = None, callback: Callback | None = None, **grid_options) -> Tensor:
    """DDIM, Song et al. 2021 eq. 12 with σ_t(η) from eq. 16. η=0: deterministic; η=1: DDPM ancestral sampling."""
    schedule.require_variance_preserving("The ddim sampler", "Use euler (DDIM with η=0 on any path) or euler_a.")
    grid = sampling_grid(schedule, steps, **grid_options)
    for i, (cur, nxt) in enumerate(zip(grid, grid[1:])):
        x0 = denoiser(x, cur)
        eps = _eps(x, x0, cur)
        # σ_t(η)² = η² (1-ᾱ')/(1-ᾱ) · (1 - ᾱ/ᾱ')
        var = eta**2 * (1 - nxt.alpha_bar) / (1 - cur.alpha_bar) * (1 - cur.alpha_bar / nxt.alpha_bar)
        x = nxt.alpha * x0 + math.sqrt(max(1 - nxt.alpha_bar - var, 0.0)) * eps
        if var > 0:
            x = x + math.sqrt(var) * randn_like(x, generator)
        _report(callback, i, steps, x, x0)
    return x


def sample_ddpm(denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, *,
                generator: Generator = None, callback: Callback | None = None, **grid_options) -> Tensor:
    """DDPM ancestral sampling, Ho et al. 2020 eqs. 6-7: x' ~ q(x' | x, x̂_0) = N(μ̃, β̃ I), with
    β = 1 - ᾱ/ᾱ' the variance of the (possibly strided) step and β̃ = (1-ᾱ')/(1-ᾱ) β."""
    schedule.require_variance_preserving("The ddpm sampler", "Use euler_a (ancestral sampling on any path).")
    grid = sampling_grid(schedule, steps, **grid_options)
    for i, (cur, nxt) in enumerate(zip(grid, grid[1:])):
        x0 = denoiser(x, cur)
        beta = 1 - cur.alpha_bar / nxt.alpha_bar
        x0_coef = nxt.alpha * beta / (1 - cur.alpha_bar)
        x_coef = math.sqrt(1 - beta) * (1 - nxt.alpha_bar) / (1 - cur.alpha_bar)
        var = (1 - nxt.alpha_bar) / (1 - cur.alpha_bar) * beta
        x = x0_coef * x0 + x_coef * x
        if var > 0:
            x = x + math.sqrt(var) * randn_like(x, generator)
        _report(callback, i, steps, x, x0)
    return x


def sample_euler(denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, *,
                 generator: Generator = None, callback: Callback | None = None, **grid_options) -> Tensor:
    """Euler on the probability-flow ODE dx̃/dσ̃ = ε̂ (Karras et al. 2022, Alg. 2 without churn;
    k-diffusion `sample_euler`). In these coordinates it coincides with DDIM η=0 (Karras et al. §3)."""
    grid = sampling_grid(schedule, steps, **grid_options)
    for i, (cur, nxt) in enumerate(zip(grid, grid[1:])):
        x0 = denoiser(x, cur)
        x = _ddim_step(x0, _eps(x, x0, cur), nxt)
        _report(callback, i, steps, x, x0)
    return x


def sample_euler_ancestral(denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, *, eta: float = 1.0,
                           generator: Generator = None, callback: Callback | None = None, **grid_options) -> Tensor:
    """Euler ancestral (k-diffusion `sample_euler_ancestral`): Euler down to σ̃_down, then add σ̃_up noise, with
    σ̃_up = η σ̃' sqrt(1 - (σ̃'/σ̃)²), σ̃_down² = σ̃'² - σ̃_up². At η=1 this is the DDPM posterior step (β̃)."""
    grid = sampling_grid(schedule, steps, **grid_options)
    for i, (cur, nxt) in enumerate(zip(grid, grid[1:])):
        x0 = denoiser(x, cur)
        eps = _eps(x, x0, cur)
        ratio = nxt.sigma * cur.alpha / (nxt.alpha * cur.sigma)  # σ̃'/σ̃, 0 when σ̃ = ∞
        sigma_up = min(nxt.sigma_ve, eta * nxt.sigma_ve * math.sqrt(max(1 - ratio**2, 0.0)))
        sigma_down = math.sqrt(max(nxt.sigma_ve**2 - sigma_up**2, 0.0))
        x_tilde = x0 + sigma_down * eps
        if sigma_up > 0:
            x_tilde = x_tilde + sigma_up * randn_like(x, generator)
        x = nxt.alpha * x_tilde
        _report(callback, i, steps, x, x0)
    return x


def sample_heun(denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, *,
                infinite_noise_alpha_bar: float = INFINITE_NOISE_ALPHA_BAR, generator: Generator = None,
                callback: Callback | None = None, **grid_options) -> Tensor:
    """Heun's 2nd-order method on dx̃/dσ̃ = ε̂ (Karras et al. 2022, Alg. 1, deterministic): an Euler
    predictor, then the trapezoidal corrector, except into σ̃ = 0 (and out of a first point at effectively
    infinite noise, ᾱ ≤ `infinite_noise_alpha_bar`: module docstring) where it is Euler.
    2·steps - 1 model evaluations (one fewer out of infinite noise)."""
    grid = sampling_grid(schedule, steps, **grid_options)
    if schedule.ode_in_process_time:
        return _heun_in_process_time(denoiser, x, grid, callback)
    for i, (cur, nxt) in enumerate(zip(grid, grid[1:])):
        x0 = denoiser(x, cur)
        eps = _eps(x, x0, cur)
        x_euler = _ddim_step(x0, eps, nxt)
        if nxt.is_clean or _at_infinite_noise(i, cur, infinite_noise_alpha_bar):
            x = x_euler
        else:
            eps_next = _eps(x_euler, denoiser(x_euler, nxt), nxt)
            x_tilde = x / cur.alpha + (nxt.sigma_ve - cur.sigma_ve) * (eps + eps_next) / 2
            x = nxt.alpha * x_tilde
        _report(callback, i, steps, x, x0)
    return x


def _velocity(x: Tensor, x0: Tensor, level: NoiseLevel) -> Tensor:
    """dx/dt = α' x̂_0 + σ' ε̂ in the process's own time (for rectified flow u = ε̂ - x̂_0)."""
    return level.d_alpha * x0 + level.d_sigma * _eps(x, x0, level)


def _heun_in_process_time(denoiser: Denoiser, x: Tensor, grid: Sequence[NoiseLevel],
                          callback: Callback | None) -> Tensor:
    """Heun on dx/dt = α' x̂_0 + σ' ε̂ in the process's time (diffusers FlowMatchHeunDiscreteScheduler for
    rectified flow: x' = x + (t' - t)(u + u')/2, Euler into t = 0). Its corrector also runs out of pure noise,
    where the velocity is finite. 2·steps - 1 model evaluations."""
    steps = len(grid) - 1
    for i, (cur, nxt) in enumerate(zip(grid, grid[1:])):
        x0 = denoiser(x, cur)
        slope = _velocity(x, x0, cur)
        x_euler = x + (nxt.t - cur.t) * slope
        if nxt.is_clean:
            x = x_euler
        else:
            x = x + (nxt.t - cur.t) * (slope + _velocity(x_euler, denoiser(x_euler, nxt), nxt)) / 2
        _report(callback, i, steps, x, x0)
    return x


def _lagrange_integral(nodes: Sequence[float], j: int, start: float, end: float) -> float:
    """∫_start^end Π_{k≠j} (s - n_k)/(n_j - n_k) ds, exactly: expand the polynomial in u = s - start."""
    poly = [1.0]  # coefficients of u^0, u^1, ...
    for k, node in enumerate(nodes):
        if k == j:
            continue
        shift, scale = node - start, 1.0 / (nodes[j] - node)
        # multiply by (u - shift) * scale
        poly = [scale * (a - shift * b) for a, b in zip([0.0] + poly, poly + [0.0])]
    width = end - start
    return sum(c * width ** (m + 1) / (m + 1) for m, c in enumerate(poly))


def sample_lms(denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, *, order: int = 4,
               generator: Generator = None, callback: Callback | None = None, **grid_options) -> Tensor:
    """Linear multistep (Adams–Bashforth) in σ̃ on dx̃/dσ̃ = ε̂ (k-diffusion `sample_lms`): x̃' = x̃ + Σ_j c_j ε̂_j
    with c_j the integral over [σ̃, σ̃'] of the Lagrange basis through the last `order` σ̃'s."""
    if order < 1:
        raise ValueError(f"lms order must be >= 1, got {order}.")
    grid = sampling_grid(schedule, steps, **grid_options)
    history: list[tuple[float, Tensor]] = []  # (σ̃_j, ε̂_j), newest last
    for i, (cur, nxt) in enumerate(zip(grid, grid[1:])):
        x0 = denoiser(x, cur)
        eps = _eps(x, x0, cur)
        if cur.alpha_bar == 0:  # σ̃ = ∞: the exact first-order step; its Lagrange basis vanishes afterwards
            x = _ddim_step(x0, eps, nxt)
        else:
            history = (history + [(cur.sigma_ve, eps)])[-order:]
            nodes = [s for s, _ in history]
            x_tilde = x / cur.alpha
            for j, (_, eps_j) in enumerate(history):
                x_tilde = x_tilde + _lagrange_integral(nodes, j, cur.sigma_ve, nxt.sigma_ve) * eps_j
            x = nxt.alpha * x_tilde
        _report(callback, i, steps, x, x0)
    return x


_ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _ddim_transfer(x: Tensor, eps: Tensor, cur: NoiseLevel, nxt: NoiseLevel) -> Tensor:
    # PNDM's transfer φ(x, ε, t, t') (Liu et al. 2022, eq. 9) = the DDIM step with x̂_0 = (x - σ ε)/α
    return nxt.alpha * (x - cur.sigma * eps) / cur.alpha + nxt.sigma * eps


def sample_plms(denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, *,
                infinite_noise_alpha_bar: float = INFINITE_NOISE_ALPHA_BAR, generator: Generator = None,
                callback: Callback | None = None, **grid_options) -> Tensor:
    """PLMS / PNDM (Liu et al. 2022, eqs. 9, 12): 4th-order Adams–Bashforth on ε̂ (uniform in the step index)
    through the DDIM transfer; the first step is a pseudo improved Euler step (one extra evaluation), as in
    LDM's PLMS and diffusers' PNDM with `skip_prk_steps`. steps + 1 model evaluations (steps when steps = 1).
    Out of (effectively) infinite noise, ᾱ ≤ `infinite_noise_alpha_bar` (module docstring), the first step is
    the exact DDIM step and the warm-up starts at the second point."""
    grid = sampling_grid(schedule, steps, **grid_options)
    history: list[Tensor] = []  # ε̂, newest last
    for i, (cur, nxt) in enumerate(zip(grid, grid[1:])):
        x0 = denoiser(x, cur)
        eps = _eps(x, x0, cur)
        if _at_infinite_noise(i, cur, infinite_noise_alpha_bar):  # exact DDIM step; no history from this point
            x = _ddim_step(x0, eps, nxt)
            _report(callback, i, steps, x, x0)
            continue
        history = (history + [eps])[-4:]
        if len(history) == 1 and not nxt.is_clean:
            x_euler = _ddim_transfer(x, eps, cur, nxt)
            eps_combined = (eps + _eps(x_euler, denoiser(x_euler, nxt), nxt)) / 2
        else:
            coefs = _ADAMS_BASHFORTH[len(history)]
            eps_combined = sum(c * e for c, e in zip(coefs, reversed(history)))
        x = _ddim_transfer(x, eps_combined, cur, nxt)
        _report(callback, i, steps, x, x0)
    return x


def sample_dpmpp_2m(denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, *,
                    generator: Generator = None, callback: Callback | None = None, **grid_options) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022b Alg. 2: data-prediction multistep in λ,
    x' = (σ'/σ) x - α' (e^{-h} - 1) D,  D = x̂_0 + (x̂_0 - x̂_0^prev) / (2r),  r = h_prev / h."""
    grid = sampling_grid(schedule, steps, **grid_options)
    prev: tuple[Tensor, float] | None = None  # (x̂_0, h) of the previous step
    for i, (cur, nxt) in enumerate(zip(grid, grid[1:])):
        x0 = denoiser(x, cur)
        h = nxt.lam - cur.lam
        d = x0
        if prev is not None and math.isfinite(h) and math.isfinite(prev[1]):
            d = x0 + (h / (2 * prev[1])) * (x0 - prev[0])
        x = (nxt.sigma / cur.sigma) * x - (nxt.alpha * math.expm1(-h)) * d
        prev = (x0, h)
        _report(callback, i, steps, x, x0)
    return x


def sample_dpmpp_2m_sde(denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, *, eta: float = 1.0,
                        generator: Generator = None, callback: Callback | None = None, **grid_options) -> Tensor:
    """SDE-DPM-Solver++(2M), Lu et al. 2022b §5 (k-diffusion `sample_dpmpp_2m_sde`, midpoint variant):
    x' = (σ'/σ) e^{-ηh} x + α'(1 - e^{-(1+η)h}) (x̂_0 + (x̂_0 - x̂_0^prev)/(2r)) + σ' sqrt(1 - e^{-2ηh}) z.
    η=1 is the SDE solver, η=0 reduces to DPM-Solver++(2M)."""
    grid = sampling_grid(schedule, steps, **grid_options)
    prev: tuple[Tensor, float] | None = None
    for i, (cur, nxt) in enumerate(zip(grid, grid[1:])):
        x0 = denoiser(x, cur)
        h = nxt.lam - cur.lam
        eta_h = eta * h if eta else 0.0
        data_coef = -nxt.alpha * math.expm1(-h - eta_h)
        x_next = (nxt.sigma / cur.sigma * math.exp(-eta_h)) * x + data_coef * x0
        if prev is not None and math.isfinite(h) and math.isfinite(prev[1]):
            x_next = x_next + (data_coef * h / (2 * prev[1])) * (x0 - prev[0])
        noise_std = nxt.sigma * math.sqrt(-math.expm1(-2 * eta_h))
        if noise_std > 0:
            x_next = x_next + noise_std * randn_like(x, generator)
        x, prev = x_next, (x0, h)
        _report(callback, i, steps, x, x0)
    return x


def _unipc_step(x: Tensor, cur: NoiseLevel, nxt: NoiseLevel, base: Tensor, nodes: Sequence[tuple[float, Tensor]],
                variant: str, new: Tensor | None = None) -> Tensor:
    """One UniP (new=None) or UniC (new = x̂_0 at nxt) update, Zhao et al. 2023 Alg. 2/3, data prediction.
    `base` is x̂_0 at `cur`, `nodes` older (λ, x̂_0) pairs (newest first); the order is len(nodes) + 1."""
    h = nxt.lam - cur.lam
    hh = -h  # data prediction integrates e^{-λ}
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else h_phi_1
    rks = [(lam_k - cur.lam) / h for lam_k, _ in nodes]
    diffs = [(x0_k - base) / rk for rk, (_, x0_k) in zip(rks, nodes)]
    if new is not None:
        rks, diffs = rks + [1.0], diffs + [new - base]
    order = len(nodes) + 1
    # Zhao et al. (Alg. 2/3): b_k = k! · hh·φ_{k+1}(hh) / B(h), with φ_1(z) = (e^z - 1)/z and
    # φ_{k+1}(z) = (φ_k(z) - 1/k!) / z; `phi` holds hh·φ_{k+1}(hh) at iteration k
    b, phi, factorial = [], h_phi_1 / hh - 1, 1.0
    for k in range(1, order + 1):
        b.append(phi * factorial / b_h)
        factorial *= k + 1
        phi = phi / hh - 1 / factorial
    x_next = (nxt.sigma / cur.sigma) * x - (nxt.alpha * h_phi_1) * base
    if diffs:
        size = len(diffs)
        if size == 1 and (new is not None or order == 2):
            rhos = [0.5]  # UniC-1 and UniP-2 use ρ = 1/2 (the paper's reference implementation)
        else:
            vander = torch.tensor([[rk**k for rk in rks] for k in range(size)], dtype=torch.float64)
            rhos = torch.linalg.solve(vander, torch.tensor(b[:size], dtype=torch.float64)).tolist()
        x_next = x_next - (nxt.alpha * b_h) * sum(rho * d for rho, d in zip(rhos, diffs))
    return x_next


def sample_unipc(denoiser: Denoiser, x: Tensor, schedule: Schedule, steps: int, *, order: int = 2,
                 variant: str = "bh2", corrector: bool = True, generator: Generator = None,
                 callback: Callback | None = None, **grid_options) -> Tensor:
    """UniPC (Zhao et al. 2023): UniP-`order` predictor with the UniC corrector applied to each new point
    using the evaluation the next predictor needs anyway (no extra evaluations), data prediction,
    B(h) = `bh1` (h) or `bh2` (e^h - 1). Warm-up and final steps use lower order."""
    if not 1 <= order <= 3 or variant not in ("bh1", "bh2"):
        raise ValueError(f"unipc needs order in 1..3 and variant 'bh1' or 'bh2', got order={order}, variant={variant!r}.")
    grid = sampling_grid(schedule, steps, **grid_options)
    history: list[tuple[float, Tensor]] = []  # (λ, x̂_0) at finite-λ points, newest last
    last = None  # (x, level, x̂_0, nodes) the previous predictor started from
    for i, (cur, nxt) in enumerate(zip(grid, grid[1:])):
        x0 = denoiser(x, cur)
        if corrector and last is not None and math.isfinite(last[1].lam):
            x = _unipc_step(last[0], last[1], cur, last[2], last[3], variant, new=x0)
        history = (history + [(cur.lam, x0)])[-order:] if math.isfinite(cur.lam) else []
        p = 1 if nxt.is_clean else max(1, min(order, len(history), steps - i))
        nodes = [history[-1 - k] for k in range(1, p)]
        last = (x, cur, x0, nodes)
        x = _unipc_step(x, cur, nxt, x0, nodes, variant)
        _report(callback, i, steps, x, x0)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "plms": sample_plms,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "unipc": sample_unipc,
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "heun": sample_heun,
    "lms": sample_lms,
}


VP_ONLY_SAMPLERS = ("ddpm", "ddim")  # written in ᾱ; `euler` (DDIM η=0) and `euler_a` run on any path


def check_sampler_supports(name: str, process: NoiseProcess) -> None:
    """Raise the sampler's own clear error now (not after training) if `name` is not defined on `process`."""
    if name in VP_ONLY_SAMPLERS:
        process.require_variance_preserving(f"The {name} sampler",
                                            "Use euler (DDIM with η=0 on any path) or euler_a (ancestral sampling).")


def nfe(sampler: str, steps: int, *, from_zero_snr: bool = False, process: NoiseProcess | None = None) -> int:
    """Model evaluations `sampler` makes in `steps` steps (`from_zero_snr`: the grid starts at ᾱ = 0, or at
    effectively infinite noise, ᾱ ≤ INFINITE_NOISE_ALPHA_BAR, as trailing grids on `cosine`/`sigmoid` do;
    `process`: Heun in the process's time, rectified flow's, corrects out of pure noise too)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler '{sampler}'; choose one of {', '.join(SAMPLERS)}.")
    if sampler == "heun" and process is not None and process.ode_in_process_time:
        return 2 * steps - 1
    if sampler == "heun":
        return 2 * steps - 1 - (1 if from_zero_snr and steps > 1 else 0)
    if sampler == "plms":
        return steps + 1 if steps >= (3 if from_zero_snr else 2) else steps
    return steps
