"""What `bench/gpu_check.py` runs: one `Part` per command, found from what the tree holds (stages,
backbones in conf/backbone/, processes in conf/process/, bench scripts), sized for `--device cuda`
or for `--device cpu --quick`. No torch import here: the plan is made even where the env is broken."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclass
class Part:
    """One command of the check. `command` is built when the part starts (it may read what earlier
    parts wrote); `skip` is a reason not to run it; `needs` are parts that must have finished first."""

    name: str
    group: str  # env | train | speed | sampling | fid | ddp
    command: Callable[[], list[str]] | None
    timeout: float
    needs: list[str] = field(default_factory=list)
    skip: str | None = None
    min_seconds: float = 20.0  # not started with less budget left than this


@dataclass
class Sizes:
    steps: int  # training steps of each stage run, then `resume_steps` more after a resume
    resume_steps: int
    batch: int
    data: list[str]
    trainer: list[str]
    eval: list[str]
    speed: dict[str, list[str]]
    sampling: list[str]
    fid: list[str]
    train_timeout: float
    speed_timeout: float


def sizes(device: str, quick: bool) -> Sizes:
    if device.startswith("cuda") and not quick:
        return Sizes(
            steps=40, resume_steps=10, batch=32,
            data=["data=shapes", "data.num_workers=4", "data.train_size=4096", "data.val_size=64", "data.test_size=64"],
            trainer=["trainer=gpu", "trainer.precision=bf16-mixed", "trainer.benchmark=false"],
            eval=["steps=[20]", "guidance=[4]", "num_samples=64", "batch_size=32", "metrics.prompt_accuracy.judge_steps=50",
                  "data.num_workers=4"],
            speed={"unet": ["--preset", "sd15", "--batch", "16"], "dit": ["--preset", "XL", "--batch", "16"],
                   "mmdit": ["--preset", "sd3_medium", "--batch", "8"]},
            sampling=["--device", "cuda", "--batch", "32", "--steps", "20", "--rounds", "2", "--threads", "8"],
            fid=["--device", "cuda", "--images", "256", "--size", "256", "--rounds", "2", "--reuse", "--threads", "8"],
            train_timeout=150, speed_timeout=240,
        )
    return Sizes(
        steps=3, resume_steps=1, batch=4,
        data=["data=shapes", "data.num_workers=0", "data.train_size=64", "data.val_size=8", "data.test_size=8"],
        trainer=([] if device.startswith("cuda") else ["trainer=cpu"]) + ["trainer.precision=bf16-mixed"],
        eval=["steps=[2]", "guidance=[3]", "num_samples=4", "batch_size=2", "metrics.prompt_accuracy.judge_steps=2",
              "data.num_workers=0", "metrics.kid.subsets=2"],
        speed={arch: ["--preset", "tiny", "--batch", "2", "--steps", "2", "--warmup", "1", "--context-len", "8",
                      "--threads", "1"] + ([] if device.startswith("cuda") else ["--compile-backend", "aot_eager"])
               for arch in ("unet", "dit", "mmdit")},
        sampling=["--device", device, "--batch", "2", "--steps", "2", "--rounds", "1", "--samplers", "ddim", "dpmpp_2m",
                  "--threads", "1"],
        fid=["--device", device, "--images", "4", "--size", "64", "--rounds", "1", "--threads", "1"],
        train_timeout=240 if quick else 150, speed_timeout=300,
    )


# ---- what the tree holds --------------------------------------------------------------------------

def backbones() -> list[str | None]:
    """Base backbone configs (conf/backbone/X.yaml that name an arch and inherit from no other file);
    [None] (the LDM's own default) before the backbone group exists."""
    folder = ROOT / "conf" / "backbone"
    if not folder.is_dir():
        return [None]
    names = [p.stem for p in sorted(folder.glob("*.yaml"))
             if "arch:" in p.read_text() and "defaults:" not in p.read_text()]
    return sorted(names, key=lambda n: (n != "unet", n)) or [None]


def processes() -> list[tuple[str | None, str]]:
    """(process override, prediction): a VP schedule with v-prediction, and rectified flow with
    flow prediction when conf/process/rectified_flow.yaml exists; (None, v) before conf/process exists."""
    folder = ROOT / "conf" / "process"
    if not folder.is_dir():
        return [(None, "v")]
    found = [("scaled_linear", "v")] if (folder / "scaled_linear.yaml").is_file() else []
    if (folder / "rectified_flow.yaml").is_file():
        found.append(("rectified_flow", "flow"))
    return found or [(None, "v")]


def speed_archs() -> list[str]:
    archs = ["unet"]
    if (ROOT / "bench" / "transformer_train_step.py").is_file():
        archs += [a for a in ("dit", "mmdit") if (ROOT / "src" / "ldmkit" / "nn" / "backbones" / f"{a}.py").is_file()]
    return archs


# ---- the parts ------------------------------------------------------------------------------------

GAN = ("model.discriminator={_target_:ldmkit.nn.discriminator.NLayerDiscriminator,in_channels:3,base_channels:16,"
       "n_layers:2,norm:batch}")
CLIP_TINY = ["model.net.model_cfg.embed_dim=32", "model.net.model_cfg.vision_cfg.layers=1",
             "model.net.model_cfg.vision_cfg.width=32", "model.net.model_cfg.vision_cfg.head_width=16",
             "model.net.model_cfg.text_cfg.layers=1", "model.net.model_cfg.text_cfg.width=32",
             "model.net.model_cfg.text_cfg.heads=2", "model.scheduler.warmup_steps=1"]


def train_parts(work: Path, device: str, quick: bool, fallback: Callable[[], dict[str, Path]]) -> list[Part]:
    s = sizes(device, quick)
    common = [*s.data, f"data.batch_size={s.batch}", *s.trainer, "logger=csv", "callbacks.rich_progress_bar.refresh_rate=0",
              "trainer.log_every_n_steps=5", "trainer.limit_val_batches=1"]

    def stage(name: str, overrides: list[str], steps: int, needs: list[str] | None = None,
              artifacts: bool = False, resume: bool = True) -> list[Part]:
        run = work / name.replace(":", "_")
        first = [*common, *overrides, f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
                 f"callbacks.model_checkpoint.every_n_train_steps={steps}", f"hydra.run.dir={run}"]

        def cmd(extra: list[str]) -> Callable[[], list[str]]:
            return lambda: [PY, str(ROOT / "train.py"), *first, *(ldm_inputs() if artifacts else []), *extra]

        resumed = steps + s.resume_steps * (2 if "autoencoder" in name else 1)  # GAN: global_step counts both optimizers
        return [Part(f"train:{name}", "train", cmd([]), s.train_timeout, list(needs or []))] + ([
                Part(f"resume:{name}", "train", cmd(["ckpt_path=last", f"trainer.max_steps={resumed}",
                                                     f"trainer.val_check_interval={resumed}"]), s.train_timeout,
                     [f"train:{name}"])] if resume else [])

    def ldm_inputs() -> list[str]:
        found = {k: work / k / "artifact" for k in ("autoencoder", "clip")}
        if not all((p / "config.json").is_file() for p in found.values()):
            found = fallback()  # a failed stage must not hide the LDM's own findings
        return [f"model.autoencoder={found['autoencoder']}", f"model.text_encoder={found['clip']}"]

    disc_start = 1 if quick else 10
    ae_steps = disc_start + 2 * (s.steps - disc_start)
    parts = stage("autoencoder", ["model=autoencoder", GAN, f"model.disc_start={disc_start}", "model.latent_stats_batches=1",
                                  "model.num_log_images=2"], ae_steps)
    parts += stage("clip", ["model=clip", *([] if not quick else CLIP_TINY)], s.steps)
    ldm = ["model=ldm", "model.lr_warmup_steps=1"] + (["model.val_prompts=[]", "sampler.steps=2"] if quick else ["sampler.steps=10"])
    for i, backbone in enumerate(backbones()):
        for j, (process, prediction) in enumerate(processes()):
            name = f"ldm:{backbone or 'default'}:{process or 'default'}"
            overrides = [*ldm, f"model.loss.prediction={prediction}"]
            overrides += [f"backbone={backbone}"] if backbone else []
            overrides += [f"process={process}"] if process else []
            # resume: every backbone under the first process on the GPU; once in --quick (CPU minutes)
            resume = (i == j == 0) if quick else j == 0
            parts += stage(name, overrides, s.steps, ["train:autoencoder", "train:clip"], artifacts=True, resume=resume)
    if device.startswith("cuda") and not quick:
        backbone = backbones()[0]
        parts += stage("ldm:compiled", [*ldm, "model.compile=true", *([f"backbone={backbone}"] if backbone else [])],
                       s.steps, ["train:autoencoder", "train:clip"], artifacts=True)[:1]
    return parts


def eval_parts(work: Path, device: str, quick: bool) -> list[Part]:
    s = sizes(device, quick)
    weights = work / "inception" / "weights-inception-2015-12-05-6726825d.pth"
    write = ("import sys, torch; from pathlib import Path; from tests.eval.conftest import random_inception_state_dict as r; "
             "p = Path(sys.argv[1]); p.parent.mkdir(parents=True, exist_ok=True); torch.save(r(), p)")
    parts = [Part("eval:inception-weights", "train", lambda: [PY, "-c", write, str(weights)], 120)]
    samplers = {"v": "[ddim,dpmpp_2m]", "flow": "[euler,dpmpp_2m]"}
    for j, (process, prediction) in enumerate(processes()):
        name, first = f"ldm:{backbones()[0] or 'default'}:{process or 'default'}", j == 0
        run = work / name.replace(":", "_")
        parts.append(Part(
            f"eval:{name}", "train",
            lambda run=run, prediction=prediction, name=name: [
                PY, str(ROOT / "eval.py"), f"ckpt={run / 'artifact'}", f"samplers={samplers[prediction]}", *s.eval,
                "logger=none", f"inception_path={weights}", f"cache_dir={work / 'eval_cache'}",
                f"hydra.run.dir={work / ('eval_' + name.replace(':', '_'))}", f"accelerator={'gpu' if device.startswith('cuda') else 'cpu'}"],
            s.train_timeout, [f"resume:{name}" if first else f"train:{name}", "eval:inception-weights"]))
    return parts


def bench_parts(work: Path, device: str, quick: bool, cuda_count: int | None) -> list[Part]:
    s = sizes(device, quick)
    latent = ["--latent-size", "8"] if quick else ["--latent-size", "64"]
    parts = []
    for arch in speed_archs():
        argv = [PY, str(ROOT / "bench" / "gpu_check_speed.py"), "--arch", arch, "--device", device, *latent, *s.speed[arch]]
        parts.append(Part(f"speed:{arch}", "speed", lambda argv=argv: argv, s.speed_timeout, min_seconds=60))
    parts.append(Part("sampling", "sampling", lambda: [PY, str(ROOT / "bench" / "sampling_throughput.py"), *s.sampling], 150))
    parts.append(Part("fid", "fid", lambda: [PY, str(ROOT / "bench" / "fid_throughput.py"), *s.fid], 150))
    if not device.startswith("cuda") or not cuda_count:
        skip = "skipped: no CUDA"
    elif cuda_count < 2:
        skip = f"not run: {cuda_count} GPU visible, the NCCL DDP smoke run needs 2"
    else:
        skip = None
    parts.append(Part("ddp", "ddp", lambda: [PY, str(ROOT / "train.py"), "model=clip", *s.data, "data.batch_size=16", "trainer=ddp",
                                             "trainer.devices=2", "trainer.accelerator=gpu", "trainer.max_steps=10",
                                             "trainer.val_check_interval=10", "trainer.limit_val_batches=1", "logger=csv",
                                             "callbacks.rich_progress_bar.refresh_rate=0", f"hydra.run.dir={work / 'ddp'}"],
                      150, skip=skip))
    return parts
