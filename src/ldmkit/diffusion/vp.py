"""Discrete variance-preserving schedules (DDPM family) as a `NoiseProcess`: ᾱ_t over T timesteps.

See ldmkit.diffusion.processes for the contract and the conventions (t = 0..T-1, α = sqrt(ᾱ), σ = sqrt(1-ᾱ),
k-sigma σ̃ = σ/α, log σ̃ interpolation between integer timesteps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from ldmkit.diffusion.parameterization import PathPoint
from ldmkit.diffusion.processes import (
    SIGMA_SPACINGS, SPACINGS, TIME_SAMPLINGS, TIMESTEP_SPACINGS, NoiseLevel, NoiseProcess, ProcessError,
    exponential_sigmas, karras_sigmas,
)

SCHEDULES = ("linear", "scaled_linear", "cosine", "sigmoid", "sigmoid_beta")

# Where ᾱ_{T-1} = 0 (zero terminal SNR), σ̃ is infinite. Interpolating log σ̃ and the Karras/exponential
# sigma spacings need a finite stand-in: ᾱ = 2^-24 (σ̃ ≈ 4096), the value diffusers uses for the same purpose
# (or ᾱ_{T-2}/2 if that is smaller). Integer timesteps keep the exact ᾱ = 0.
ZERO_SNR_ALPHA_BAR = 2.0**-24
_MIN_SIGMA = 1e-10  # stand-in for σ̃ = 0 (ᾱ = 1) when taking logs


def _compute_dtype(device: torch.device) -> torch.dtype:
    # float64 for the schedule arithmetic wherever the backend has it (1 - ᾱ near t=0 loses digits in float32)
    return torch.float32 if device.type == "mps" else torch.float64


@dataclass(frozen=True, eq=False)
class DiscreteVP(NoiseProcess):
    """ᾱ_t for t = 0..T-1 (stored float64 on CPU; device copies are cached on first use).
    `spec` records how `make_schedule` built it (name and options), for artifacts and reports."""

    kind: ClassVar[str] = "vp_discrete"
    variance_preserving: ClassVar[bool] = True
    grid_options: ClassVar[tuple[str, ...]] = ("sigma_min", "sigma_max", "rho", "steps_offset")

    alphas_cumprod: Tensor
    _device_tables: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    spec: dict | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        ac = torch.as_tensor(self.alphas_cumprod).detach().to("cpu", torch.float64)
        if ac.ndim != 1 or ac.numel() < 2:
            raise ValueError(f"Schedule.alphas_cumprod must be 1-D with at least 2 timesteps, got shape {tuple(ac.shape)}.")
        if not bool(((ac >= 0) & (ac <= 1)).all()) or not bool((ac[1:] <= ac[:-1]).all()) or float(ac[0]) == 0.0:
            raise ValueError(
                "Schedule.alphas_cumprod must lie in [0, 1], be non-increasing in t and start above 0 "
                f"(got first={float(ac[0]):.6g}, last={float(ac[-1]):.6g}); build one with make_schedule(...)."
            )
        object.__setattr__(self, "alphas_cumprod", ac)
        object.__setattr__(self, "_zero_terminal_snr", float(ac[-1]) == 0.0)  # read once: no host sync per step

    def __getstate__(self) -> dict:
        # pickles (checkpoints, DDP spawn) carry ᾱ only, not the per-device caches
        return {**self.__dict__, "_device_tables": {}}

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    @property
    def betas(self) -> Tensor:
        ac = self.alphas_cumprod
        return 1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])

    @property
    def sigmas(self) -> Tensor:
        """k-sigma σ̃_t = sqrt((1 - ᾱ_t) / ᾱ_t); +inf where ᾱ_t = 0."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    @property
    def snr(self) -> Tensor:
        """SNR_t = ᾱ_t / (1 - ᾱ_t) = 1 / σ̃_t²."""
        return self.alphas_cumprod / (1 - self.alphas_cumprod)

    @property
    def log_snr(self) -> Tensor:
        return self.alphas_cumprod.log() - torch.log1p(-self.alphas_cumprod)

    @property
    def has_zero_terminal_snr(self) -> bool:
        return self._zero_terminal_snr

    def _finite_terminal_alpha_bar(self) -> float:
        last, before = float(self.alphas_cumprod[-1]), float(self.alphas_cumprod[-2])
        if last > 0:
            return last
        return ZERO_SNR_ALPHA_BAR if ZERO_SNR_ALPHA_BAR < before else before / 2

    @property
    def sigma_min(self) -> float:
        """σ̃ at t = 0."""
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        """σ̃ at t = T-1, finite: for zero terminal SNR the stand-in ᾱ = 2^-24 (σ̃ ≈ 4096) is used."""
        ab = self._finite_terminal_alpha_bar()
        return math.sqrt((1 - ab) / ab)

    def tables(self, device: torch.device | str) -> dict[str, Tensor]:
        """Per-device cached copies: `alphas_cumprod`, `sqrt_alphas_cumprod`, `sqrt_one_minus_alphas_cumprod`,
        `log_sigmas` (with the zero-SNR stand-in). float64 except on MPS. Built once, so training steps don't copy."""
        device = torch.device(device)
        key = (device.type, device.index)
        if key not in self._device_tables:
            ac = self.alphas_cumprod
            finite_ac = ac.clone()
            finite_ac[-1] = self._finite_terminal_alpha_bar()
            log_sigmas = (0.5 * (torch.log1p(-finite_ac) - finite_ac.log())).clamp(min=math.log(_MIN_SIGMA))
            host = {
                "alphas_cumprod": ac,
                "sqrt_alphas_cumprod": ac.sqrt(),
                "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
                "log_sigmas": log_sigmas,
            }
            dtype = _compute_dtype(device)
            self._device_tables[key] = {k: v.to(device, dtype) for k, v in host.items()}
        return self._device_tables[key]

    def alpha_bar_at(self, t: Tensor | float) -> Tensor:
        """ᾱ at (possibly fractional) timesteps t, on t's device. Integers return the table value exactly;
        in between, log σ̃ is interpolated linearly (so `timestep_at_sigma` inverts it)."""
        t = torch.as_tensor(t)
        table = self.tables(t.device)
        t = t.to(table["alphas_cumprod"].dtype)
        if t.device.type == "cpu" and bool(((t < 0) | (t > self.num_timesteps - 1)).any()):  # no host sync off-CPU
            raise ValueError(f"timesteps must lie in [0, {self.num_timesteps - 1}], got {t.min().item()}..{t.max().item()}.")
        low = t.floor().clamp(0, self.num_timesteps - 2)
        w = t - low
        low = low.long()
        log_sigma = torch.lerp(table["log_sigmas"][low], table["log_sigmas"][low + 1], w)
        interpolated = torch.sigmoid(-2 * log_sigma)  # ᾱ = 1 / (1 + σ̃²)
        exact = table["alphas_cumprod"][t.round().long().clamp(0, self.num_timesteps - 1)]
        return torch.where(t == t.round(), exact, interpolated)

    def sigma_at(self, t: Tensor | float) -> Tensor:
        """k-sigma σ̃ at (possibly fractional) timesteps t."""
        ab = self.alpha_bar_at(t)
        return ((1 - ab) / ab).sqrt()

    def timestep_at_sigma(self, sigma: Tensor | float) -> Tensor:
        """Fractional timestep whose k-sigma is `sigma` (log σ̃ interpolation, clipped to [0, T-1])."""
        sigma = torch.as_tensor(sigma)
        table = self.tables(sigma.device)
        log_sigmas = table["log_sigmas"]
        log_sigma = sigma.to(log_sigmas.dtype).clamp(min=_MIN_SIGMA).log()
        low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, self.num_timesteps - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return low.to(log_sigma.dtype) + w
    # ---- the NoiseProcess contract ---------------------------------------------------------
    def _alpha_bar(self, t: Tensor) -> Tensor:
        if t.dtype in (torch.int64, torch.int32):
            return self.tables(t.device)["alphas_cumprod"][t]
        return self.alpha_bar_at(t)

    def path(self, t: Tensor) -> PathPoint:
        """α = sqrt(ᾱ_t), σ = sqrt(1 - ᾱ_t); integer t read the tables (as `q_sample`), fractional t interpolate."""
        t = torch.as_tensor(t)
        if t.dtype in (torch.int64, torch.int32):
            table = self.tables(t.device)
            return PathPoint(table["sqrt_alphas_cumprod"][t], table["sqrt_one_minus_alphas_cumprod"][t],
                             variance_preserving=True)
        ab = self.alpha_bar_at(t)
        return PathPoint(ab.sqrt(), (1 - ab).clamp(min=0).sqrt(), variance_preserving=True)

    def snr_at(self, t: Tensor) -> Tensor:
        ab = self._alpha_bar(torch.as_tensor(t))
        return ab / (1 - ab)

    def sample_time(self, batch: int, *, method: str = "uniform", mean: float = 0.0, std: float = 1.0,
                    mode_scale: float = 1.29, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> Tensor:
        """Integer timesteps (B,) in [0, T-1] (see `sample_timesteps`)."""
        return sample_timesteps(batch, self.num_timesteps, method=method, mean=mean, std=std, mode_scale=mode_scale,
                                generator=generator, device=device)

    def validation_time(self, batch: int, *, generator: torch.Generator | None = None,
                        device: torch.device | str | None = None) -> Tensor:
        """Fractional timesteps (B,) float32 at the SNRs of uniform rectified-flow time u ~ U[0, 1): σ̃ = u/(1-u),
        the reference noise levels every process validates on, so `val/x0_mse` compares across processes (the
        x0 error of a denoiser depends on the noise level only through the SNR). Levels outside the schedule's
        range are clipped to t = 0 / T-1 (without zero terminal SNR, u > 1/(1 + sqrt(SNR_{T-1})) lands on T-1)."""
        u = torch.rand(batch, generator=generator, device=device).clamp(1e-5, 1.0).to(torch.float64)
        return self.timestep_at_sigma(u / (1 - u)).float()

    def time_bucket(self, t: Tensor, buckets: int) -> Tensor:
        return (t * buckets) // self.num_timesteps

    def to_artifact(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        config = {"kind": self.kind, "num_timesteps": self.num_timesteps, "schedule": self.spec}
        return config, {"alphas_cumprod": self.alphas_cumprod.detach().to(torch.float64)}

    @classmethod
    def from_artifact(cls, config: dict[str, Any], tensors: dict[str, Tensor]) -> "DiscreteVP":
        if "alphas_cumprod" not in tensors:
            raise ProcessError("a vp_discrete process needs its 'alphas_cumprod' tensor in the artifact; re-export it.")
        return cls(alphas_cumprod=tensors["alphas_cumprod"].to(torch.float64), spec=config.get("schedule"))

    def sampling_grid(
        self,
        steps: int,
        spacing: str = "trailing",
        *,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        rho: float = 7.0,
        steps_offset: int = 0,
    ) -> list[NoiseLevel]:
        """The `steps + 1` noise levels a sampler visits, from the first model evaluation to clean data (ᾱ = 1).

        `spacing` is a timestep spacing (`leading`, `trailing`, `linspace`; ᾱ from the schedule, interpolated at
        fractional t) or a sigma spacing (`karras` with `rho`, `exponential`) between `sigma_min`/`sigma_max`
        (default: `Schedule.sigma_min`/`sigma_max`, the latter ≈ 4096 for zero-terminal-SNR schedules),
        whose timesteps come from `Schedule.timestep_at_sigma`.
        """
        if spacing in TIMESTEP_SPACINGS:
            if sigma_min is not None or sigma_max is not None:
                raise ValueError(f"sigma_min/sigma_max only apply to sigma spacings {SIGMA_SPACINGS}, not spacing='{spacing}'.")
            ts = timestep_spacing(self.num_timesteps, steps, spacing, steps_offset=steps_offset)
            alpha_bars = self.alpha_bar_at(ts)
        elif spacing in SIGMA_SPACINGS:
            if steps < 1:
                raise ValueError(f"steps must be >= 1, got {steps}.")
            lo = self.sigma_min if sigma_min is None else float(sigma_min)
            hi = self.sigma_max if sigma_max is None else float(sigma_max)
            if not 0 < lo < hi:
                raise ValueError(f"Need 0 < sigma_min < sigma_max for spacing='{spacing}', got {lo} and {hi}.")
            sigmas = karras_sigmas(steps, lo, hi, rho) if spacing == "karras" else exponential_sigmas(steps, lo, hi)
            ts = self.timestep_at_sigma(sigmas)
            alpha_bars = 1 / (1 + sigmas.square())
        else:
            raise ValueError(f"Unknown spacing '{spacing}'; choose one of {', '.join(SPACINGS)}.")
        if steps > 1 and not bool((alpha_bars[1:] > alpha_bars[:-1]).all()):
            raise ValueError(
                f"spacing='{spacing}' with steps={steps} gives repeated noise levels (timesteps {ts.tolist()}); use fewer steps."
            )
        levels = [NoiseLevel.from_alpha_bar(float(t), float(ab)) for t, ab in zip(ts, alpha_bars)]
        return levels + [NoiseLevel.from_alpha_bar(-1.0, 1.0)]


Schedule = DiscreteVP  # the name before noise processes (kept for imports and pickles)


# ---- discrete schedules ----------------------------------------------------------------------


def _betas_from_alpha_bar_fn(fn: Callable[[float], float], num_timesteps: int, max_beta: float) -> Tensor:
    # Nichol & Dhariwal 2021 eq. 17: β_t = min(1 - ᾱ(t/T) / ᾱ((t-1)/T), max_beta), here with t = i+1
    betas = [min(1 - fn((i + 1) / num_timesteps) / fn(i / num_timesteps), max_beta) for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


def _sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def rescale_zero_terminal_snr(alphas_cumprod: Tensor) -> Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(ᾱ) so that ᾱ_{T-1} = 0 and ᾱ_0 is unchanged."""
    sqrt_ab = alphas_cumprod.to(torch.float64).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    return sqrt_ab.square()


_DEFAULT_BETAS = {"linear": (1e-4, 2e-2), "scaled_linear": (8.5e-4, 1.2e-2), "sigmoid_beta": (1e-4, 2e-2)}
_EXTRA_OPTIONS = {"cosine": {"cosine_s": 0.008, "max_beta": 0.999}, "sigmoid": {"start": -3.0, "end": 3.0, "tau": 1.0, "max_beta": 0.999}}


def make_schedule(
    name: str = "scaled_linear",
    num_timesteps: int = 1000,
    *,
    zero_terminal_snr: bool = False,
    beta_start: float | None = None,
    beta_end: float | None = None,
    **kw: Any,
) -> Schedule:
    """Build a discrete schedule by name.

    - `linear`: DDPM (Ho et al. 2020) β linear in [beta_start, beta_end] = [1e-4, 0.02].
    - `scaled_linear`: Stable Diffusion, sqrt(β) linear in [sqrt(0.00085), sqrt(0.012)].
    - `cosine`: Nichol & Dhariwal 2021, ᾱ(t) ∝ cos²((t/T + s)/(1 + s) · π/2), s = `cosine_s` = 0.008,
      β clipped at `max_beta` = 0.999 (diffusers `squaredcos_cap_v2`).
    - `sigmoid`: Chen 2023 ("On the importance of noise scheduling"), ᾱ(t) from a sigmoid over
      [start, end] = [-3, 3] with temperature tau = 1, β clipped at `max_beta` like cosine.
    - `sigmoid_beta`: GeoDiff's β = sigmoid(linspace(-6, 6)) · (beta_end - beta_start) + beta_start
      (what diffusers calls `beta_schedule="sigmoid"`).
    `zero_terminal_snr=True` applies Lin et al. 2023 Alg. 1 to any of them.
    """
    if name not in SCHEDULES:
        raise ValueError(f"Unknown schedule '{name}'; choose one of {', '.join(SCHEDULES)}.")
    if num_timesteps < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps}.")
    allowed = _EXTRA_OPTIONS.get(name, {})
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise ValueError(f"Schedule '{name}' takes no option(s) {unknown}; its options are {sorted(allowed) or 'none'}.")
    opts = {**allowed, **kw}
    T = num_timesteps
    if name in _DEFAULT_BETAS:
        default_start, default_end = _DEFAULT_BETAS[name]
        beta_start = default_start if beta_start is None else float(beta_start)
        beta_end = default_end if beta_end is None else float(beta_end)
        if name == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        elif name == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        else:
            betas = torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (beta_end - beta_start) + beta_start
    else:
        if beta_start is not None or beta_end is not None:
            raise ValueError(f"Schedule '{name}' is defined by ᾱ(t), not by betas: drop beta_start/beta_end.")
        if name == "cosine":
            s = float(opts["cosine_s"])
            fn = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        else:
            start, end, tau = float(opts["start"]), float(opts["end"]), float(opts["tau"])
            v_start, v_end = _sigmoid(start / tau), _sigmoid(end / tau)
            fn = lambda u: (v_end - _sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)  # noqa: E731
        betas = _betas_from_alpha_bar_fn(fn, T, float(opts["max_beta"]))
    alphas_cumprod = torch.cumprod(1 - betas, dim=0)
    if zero_terminal_snr:
        alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
    spec = {"name": name, "num_timesteps": T, "zero_terminal_snr": bool(zero_terminal_snr), **opts}
    if name in _DEFAULT_BETAS:
        spec.update(beta_start=beta_start, beta_end=beta_end)
    return DiscreteVP(alphas_cumprod=alphas_cumprod, spec=spec)


def q_sample(schedule: Schedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Forward process q(x_t | x_0): x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε, for integer t of shape (B,)."""
    table = schedule.tables(x0.device)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    alpha = table["sqrt_alphas_cumprod"][t].to(x0.dtype).view(shape)
    sigma = table["sqrt_one_minus_alphas_cumprod"][t].to(x0.dtype).view(shape)
    return alpha * x0 + sigma * noise


def timestep_spacing(num_timesteps: int, steps: int, spacing: str = "trailing", *, steps_offset: int = 0) -> Tensor:
    """Descending sampling timesteps (float64), Lin et al. 2023 Table 2:
    `leading`: (0, k, 2k, ..) + steps_offset with k = T // steps (DDIM / SD default; never reaches T-1);
    `trailing`: round(T - i·T/steps) - 1 (starts at T-1); `linspace`: linspace(0, T-1, steps), fractional."""
    if steps < 1 or steps > num_timesteps:
        raise ValueError(f"steps must be in [1, num_timesteps={num_timesteps}], got {steps}.")
    if spacing == "leading":
        ts = torch.arange(steps, dtype=torch.float64) * (num_timesteps // steps) + steps_offset
        ts = ts.flip(0)
        if float(ts[0]) > num_timesteps - 1:
            raise ValueError(f"steps_offset={steps_offset} pushes the first timestep past T-1={num_timesteps - 1}.")
    elif spacing == "trailing":
        ts = torch.round(num_timesteps - torch.arange(steps, dtype=torch.float64) * (num_timesteps / steps)) - 1
    elif spacing == "linspace":
        if steps == 1:
            return torch.tensor([num_timesteps - 1.0], dtype=torch.float64)
        ts = torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).flip(0)
    else:
        raise ValueError(f"Unknown timestep spacing '{spacing}'; choose one of {', '.join(TIMESTEP_SPACINGS)}.")
    return ts


def sample_timesteps(
    batch_size: int,
    num_timesteps: int,
    *,
    method: str = "uniform",
    mean: float = 0.0,
    std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Integer timesteps (B,) in [0, T-1]. `uniform`, `logit_normal` (Esser et al. 2024, §3.1):
    u = sigmoid(N(mean, std²)), t = floor(u·T), so larger `mean` favours noisier timesteps, or `mode`
    (ibid. eq. 20): u = 1 - v - mode_scale·(cos²(πv/2) - 1 + v), v ~ U[0, 1), t = floor(u·T)."""
    if method == "uniform":
        return torch.randint(0, num_timesteps, (batch_size,), generator=generator, device=device)
    if method in ("logit_normal", "mode"):
        if method == "mode":
            v = torch.rand(batch_size, generator=generator, device=device)
            u = 1 - v - mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
        else:
            u = torch.sigmoid(mean + std * torch.randn(batch_size, generator=generator, device=device))
        return (u * num_timesteps).long().clamp(0, num_timesteps - 1)
    raise ValueError(f"Unknown timestep sampling '{method}'; choose one of {', '.join(TIME_SAMPLINGS)}.")
