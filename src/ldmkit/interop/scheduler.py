"""diffusers scheduler configs <-> ldmkit's discrete VP process and prediction (pure torch).

The training process of SD 1.x/2.x is DDPM's discrete VP schedule with `scaled_linear` betas
(sqrt(beta) linear in [sqrt(0.00085), sqrt(0.012)], T = 1000); 2.x-v models predict v (Salimans & Ho
2022). A schedule diffusers cannot name is exported as its exact betas (`trained_betas`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ldmkit.interop.vae import InteropError

PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_NAMES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine", "sigmoid": "sigmoid_beta"}
SD_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}


def process_from_scheduler(cfg: Mapping[str, Any]) -> tuple[dict[str, Any], torch.Tensor, str]:
    """(process config {kind, num_timesteps, schedule}, alphas_cumprod (T,) float64, prediction) of a scheduler config."""
    from ldmkit.diffusion.schedules import make_schedule

    prediction = cfg.get("prediction_type", "epsilon")
    if prediction not in PREDICTIONS:
        raise InteropError(f"scheduler prediction_type={prediction!r}; supported: {sorted(PREDICTIONS)}.")
    if "shift" in cfg or "use_dynamic_shifting" in cfg or "sigma_min" in cfg and cfg.get("_class_name", "").startswith("FlowMatch"):
        raise InteropError(f"scheduler {cfg.get('_class_name')} is a flow-matching scheduler (SD3/Flux): not supported yet; "
                           "SD 1.x/2.x discrete schedules are.")
    steps = int(cfg.get("num_train_timesteps", 1000))
    zero_snr = bool(cfg.get("rescale_betas_zero_snr", False))
    if cfg.get("trained_betas") is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float64)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        spec = {"name": "trained_betas", "num_timesteps": len(betas), "zero_terminal_snr": False}
        if zero_snr:
            from ldmkit.diffusion.schedules import rescale_zero_terminal_snr

            alphas_cumprod, spec["zero_terminal_snr"] = rescale_zero_terminal_snr(alphas_cumprod), True
    else:
        kind = cfg.get("beta_schedule", "linear")
        if kind not in _NAMES:
            raise InteropError(f"scheduler beta_schedule={kind!r}; supported: {sorted(_NAMES)} or trained_betas.")
        name = _NAMES[kind]
        betas = {} if name == "cosine" else {"beta_start": float(cfg.get("beta_start", 1e-4)), "beta_end": float(cfg.get("beta_end", 0.02))}
        schedule = make_schedule(name, steps, zero_terminal_snr=zero_snr, **betas)
        alphas_cumprod = schedule.alphas_cumprod.to(torch.float64)
        spec = {"name": name, "num_timesteps": steps, "zero_terminal_snr": zero_snr, **betas}
    return {"kind": "vp_discrete", "num_timesteps": int(alphas_cumprod.numel()), "schedule": spec}, alphas_cumprod, PREDICTIONS[prediction]


def scheduler_config(process: Mapping[str, Any], alphas_cumprod: torch.Tensor | None, prediction: str) -> dict[str, Any]:
    """A `DDIMScheduler` config reproducing the process and prediction (exact betas when diffusers has no name)."""
    if process.get("kind", "vp_discrete") != "vp_discrete":
        raise InteropError(f"process kind {process.get('kind')!r} has no StableDiffusionPipeline scheduler; only discrete VP "
                           "processes export (rectified flow: not supported yet).")
    names = {v: k for k, v in PREDICTIONS.items()}
    if prediction not in names:
        raise InteropError(f"prediction {prediction!r} cannot be exported; supported: {sorted(names)}.")
    spec = process.get("schedule") or {}
    out: dict[str, Any] = {
        "_class_name": "DDIMScheduler", "num_train_timesteps": int(process.get("num_timesteps") or len(alphas_cumprod)),
        "prediction_type": names[prediction], "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
        "timestep_spacing": "leading", "rescale_betas_zero_snr": False, "beta_schedule": "linear",
        "beta_start": 0.0001, "beta_end": 0.02,
    }
    named = {v: k for k, v in _NAMES.items()}
    plain = spec.get("name") in named and not (spec.get("name") == "cosine" and
                                               (spec.get("cosine_s", 0.008), spec.get("max_beta", 0.999)) != (0.008, 0.999))
    if plain:
        out.update(beta_schedule=named[spec["name"]], rescale_betas_zero_snr=bool(spec.get("zero_terminal_snr", False)))
        if "beta_start" in spec:
            out.update(beta_start=float(spec["beta_start"]), beta_end=float(spec["beta_end"]))
        return out
    if alphas_cumprod is None:
        raise InteropError("the process has no named schedule and no alphas_cumprod tensor; it cannot be exported.")
    ac = alphas_cumprod.to(torch.float64)
    if float(ac[-1]) == 0.0:  # zero terminal SNR: let diffusers rescale the (finite) betas it is given
        raise InteropError("a zero-terminal-SNR process without a named schedule cannot be written as diffusers betas.")
    betas = 1 - ac / torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]])
    out["trained_betas"] = betas.tolist()
    return out
