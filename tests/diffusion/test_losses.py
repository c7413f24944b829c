import pytest
import torch

from ldmkit.diffusion.losses import DenoisingLoss, loss_weight, sample_timesteps
from ldmkit.diffusion.parameterization import PREDICTIONS, from_x0
from ldmkit.diffusion.schedules import make_schedule

SCHEDULE = make_schedule("scaled_linear")


def _model_with_x0_error(x0, delta, prediction, schedule=SCHEDULE):
    """A model whose x̂_0 is exactly x0 + delta, answering in `prediction` form."""
    def model(x_t, t, cond):
        assert t.dtype == torch.long and cond == "text"
        return from_x0(x0 + delta, x_t, schedule.alphas_cumprod[t], prediction).to(x_t.dtype)
    return model


@pytest.mark.parametrize("weighting", ["uniform", "min_snr", "snr", "edm"])
def test_weightings_mean_the_same_objective_for_every_parameterisation(weighting):
    # x̂_0 - x_0 = δ with ||δ||² = 1 per sample: the loss must equal the weighting's x0-space weight,
    # whatever the network predicts (uniform: the parameterisation's own MSE, c = SNR, SNR+1, 1)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 2, 4, 4, generator=g, dtype=torch.float64)
    delta = torch.ones_like(x0)
    for prediction in PREDICTIONS:
        loss_fn = DenoisingLoss(prediction=prediction, weighting=weighting, min_snr_gamma=5.0, edm_sigma_data=0.5)
        loss, t = loss_fn(_model_with_x0_error(x0, delta, prediction), x0, SCHEDULE, cond="text",
                          generator=torch.Generator().manual_seed(1))
        snr = SCHEDULE.snr[t]
        if weighting == "uniform":
            expected = {"eps": snr, "v": snr + 1, "x0": torch.ones_like(snr)}[prediction]
        else:  # min_snr: the default floor `auto` is 0 (Hang et al.) on this schedule, which never reaches SNR = 0
            expected = {"min_snr": snr.clamp(max=5.0), "snr": snr, "edm": snr + 1 / 0.5**2}[weighting]
        assert loss.shape == (64,) and t.shape == (64,) and t.dtype == torch.long
        assert torch.allclose(loss.double(), expected, rtol=1e-5), (weighting, prediction)


def test_min_snr_weights_match_hang_et_al():
    snr = torch.tensor([0.0, 0.1, 1.0, 5.0, 20.0], dtype=torch.float64)
    gamma = 5.0
    eps = loss_weight("min_snr", snr, "eps", min_snr_gamma=gamma)
    assert torch.allclose(eps[1:], torch.minimum(snr, torch.tensor(gamma))[1:] / snr[1:])
    assert eps[0] == 1.0  # the SNR -> 0 limit, not 0/0
    v = loss_weight("min_snr", snr, "v", min_snr_gamma=gamma, min_snr_floor=0.0)
    assert torch.allclose(v, torch.minimum(snr, torch.tensor(gamma)) / (snr + 1))
    assert torch.allclose(loss_weight("min_snr", snr, "x0", min_snr_gamma=gamma, min_snr_floor=0.0), snr.clamp(max=gamma))
    # σ_data = 1: the EDM weighting is exactly v-prediction's plain MSE
    assert torch.allclose(loss_weight("edm", snr, "v", sigma_data=1.0), torch.ones_like(snr))


def test_min_snr_floor_keeps_zero_terminal_snr_timesteps_trained():
    # Hang et al.'s v-weight min(SNR, γ)/(SNR + 1) is exactly 0 at the zero-SNR timestep every trailing sampler
    # starts from (and <= 3e-3 for t >= 900); floor 1 (the `auto` default here) holds the x0-space weight at 1
    # below SNR = 1.
    zsnr = make_schedule("scaled_linear", zero_terminal_snr=True)
    snr = zsnr.snr
    hang = loss_weight("min_snr", snr, "v", min_snr_floor=0.0)
    floored = loss_weight("min_snr", snr, "v", min_snr_floor=1.0)
    assert hang[-1] == 0 and hang[900:].max() < 3e-3  # the hazard, reproduced
    assert floored[-1] == 1.0 and floored[900:].min() > 0.99 and floored[900:].min() > floored.mean()
    assert torch.equal(floored[snr >= 1], hang[snr >= 1])  # Hang et al. unchanged from SNR = 1 up
    assert torch.allclose(loss_weight("min_snr", snr, "x0", min_snr_floor=1.0), snr.clamp(min=1.0, max=5.0))
    assert torch.equal(loss_weight("min_snr", snr, "eps"), loss_weight("min_snr", snr, "eps", min_snr_floor=0.0))
    # through the loss: an x̂_0 error at the noisiest timesteps (SNR < 2e-3 for t >= 950) costs its full weight
    x0 = torch.randn(1024, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for floor, positive in ((1.0, True), (0.0, False)):
        loss, t = DenoisingLoss(prediction="v", weighting="min_snr", min_snr_floor=floor)(
            _model_with_x0_error(x0, torch.ones_like(x0), "v", zsnr), x0, zsnr, cond="text",
            generator=torch.Generator().manual_seed(2))
        last = loss[t >= 950]
        assert last.numel() > 20 and bool((last > 0.99).all()) == positive and bool((last < 2e-3).all()) != positive
    with pytest.raises(ValueError, match="min_snr_floor must be 'auto' or lie in"):
        DenoisingLoss(prediction="v", weighting="min_snr", min_snr_gamma=5.0, min_snr_floor=6.0)
    with pytest.raises(ValueError, match="min_snr_floor must be 'auto' or lie in"):
        DenoisingLoss(prediction="v", weighting="min_snr", min_snr_floor="always")


@pytest.mark.parametrize("prediction", ["v", "x0"])
def test_min_snr_floor_auto_floors_only_zero_terminal_snr_processes(prediction):
    # issue 13 follow-up: `auto` keeps Hang et al. exactly where SNR never reaches 0 (scaled_linear, the
    # quickstart's v + min_snr recipe: same weights as before the floor existed) and floors at 1 where it does
    from ldmkit.diffusion.flow import RectifiedFlow
    from ldmkit.diffusion.objectives import DenoisingObjective

    def weights(process, floor):
        t = torch.arange(1000) if process.variance_preserving else torch.linspace(1e-3, 1, 1000, dtype=torch.float64)
        objective = DenoisingObjective(process, prediction=prediction, weighting="min_snr", min_snr_floor=floor)
        return objective.weight(t, process.path(t))

    sd, zsnr, flow = make_schedule("scaled_linear"), make_schedule("scaled_linear", zero_terminal_snr=True), RectifiedFlow()
    assert torch.equal(weights(sd, "auto"), weights(sd, 0.0)) and torch.equal(weights(sd, None), weights(sd, 0.0))
    assert not torch.equal(weights(sd, "auto"), weights(sd, 1.0))  # SD's SNR < 1 half keeps Hang et al.'s weights
    assert torch.equal(weights(zsnr, "auto"), weights(zsnr, 1.0)) and weights(zsnr, "auto")[-1] > 0
    assert torch.equal(weights(flow, "auto"), weights(flow, 1.0))
    assert torch.equal(weights(zsnr, 0.0), weights(zsnr, 0.0)) and weights(zsnr, 0.0)[-1] == 0  # numbers honoured
    assert torch.equal(weights(sd, 2.0), weights(sd, 2.0)) and not torch.equal(weights(sd, 2.0), weights(sd, "auto"))


def test_timestep_sampling():
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(20000, 1000, generator=g)
    assert t.min() >= 0 and t.max() <= 999 and abs(t.double().mean().item() - 499.5) < 5
    ln = sample_timesteps(20000, 1000, method="logit_normal", generator=g)
    assert abs(ln.double().median().item() - 500) < 10 and ln.double().std() < t.double().std()  # peaked mid-way
    shifted = sample_timesteps(20000, 1000, method="logit_normal", mean=1.0, generator=g)
    assert shifted.double().median() > 700  # sigmoid(1) ≈ 0.73: noisier timesteps
    a = sample_timesteps(8, 1000, method="logit_normal", generator=torch.Generator().manual_seed(3))
    b = sample_timesteps(8, 1000, method="logit_normal", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="choose one of"):
        sample_timesteps(8, 1000, method="beta")


def _recover_noise(model_noises, x0):
    def model(x_t, t, cond):
        ab = SCHEDULE.alphas_cumprod[t].view(-1, 1, 1, 1).to(x_t.dtype)
        eps = (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
        model_noises.append(eps)
        return eps  # the noise actually inside x_t
    return model


def test_offset_noise_is_part_of_the_target():
    x0 = torch.zeros(512, 3, 8, 8, dtype=torch.float64)
    seen = []
    loss, _ = DenoisingLoss(offset_noise=2.0)(_recover_noise(seen, x0), x0, SCHEDULE, generator=torch.Generator().manual_seed(0))
    assert loss.max() < 1e-16  # predicting the noise in x_t exactly is a perfect score: the offset is in the target
    channel_means = seen[0].mean(dim=(2, 3))  # (B, C): offset·N(0,1) + mean of 64 unit normals
    assert channel_means.var().item() == pytest.approx(4.0 + 1 / 64, rel=0.1)


def test_input_perturbation_is_not_in_the_target():
    x0 = torch.zeros(512, 2, 4, 4, dtype=torch.float64)
    loss, _ = DenoisingLoss(input_perturbation=0.1)(_recover_noise([], x0), x0, SCHEDULE, generator=torch.Generator().manual_seed(0))
    assert loss.mean().item() == pytest.approx(0.1**2, rel=0.05)  # the model sees ε + 0.1 ξ, must answer ε


def test_zero_terminal_snr_weights_stay_finite():
    zsnr = make_schedule("scaled_linear", zero_terminal_snr=True)
    x0 = torch.randn(4, 1, 2, 2)
    for prediction in PREDICTIONS:
        for weighting in ["uniform", "min_snr", "snr"]:
            loss_fn = DenoisingLoss(prediction=prediction, weighting=weighting, timestep_sampling="logit_normal",
                                    logit_normal_mean=8.0)  # almost always t = 999, where SNR = 0
            loss, t = loss_fn(lambda x, t, c: torch.zeros_like(x), x0, zsnr, generator=torch.Generator().manual_seed(0))
            assert (t == 999).any() and torch.isfinite(loss).all()
    with pytest.raises(ValueError, match="prediction='v'"):
        DenoisingLoss(prediction="eps", weighting="edm")(lambda x, t, c: x, x0, zsnr)


def test_no_host_sync(monkeypatch):
    # everything that reads a tensor's value on the host raises during the loss call
    loss_fn = DenoisingLoss(prediction="v", weighting="min_snr", timestep_sampling="logit_normal", offset_noise=0.1,
                            input_perturbation=0.1)
    x0 = torch.randn(4, 3, 8, 8)
    SCHEDULE.tables(x0.device)  # built once per device, like the first training step

    def sync(*args, **kwargs):
        raise AssertionError("host sync in the loss")

    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    loss, t = loss_fn(lambda x, t, c: x * 2, x0, SCHEDULE)
    monkeypatch.undo()
    assert loss.shape == (4,) and t.dtype == torch.long and torch.isfinite(loss).all()


def test_bad_options_fail_fast():
    with pytest.raises(ValueError, match="choose one of"):
        DenoisingLoss(weighting="p2")
    with pytest.raises(ValueError, match="choose one of"):
        DenoisingLoss(prediction="epsilon")
    assert DenoisingLoss(weighting="simple").weighting == "uniform"
