import json
import subprocess
import sys

FORBIDDEN = ("lightning", "pytorch_lightning", "lightning_fabric", "hydra", "omegaconf", "wandb")
MODULES = ("ldmkit.diffusion", "ldmkit.diffusion.schedules", "ldmkit.diffusion.parameterization",
           "ldmkit.diffusion.losses", "ldmkit.diffusion.samplers", "ldmkit.diffusion.guidance",
           "ldmkit.diffusion.sampling")


def test_diffusion_core_is_pure_torch():
    code = (
        "import importlib, json, sys\n"
        f"for m in {MODULES!r}: importlib.import_module(m)\n"
        "top = {k.split('.')[0] for k in sys.modules}\n"
        f"print(json.dumps({{'forbidden': sorted(top & set({FORBIDDEN!r})), 'torch': 'torch' in top}}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["torch"]  # the probe does see imports
    assert loaded["forbidden"] == [], f"ldmkit.diffusion pulled in {loaded['forbidden']}; keep Lightning/Hydra/W&B out"
