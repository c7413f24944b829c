import json
import subprocess
import sys

FORBIDDEN = ("lightning", "pytorch_lightning", "lightning_fabric", "hydra", "omegaconf", "wandb")
MODULES = ("ldmkit.diffusion", "ldmkit.diffusion.schedules", "ldmkit.diffusion.processes", "ldmkit.diffusion.vp",
           "ldmkit.diffusion.parameterization", "ldmkit.diffusion.losses", "ldmkit.diffusion.objectives", "ldmkit.diffusion.weightings",
           "ldmkit.diffusion.samplers", "ldmkit.diffusion.guidance", "ldmkit.diffusion.sampling",
           "ldmkit.nn", "ldmkit.nn.backbones", "ldmkit.nn.backbones.unet", "ldmkit.nn.unet", "ldmkit.nn.autoencoder",
           "ldmkit.nn.attention", "ldmkit.nn.blocks", "ldmkit.nn.discriminator", "ldmkit.nn.lpips", "ldmkit.nn.clip",
           "ldmkit.nn.frozen", "ldmkit.generator", "ldmkit.txt2img", "ldmkit.artifacts")


def test_diffusion_nn_frozen_and_generator_are_pure_torch():
    code = (
        "import importlib, json, sys\n"
        f"for m in {MODULES!r}: importlib.import_module(m)\n"
        "top = {k.split('.')[0] for k in sys.modules}\n"
        f"print(json.dumps({{'forbidden': sorted(top & set({FORBIDDEN!r})), 'torch': 'torch' in top}}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["torch"]  # the probe does see imports
    assert loaded["forbidden"] == [], f"{MODULES} pulled in {loaded['forbidden']}; keep Lightning/Hydra/W&B out"
