"""lit.optim.param_groups: the one helper that gives every stage its optimizer groups."""

from __future__ import annotations

import functools

import pytest
import torch

from ldmkit.lit.autoencoder import AutoencoderModule
from ldmkit.lit.optim import param_groups, weight_decay_param_groups
from ldmkit.nn.autoencoder import AutoencoderConfig, AutoencoderKL
from tests.lit.test_autoencoder import TINY


def _ids(group: dict) -> list[int]:
    return [id(p) for p in group["params"]]


def test_split_is_nanogpt_groups_and_unsplit_is_every_parameter_in_order():
    net = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    split = param_groups(net)
    assert [(g["name"], _ids(g)) for g in split] == [(g["name"], _ids(g)) for g in weight_decay_param_groups(net)]
    assert _ids(split[0]) == [id(net[1].weight)] and split[1]["weight_decay"] == 0.0
    (whole,) = param_groups(net, split_weight_decay=False)
    assert whole.keys() == {"params"} and _ids(whole) == [id(p) for p in net.parameters()]


def test_autoencoder_default_keeps_one_group_and_the_option_splits():
    def optimizer(**kwargs) -> tuple[torch.optim.Optimizer, AutoencoderModule]:
        module = AutoencoderModule(AutoencoderKL(AutoencoderConfig(**TINY)),
                                   functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1), **kwargs)
        return module.configure_optimizers()["optimizer"], module

    default, module = optimizer()
    assert len(default.param_groups) == 1 and _ids(default.param_groups[0]) == [id(p) for p in module.autoencoder.parameters()]
    assert default.param_groups[0]["weight_decay"] == 0.1
    split, module = optimizer(split_weight_decay=True)
    assert [g["weight_decay"] for g in split.param_groups] == [0.1, 0.0]
    no_decay = {id(p) for p in split.param_groups[1]["params"]}
    assert all(id(p) in no_decay for n, p in module.autoencoder.named_parameters() if p.ndim < 2)  # biases, norm gains
    assert sum(len(g["params"]) for g in split.param_groups) == len(list(module.autoencoder.parameters()))


@pytest.mark.parametrize("split", [False, True])
def test_ldm_default_is_todays_single_group_and_the_option_splits(compose_cfg, tiny_artifacts, split):
    from hydra.utils import instantiate

    from tests.lit.test_ldm import TINY, artifacts_overrides

    cfg = compose_cfg([*TINY, *artifacts_overrides(tiny_artifacts), "model.optimizer.weight_decay=0.05",
                       *(["model.split_weight_decay=true"] if split else [])])
    module = instantiate(cfg.model)
    optimizer = module.configure_optimizers()["optimizer"]
    backbone = list(module.backbone.parameters())
    if not split:  # what `optimizer_factory(params=backbone.parameters())` built before the helper
        reference = module.optimizer_factory(params=module.backbone.parameters()).state_dict()
        state = optimizer.state_dict()  # its lr is already set by the warm-up schedule
        for group in (*state["param_groups"], *reference["param_groups"]):
            group.pop("lr"), group.pop("initial_lr", None)
        assert state == reference and _ids(optimizer.param_groups[0]) == [id(p) for p in backbone]
    else:
        assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
        assert sorted(id(p) for g in optimizer.param_groups for p in g["params"]) == sorted(id(p) for p in backbone)
