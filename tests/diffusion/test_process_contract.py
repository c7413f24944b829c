"""The noise-process contract beyond the VP schedules: a toy linear path (x_t = (1-t) x_0 + t ε, the
rectified-flow path) written against `NoiseProcess` alone drives the parameterisations (incl. `flow`), the
objective, guidance rescale and the general samplers; VP-only samplers refuse it by name."""

from __future__ import annotations

import pytest
import torch

from ldmkit.diffusion import DenoisingObjective, classifier_free_guidance, sample
from ldmkit.diffusion.parameterization import ALL_PREDICTIONS, PathPoint, convert, from_x0, target, to_x0
from ldmkit.diffusion.processes import NoiseLevel, NoiseProcess, ProcessError


class LinearPath(NoiseProcess):
    """α = 1 - t, σ = t on t ∈ [0, 1]; the network sees 1000 t (SD3's convention)."""

    kind = "toy_linear"

    def path(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return PathPoint(1 - t, t, -torch.ones_like(t), torch.ones_like(t))

    @property
    def has_zero_terminal_snr(self):
        return True

    def model_time(self, t):
        return 1000 * t

    def from_model_time(self, t_model):
        return t_model / 1000

    def sample_time(self, batch, *, method="uniform", mean=0.0, std=1.0, generator=None, device=None):
        return torch.rand(batch, generator=generator, device=device, dtype=torch.float64)

    def sampling_grid(self, steps, spacing="linspace"):
        ts = torch.linspace(1, 0, steps + 1, dtype=torch.float64).tolist()
        return [NoiseLevel.from_alpha_sigma(t if t else -1.0, 1 - t, t, -1.0, 1.0) for t in ts]


def _point(t: float) -> PathPoint:
    return LinearPath().path(torch.full((2,), t, dtype=torch.float64))


@pytest.mark.parametrize("source", ALL_PREDICTIONS)
@pytest.mark.parametrize("destination", ALL_PREDICTIONS)
def test_conversions_on_a_non_vp_path_including_flow(source, destination):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    p = _point(0.3)
    x_t = 0.7 * x0 + 0.3 * eps
    truth = {"x0": x0, "eps": eps, "v": 0.7 * eps - 0.3 * x0, "flow": eps - x0}  # rectified flow: u = ε - x_0
    for name in ALL_PREDICTIONS:
        torch.testing.assert_close(target(name, x0, eps, p), truth[name])
    torch.testing.assert_close(convert(truth[source], x_t, p, source, destination), truth[destination])
    torch.testing.assert_close(to_x0(from_x0(x0, x_t, p, source), x_t, p, source), x0)


def test_flow_needs_the_derivatives_and_says_so():
    x = torch.randn(2, 3)
    with pytest.raises(ValueError, match="prediction='flow' needs the process's time derivatives"):
        to_x0(x, x, 0.5, "flow")  # a VP ᾱ carries no α', σ'


def test_objective_on_the_linear_path_is_zero_for_the_true_velocity():
    x0 = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    seen = {}

    def model(x_t, t_model, cond):
        t = (t_model / 1000).view(-1, 1, 1, 1)
        seen["t"] = t_model
        return (x_t - x0) / t  # u = ε - x_0 recovered from x_t = (1-t) x_0 + t ε
    for weighting in ("uniform", "min_snr", "snr"):
        objective = DenoisingObjective(LinearPath(), prediction="flow", weighting=weighting)
        loss = objective(model, x0, None, torch.Generator().manual_seed(2))
        assert loss.shape == (4,) and loss.abs().max() < 1e-20
        assert seen["t"].min() >= 0 and seen["t"].max() <= 1000 and seen["t"].max() > 1  # model time, not t


def test_general_samplers_run_and_vp_only_samplers_refuse():
    mean = torch.tensor([[0.5, -1.0], [2.0, 0.0]], dtype=torch.float64)  # (H, W): point-mass data

    def model(x, t_model, cond):  # the exact velocity u = ε - x_0 = (x_t - x_0) / t of point-mass data
        t = (t_model / 1000).view(-1, 1, 1, 1).clamp(min=1e-12)
        return (x - mean) / t

    noise = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    guided = classifier_free_guidance(model, torch.ones(2), torch.zeros(1), 3.0, rescale=0.5)
    for name in ("euler", "heun", "dpmpp_2m", "unipc", "euler_a", "lms", "plms", "dpmpp_2m_sde"):
        out = sample(guided, noise, LinearPath(), name, 8, prediction="flow", spacing="linspace",
                     generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(out, mean.expand_as(out))  # every sampler lands on the data point
    for name in ("ddim", "ddpm"):
        with pytest.raises(ProcessError, match=f"The {name} sampler is defined for variance-preserving processes.*toy_linear"):
            sample(model, noise, LinearPath(), name, 4, prediction="flow", spacing="linspace")
