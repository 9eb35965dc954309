"""Fine-tune a Stable Diffusion pipeline on labelled images: the three arms of the study.

- ``dreambooth``: train the UNet; text encoder and VAE frozen (the write-up's DreamBooth).
- ``text_encoder``: train the text encoder; UNet and VAE frozen (the write-up's "normal Stable
  Diffusion": it can only re-point words at what the UNet already draws).
- ``unet_text_encoder``: train both (RoentGen found this best).

One loop serves all three; the arm only decides which modules get gradients. The loop reads top
to bottom: data -> models -> (resume) -> steps -> checkpoints. Every run is an MLflow run with
its parameters, data set, per-step loss and learning rate, throughput, and a full-pipeline
checkpoint (a pyfunc model) plus an image grid of the disease prompts every N steps.

    python -m harness.finetune --arm dreambooth --steps 400
    mlflow run . -e dreambooth -P steps=50000 --env-manager local
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from tqdm.auto import tqdm

from harness import tracking
from harness.artifacts import local_spec
from harness.config import ConfigError, StepConfig, param, parse
from harness.diffusion import LatentCache, diffusion_loss
from harness.data import CachedImages, DataSpec, ImageDataset, disease_prompts, load_table, prompts_for_table, summarize

ARMS = {
    "dreambooth": ("unet",),
    "text_encoder": ("text_encoder",),
    "unet_text_encoder": ("unet", "text_encoder"),
}
CHECKPOINT_TAG = "harness.checkpoint."  # + the step, 6 digits: the checkpoint's model URI

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


class OutputDirBusyError(RuntimeError):
    """Another live process fine-tunes in the same output folder."""


@dataclass
class FinetuneConfig(StepConfig):
    arm: str = param(dataclasses.MISSING, "which modules train", choices=sorted(ARMS), project=True)
    data: str = param("phantom", "FORMAT:PATH (chexpert:, mimic:, folder:) or 'phantom'", project=True)
    pretrained_model: str = param("base", "'base' (the embedded base), models:/..., a diffusers directory, or a "
                                  "Hub id", project=True)
    # CPU-sized defaults: a few minutes on 2 cores with the embedded base; scale up on a GPU.
    steps: int = param(1200, project=True)
    # The embedded base is small and knows chests only roughly: it needs a high rate to learn them in a
    # few hundred steps. SD-sized models want ~5e-6.
    learning_rate: float = param(2e-3, "for the embedded base; a real SD wants ~5e-6", project=True)
    # Cosine decay to 0: a short run ends on small steps that the weight average settles on, where a
    # constant rate leaves the small base's samples blurred (README: quality table).
    lr_scheduler: str = param("cosine", "diffusers' get_scheduler name")
    lr_warmup_steps: int = param(20)
    batch_size: int = param(8, project=True)
    gradient_accumulation_steps: int = param(1, project=True)
    resolution: int = param(0, "0 = the pretrained model's native size", project=True)
    seed: int = param(0, project=True)
    mixed_precision: str = param("auto", "auto = bf16 on a GPU that has it, else full precision",
                                 choices=["auto", "no", "fp16", "bf16"], project=True)
    max_grad_norm: float = param(1.0)
    # With no empty prompts in fine-tuning, classifier-free guidance at generation contrasts the
    # prompt with an unconditional branch the fine-tuned UNet never learned; 10% empty prompts (as SD
    # was trained) keep it, and guidance is what makes the findings show.
    caption_dropout: float = param(0.1, "share of prompts replaced by the empty prompt")
    # Min-SNR-gamma loss weighting (Hang et al. 2023): down-weights the nearly-clean timesteps,
    # which teach little about layout and findings; 0 = plain epsilon MSE.
    snr_gamma: float = param(5.0, "min-SNR loss weighting gamma (0 = off)")
    # EMA weights draw better than the last raw ones (README: measured on the embedded default).
    ema_decay: float = param(0.999, "checkpoints hold an exponential moving average of the weights, with this "
                             "top decay (warmed up as 1 - (1 + step)^-2/3); 0 = off, the raw weights", project=True)
    gradient_checkpointing: bool = param(False, "trade compute for memory (large UNets)")
    views: str = param("frontal", choices=["frontal", "lateral", "all"], project=True)
    uncertain: str = param("ignore", choices=["ignore", "zeros", "ones"], project=True)
    template: str | None = param(None, "prompt template with {view} and {findings}")
    no_finding_template: str | None = param(None, "prompt of an image with no positive label, with {view} "
                                            "(default: the chest X-ray one)")
    labels: str | None = param(None, "comma-separated label names (default: the data set's)")
    skip_bad: bool = param(False, "skip unreadable images instead of failing")
    max_train_images: int = param(0, "0 = all")
    # Repeat-factor sampling (Gupta et al. 2019, LVIS): the rare findings' images come round more
    # often, so the UNet sees each finding's prompts oftener; every prompt's images stay as they are.
    repeat_threshold: float = param(0.0, "repeat an image max(1, sqrt(t / f)) times per epoch, f the train-split "
                                    "frequency of its rarest positive label; 0 = off", project=True)
    prior_preservation: bool = param(False, "DreamBooth prior-preservation loss")
    class_prompt: str = param("a photo")
    num_class_images: int = param(32)
    prior_loss_weight: float = param(1.0)
    checkpoint_every: int = param(100, project=True, key=False)
    keep_checkpoints: int = param(2, "local resumable states kept on disk", key=False)
    grid_steps: int = param(20, "inference steps for checkpoint grids", key=False)
    grid_seeds: int = param(2, "images per prompt in checkpoint grids", key=False)
    log_every: int = param(25, "flush per-step metrics to MLflow every N steps", key=False)
    num_workers: int = param(0, key=False)
    output_dir: str | None = param(None, "default: outputs/<arm>-<parameter hash>", key=False)
    resume: str = param("auto", choices=["auto", "never"], key=False)
    experiment: str | None = param(None, "MLflow experiment (default: MLFLOW_EXPERIMENT_NAME / _ID)", key=False)
    launcher: str = param("", "run as `<launcher> -m harness.finetune ...`, e.g. 'accelerate launch --num_processes 8' "
                          "(data parallel); empty = in this process", key=False)

    def check(self) -> None:
        # Everything that can be checked before a model loads is checked here, so a typo fails at once.
        self.at_least(1, "steps", "batch_size", "gradient_accumulation_steps", "checkpoint_every",
                      "keep_checkpoints", "grid_steps", "grid_seeds", "log_every")
        self.not_negative("lr_warmup_steps", "resolution", "max_train_images", "num_workers", "max_grad_norm",
                          "repeat_threshold", "prior_loss_weight", "snr_gamma")
        self.positive("learning_rate")
        if self.prior_preservation and self.num_class_images < 1:
            raise ConfigError(f"--num_class_images {self.num_class_images}: --prior_preservation needs at least 1")
        try:
            DataSpec.parse(self.data)
        except ValueError as err:
            raise ConfigError(f"--data: {err}") from None
        self.within("caption_dropout", 0.0, 1.0, high_open=True)
        self.within("ema_decay", 0.0, 1.0, high_open=True)


def parse_args(argv=None, arm: str | None = None) -> FinetuneConfig:
    fixed = {"arm": arm} if arm else {}
    return parse(FinetuneConfig, argv, prog="python -m harness.finetune", **fixed)


def run_key(config: FinetuneConfig) -> str:
    return tracking.params_key(config.key_params())


def run(config: FinetuneConfig, on_checkpoint=None) -> tracking.StepResult:
    """Run one fine-tuning job; the result's artifacts name each checkpoint's model URI
    (``checkpoint_<step>``).

    ``on_checkpoint(step, run_id) -> bool``, called after each checkpoint is logged, may end
    training early by returning True: the run then FINISHES at that step, tagged
    ``harness.stopped_early``. Hyperparameter tuning (``harness.tune``) judges checkpoints and
    prunes through it.

    With ``config.launcher`` the job runs in a subprocess of that launcher (``launch``). Started
    by a launcher in several processes (``accelerate launch``: data parallel), only the main one
    locks the output folder and opens the MLflow run; the others get its id, and a failure that
    all of them see (a NaN loss, an error of the main process while the others wait on it) ends
    the run once and then every process."""
    if config.pretrained_model == "base":  # its version, so that a rebuilt base is not resumed or reused
        from harness.pretrained import base_uri

        config = config.replace(pretrained_model=base_uri())
    if config.launcher:
        return launch(config, on_checkpoint)
    key = run_key(config)
    out = Path(config.output_dir or Path(os.environ.get("HARNESS_OUTPUT_DIR", "outputs")) / f"{config.arm}-{key}")
    state = _processes()
    control = _Control.from_env()
    if control is not None and on_checkpoint is None and control.wants_checkpoints():
        on_checkpoint = control.on_checkpoint  # the launching process judges each checkpoint
    try:
        with tracking.sigterm_raises(), contextlib.ExitStack() as stack:
            def open_run() -> str:
                lock = stack.enter_context(_locked(out))
                tags = {"harness.arm": config.arm, "harness.run_key": key}
                if os.environ.get(LAUNCHER_ENV):
                    tags["harness.launcher"] = os.environ[LAUNCHER_ENV]
                active = stack.enter_context(tracking.tracked_run(f"{config.arm}", config.experiment, tags=tags))
                lock.holder(active.info.run_id)
                if control is not None:
                    control.started(active.info.run_id)
                tracking.log_params({k: v for k, v in config.params().items() if k != "experiment"})
                return active.info.run_id

            run_id = _from_main(state, open_run)
            train(config, key, out, run_id, on_checkpoint)
    except BaseException as err:
        if state.num_processes > 1 and getattr(err, _AGREED, False):
            state.wait_for_everyone()  # every process raised it: exit once the main one has ended the run
        raise
    return result(run_id) if state.is_main_process else tracking.StepResult(run_id)


# --- several processes ----------------------------------------------------------------------
# Under `accelerate launch` the main process may log a checkpoint (and tune may judge it) while the
# others wait in a collective: the process group's timeout must outlast that.
DDP_TIMEOUT_S = float(os.environ.get("HARNESS_DDP_TIMEOUT_S", 4 * 3600))
_AGREED = "_harness_every_process"  # set on an exception that every process raises at the same point


def _processes():
    """The launcher's processes (accelerate's ``PartialState``; one without a launcher). It makes the
    process group, before the run opens, so the run id can be handed to every process."""
    import datetime

    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun starts each worker in a session of its own: without this, a launcher killed
        # with -9 leaves its workers training, holding the output folder and their run
        _sigterm_at_parent_death()
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"),
                        timeout=datetime.timedelta(seconds=DDP_TIMEOUT_S))


class MainProcessError(RuntimeError):
    """Raised by the other processes when the main process failed at a point they waited on."""


def _agreed(err: BaseException) -> BaseException:
    setattr(err, _AGREED, True)
    return err


def _from_main(state, fn):
    """``fn()`` run by the main process, its result handed to every process
    (``broadcast_object_list``). If it fails, every process raises (the others a
    ``MainProcessError`` with the main's error), so none waits for ever on a dead one."""
    if state.num_processes == 1:
        return fn()
    from accelerate.utils import broadcast_object_list

    box = [None]
    if state.is_main_process:
        try:
            box = [(True, fn(), False)]
        except BaseException as err:
            agreed = isinstance(err, Exception)  # not a signal or Ctrl-C, which the others see themselves
            broadcast_object_list([(False, f"{type(err).__name__}: {err}", agreed)])
            raise _agreed(err) if agreed else err
    broadcast_object_list(box)
    ok, value, agreed = box[0]
    if not ok:
        err = MainProcessError(f"the main process failed: {value}")
        raise _agreed(err) if agreed else err
    return value


# --- a launcher -------------------------------------------------------------------------------
CONTROL_ENV = "HARNESS_FINETUNE_CONTROL"  # set by launch(): the folder its subprocess reports to
LAUNCHER_ENV = "HARNESS_FINETUNE_LAUNCHER"  # the launcher's command, tagged on the run


class LaunchError(RuntimeError):
    """A fine-tune started through a launcher failed."""


class _Control:
    """The folder through which a launched fine-tune's main process tells the launching process
    its run id (``run.json``) and each checkpoint (``checkpoint_<step>.json``), and waits for
    its verdict on each (``verdict_<step>.json``: stop, go on, or the launcher's error)."""

    def __init__(self, path):
        self.path = Path(path)

    @classmethod
    def from_env(cls) -> "_Control | None":
        return cls(os.environ[CONTROL_ENV]) if os.environ.get(CONTROL_ENV) else None

    def _write(self, name: str, data: dict) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(json.dumps(data))
        tmp.rename(self.path / name)  # atomic: the reader never sees half a file

    def _read(self, name: str) -> dict | None:
        path = self.path / name
        return json.loads(path.read_text()) if path.is_file() else None

    # the launching process
    def prepare(self, wants_checkpoints: bool) -> None:
        import psutil

        self._write("parent.json", {"pid": os.getpid(), "started": psutil.Process().create_time(),
                                    "checkpoints": wants_checkpoints})

    def run_id(self) -> str | None:
        return (self._read("run.json") or {}).get("run_id")

    def pending(self) -> list[tuple[int, str]]:
        """Checkpoints reported and not answered yet: (step, run id)."""
        found = [self._read(p.name) for p in sorted(self.path.glob("checkpoint_*.json"))]
        return [(c["step"], c["run_id"]) for c in found if c and not (self.path / f"verdict_{c['step']:06d}.json").exists()]

    def answer(self, step: int, verdict: dict) -> None:
        self._write(f"verdict_{step:06d}.json", verdict)

    # the launched main process
    def wants_checkpoints(self) -> bool:
        return bool((self._read("parent.json") or {}).get("checkpoints"))

    def started(self, run_id: str) -> None:
        self._write("run.json", {"run_id": run_id})

    def on_checkpoint(self, step: int, run_id: str) -> bool:
        parent = self._read("parent.json")
        self._write(f"checkpoint_{step:06d}.json", {"step": step, "run_id": run_id})
        while (verdict := self._read(f"verdict_{step:06d}.json")) is None:
            if not tracking._process_alive(parent["pid"], parent["started"]):
                raise LaunchError(f"the launching process {parent['pid']} is gone: no verdict on step {step}")
            time.sleep(0.2)
        if verdict.get("error"):
            raise LaunchError(f"on_checkpoint failed in the launching process: {verdict['error']}")
        return bool(verdict.get("stop"))


def launch(config: FinetuneConfig, on_checkpoint=None) -> tracking.StepResult:
    """Run ``config`` as ``<config.launcher> -m harness.finetune <its options>`` (e.g. ``accelerate
    launch --num_processes 8``) and return its result, as ``run`` does in this process: its run
    is nested under the active run, in the same experiment and tracking store, and
    ``on_checkpoint`` is called here for each checkpoint, the fine-tune waiting for its verdict.
    Interrupted, this process stops the launcher (SIGTERM, which it passes on to its processes);
    if this process dies, the kernel sends the launcher SIGTERM."""
    import shlex
    import subprocess
    import sys
    import tempfile

    command = shlex.split(config.launcher)
    beside = Path(sys.executable).parent / command[0]  # .venv/bin/accelerate, the venv not activated
    if not shutil.which(command[0]) and beside.is_file():
        command[0] = str(beside)
    argv = [*command, "-m", "harness.finetune", *config.replace(launcher="").to_argv()]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}  # under `mlflow run`: the caller's run
    root = str(Path(__file__).resolve().parents[1])
    env.update({"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(), LAUNCHER_ENV: config.launcher,
                "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))})
    if (active := mlflow.active_run()) is not None:
        env.update({tracking.PARENT_RUN_ENV: active.info.run_id, "MLFLOW_EXPERIMENT_ID": active.info.experiment_id})
    failure = None
    with tempfile.TemporaryDirectory(prefix="harness-launch-") as folder:
        control = _Control(folder)
        control.prepare(on_checkpoint is not None)
        env[CONTROL_ENV] = folder
        log.info("launching %s", shlex.join(argv))
        proc = subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=_sigterm_at_parent_death)
        try:
            while True:
                ended = proc.poll() is not None
                for step, run_id in control.pending():
                    if failure is not None:  # an earlier verdict failed: the fine-tune is ending
                        control.answer(step, {"error": "an earlier on_checkpoint failed"})
                        continue
                    try:
                        control.answer(step, {"stop": bool(on_checkpoint(step, run_id))})
                    except Exception as err:
                        failure = err
                        control.answer(step, {"error": f"{type(err).__name__}: {err}"})
                if ended:
                    break
                time.sleep(0.2)
        except BaseException:
            _stop(proc)
            raise
        run_id = control.run_id()
    if failure is not None:
        raise failure
    if proc.returncode != 0:
        error = run_id and mlflow.tracking.MlflowClient().get_run(run_id).data.tags.get(tracking.TAG_ERROR)
        message = (f"`{shlex.join(argv[:len(command) + 2])} ...` exited with status {proc.returncode}"
                   + (f" (MLflow run {run_id}): {error}" if error else f" (MLflow run {run_id})" if run_id
                      else ": no run was started (its output says why)"))
        raise (NonFiniteLossError if error and error.startswith("NonFiniteLossError") else LaunchError)(message)
    if run_id is None:
        raise LaunchError(f"`{config.launcher}` exited 0 but no fine-tune run was started: is it a launcher "
                          "that runs `-m harness.finetune`?")
    return result(run_id)


def _sigterm_at_parent_death() -> None:  # in the launcher's process before it runs, and in its workers
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def _stop(proc, wait_s: float = 60.0) -> None:
    """SIGTERM to the launcher's process group (its processes end their run KILLED), then SIGKILL."""
    import signal
    import subprocess

    for sig, wait in ((signal.SIGTERM, wait_s), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def result(run_id: str) -> tracking.StepResult:
    """A fine-tuning run's result: its metrics, and each checkpoint's model URI as ``checkpoint_<step>``."""
    tags = mlflow.tracking.MlflowClient().get_run(run_id).data.tags
    checkpoints = {f"checkpoint_{int(k[len(CHECKPOINT_TAG):])}": v for k, v in tags.items()
                   if k.startswith(CHECKPOINT_TAG)}
    return dataclasses.replace(tracking.StepResult.of(run_id), artifacts=checkpoints)


def main(argv=None, arm: str | None = None, on_checkpoint=None) -> str:
    """The command line's entry (``arm`` fixes --arm, as the arm entry points do): returns the run id."""
    return run(parse_args(argv, arm), on_checkpoint).run_id


class _Lock:
    """An exclusive ``flock`` on ``<out>/lock``; the file names its holder for the error message."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self.file = open(out / "lock", "a+")  # not "w": truncating before the lock is ours erases the holder

    def acquire(self) -> bool:
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.holder(None)
        return True

    def holder(self, run_id: str | None) -> None:
        self.file.seek(0)
        self.file.truncate()
        self.file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id}))
        self.file.flush()

    def describe(self) -> str:
        self.file.seek(0)
        try:
            h = json.loads(self.file.read())
        except ValueError:
            return "another process"
        return f"process {h['pid']} on {h['host']}" + (f" (MLflow run {h['run_id']})" if h.get("run_id") else "")


@contextlib.contextmanager
def _locked(out: Path):
    """Hold the output folder for the run's life. Two fine-tunes with the same parameters share it,
    and the second would resume from the first's checkpoints while it still writes them. The second
    fails at once rather than waits (a fine-tune can take hours). The kernel drops the lock when the
    holder dies, even by ``kill -9``, so a stale lock file never blocks a rerun."""
    lock = _Lock(out)
    try:
        if not lock.acquire():
            raise OutputDirBusyError(f"{out} is in use by {lock.describe()}: wait for it to end, "
                                     "or pass another --output_dir")
        yield lock
    finally:
        lock.file.close()


# ---------------------------------------------------------------------------------------------
def _accelerator(args):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    precision = args.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(mixed_precision=precision, gradient_accumulation_steps=args.gradient_accumulation_steps,
                       project_config=ProjectConfiguration(project_dir=None))


def _templates(args) -> dict:
    """The prompt templates the user set (the data layer's chest X-ray ones otherwise)."""
    return {k: getattr(args, k) for k in ("template", "no_finding_template") if getattr(args, k)}


def _data(args, tokenizer, resolution: int, data: str | None = None):
    """``data``: ``args.data`` through ``local_spec`` (an MLflow artifact URI -> its local folder)."""
    spec = DataSpec.parse(data or local_spec(args.data))
    labels = args.labels.split(",") if args.labels else None
    table = load_table(spec, split="train", views=args.views, uncertain=args.uncertain, labels=labels,
                       skip_bad=args.skip_bad)
    if args.max_train_images:
        table = table.iloc[: args.max_train_images]
    labels = table.attrs["labels"]
    prompts = prompts_for_table(table, labels, **_templates(args))
    images = ImageDataset(table, labels, resolution=resolution, channels=3, skip_bad=args.skip_bad)
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return spec, table, labels, PromptedImages(images, ids, prompts)


class PromptedImages(torch.utils.data.Dataset):
    """Images (decoded once, kept in memory when they fit) with the token ids of their prompt."""

    def __init__(self, images: ImageDataset, input_ids: torch.Tensor, prompts: list[str]):
        self.images, self.input_ids, self.prompts = CachedImages(images), input_ids, prompts

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        item = self.images[i]
        return {"pixel_values": item["pixel_values"], "input_ids": self.input_ids[item["index"]],
                "index": item["index"]}


def repeat_indices(table, labels: list[str], threshold: float, seed: int) -> list[int]:
    """One epoch's image indices under repeat-factor sampling: image i appears r_i times, r_i =
    max(1, sqrt(threshold / f)) for the rarest of its positive labels (frequency f in ``table``),
    its fraction rounded up or down at random (fixed by ``seed``) so the mean repeat is r_i."""
    import numpy as np

    from harness.data.prompts import NO_FINDING

    labels = [l for l in labels if l != NO_FINDING]  # not said as a finding: no-finding images repeat once
    positive = table[labels].to_numpy() == 1.0  # as the prompts: only a 1 is said
    freq = positive.mean(axis=0)
    factor = np.where(positive, np.sqrt(threshold / np.where(freq > 0, freq, 1.0)), 1.0).max(axis=1, initial=1.0)
    repeats = np.floor(factor + np.random.default_rng(seed).random(len(factor))).astype(int)
    return np.repeat(np.arange(len(factor)), repeats).tolist()


def _latent_cache(dataset: "PromptedImages", vae, batch_size: int = 64) -> LatentCache:
    """Every training image's posterior, keyed by its ``index``: all arms keep the VAE frozen."""
    def batches():
        for start in range(0, len(dataset), batch_size):
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            yield [int(it["index"]) for it in items], torch.stack([it["pixel_values"] for it in items])

    return LatentCache.encode(vae, batches())


def _class_images(pipe, args, resolution, accelerator) -> dict:
    """DreamBooth prior preservation: images of the class prompt drawn by the frozen base."""
    generator = torch.Generator().manual_seed(args.seed)
    pipe.set_progress_bar_config(disable=True)
    out = pipe([args.class_prompt] * args.num_class_images, num_inference_steps=args.grid_steps,
               height=resolution, width=resolution, generator=generator, output_type="pt")
    ids = pipe.tokenizer([args.class_prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids
    return {"pixel_values": out.images * 2 - 1, "input_ids": ids}


def _loop(loader, first_epoch):
    """Batches forever: the (possibly partly skipped) first epoch, then whole epochs."""
    yield from first_epoch
    while True:
        yield from loader


@dataclasses.dataclass
class _Models:
    """The pipeline's parts as the loop uses them: all on the device, only the arm's modules
    trainable, the frozen ones in half precision when training is mixed."""
    pipe: object
    noise_scheduler: object
    trained: dict  # name -> module, the arm's
    resolution: int
    weight_dtype: torch.dtype


def _models(args, accelerator) -> _Models:
    from diffusers import DDPMScheduler

    from harness.pretrained import load_pipeline, resolve

    # The main process resolves the model (a registry download lands in the cache once); the others
    # load its local copy, or resolve it themselves on a host that does not see that path.
    source = _from_main(accelerator, lambda: resolve(args.pretrained_model))
    main = accelerator.is_main_process
    pipe = load_pipeline(args.pretrained_model if main or not Path(source).exists() else source)
    if main:
        mlflow.set_tag("harness.pretrained_source", source)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    trained = {name: getattr(pipe, name) for name in ARMS[args.arm]}
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    for module in trained.values():
        module.requires_grad_(True)
        module.train()
        if args.gradient_checkpointing:
            module.gradient_checkpointing_enable() if hasattr(module, "gradient_checkpointing_enable") \
                else module.enable_gradient_checkpointing()
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for name in ("vae", "unet", "text_encoder"):
        frozen_dtype = {} if name in trained or weight_dtype == torch.float32 else {"dtype": weight_dtype}
        getattr(pipe, name).to(accelerator.device, **frozen_dtype)
    return _Models(pipe, DDPMScheduler.from_config(pipe.scheduler.config), trained,
                   args.resolution or pipe.unet.config.sample_size * factor, weight_dtype)


def _training_data(args, accelerator, models: _Models):
    """The train split as prompted images (logged as the run's input by the main process), its
    latent cache when it fits in memory, and the loader, not yet prepared."""
    main, n_procs = accelerator.is_main_process, accelerator.num_processes
    data = _from_main(accelerator, lambda: local_spec(args.data))  # an MLflow artifact URI -> its local folder
    if not main and DataSpec.parse(data).path is not None and not DataSpec.parse(data).path.exists():
        data = local_spec(args.data)  # another host: its own copy
    spec, table, labels, dataset = _data(args, models.pipe.tokenizer, models.resolution, data)

    def log_data():
        tracking.log_input(mlflow.data.from_pandas(table, source=str(spec.path), name=f"{spec.format}-train"),
                           context="training")
        mlflow.log_dict(summarize(table), "data/summary.json")
        tracking.log_params({"resolution_px": models.resolution, "n_train_images": len(dataset),
                             "num_processes": n_procs,
                             "global_batch_size": args.batch_size * args.gradient_accumulation_steps * n_procs})

    _from_main(accelerator, log_data)
    latent_cache = None
    if args.num_workers == 0 and dataset.images.preload():  # fits in memory: so do its latents
        latent_cache = _latent_cache(dataset, models.pipe.vae)
    epoch = dataset
    if args.repeat_threshold:
        epoch = torch.utils.data.Subset(dataset, repeat_indices(table, labels, args.repeat_threshold, args.seed))
        _from_main(accelerator, lambda: tracking.log_params({"n_samples_per_epoch": len(epoch)}))
    loader = torch.utils.data.DataLoader(epoch, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=args.num_workers,
                                         generator=torch.Generator().manual_seed(args.seed))
    return table, labels, dataset, latent_cache, loader


def _check_finite(losses: torch.Tensor, step: int, args, out: Path, metrics) -> None:
    """Every process's loss of this step: a NaN on any of them stops all of them here."""
    if torch.isfinite(losses).all():
        return
    metrics.flush()
    last = _checkpoints(out)
    bad = (~torch.isfinite(losses)).nonzero().flatten().tolist()
    where = f" in process {', '.join(map(str, bad))} of {len(losses)}" if len(losses) > 1 else ""
    raise _agreed(NonFiniteLossError(
        f"loss is {losses[bad[0]].item()} at step {step}{where} (learning_rate={args.learning_rate}); "
        f"stopped. Last good checkpoint: {last[-1] if last else 'none (no checkpoint was written yet)'}"))


def train(args, key: str, out: Path, run_id: str, on_checkpoint=None) -> None:
    """The loop, in each of the launcher's processes (one without a launcher). Every process
    trains on its own shard of each epoch with its own noise; the prepared (DDP) modules average
    the gradients, so the weights stay the same everywhere. Only the main process touches MLflow
    and writes the checkpoint's pipeline; what it decides (the pretrained source, the checkpoint to
    resume, an early stop) reaches the others through ``_from_main`` and accelerate's triggers."""
    from diffusers.optimization import get_scheduler
    from diffusers.utils import make_image_grid

    from registry.pyfunc import log_pipeline

    accelerator = _accelerator(args)
    main, n_procs = accelerator.is_main_process, accelerator.num_processes
    torch.manual_seed(args.seed + accelerator.process_index)  # each process its own noise and timesteps

    m = _models(args, accelerator)
    pipe, trained, resolution = m.pipe, m.trained, m.resolution
    table, labels, dataset, latent_cache, loader = _training_data(args, accelerator, m)
    prior = _class_images(pipe, args, resolution, accelerator) if args.prior_preservation else None
    empty_ids = pipe.tokenizer([""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                               return_tensors="pt").input_ids[0]

    params = [p for module in trained.values() for p in module.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=1e-2)
    # The prepared scheduler steps once per process at each optimizer step (accelerate's default,
    # split_batches=False: each process adds a batch), so its warmup and length count that many.
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * n_procs,
                                 num_training_steps=args.steps * n_procs)
    prepared = accelerator.prepare(*trained.values(), optimizer, loader, lr_scheduler)
    models, (optimizer, loader, lr_scheduler) = prepared[: len(trained)], prepared[len(trained):]
    if len(loader) == 0:  # the prepared loader: this process's share of the batches
        raise _agreed(ValueError(f"{len(dataset)} training images are fewer than one batch of {args.batch_size}"
                                 + (f" per process ({n_procs} processes)" if n_procs > 1 else "")))
    # The forward pass goes through the prepared modules (under DDP, their backward all-reduces
    # the gradients); the frozen ones are used as they are.
    forward = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, **dict(zip(trained, models))}
    emas = _emas(trained, args, accelerator) if main else []  # only the main process saves and draws them

    # --- resume ------------------------------------------------------------------------------
    step = _resume(args, key, out, run_id, accelerator, emas, resolution)
    # Batches of this epoch already trained on, in every process's loader: each optimizer step
    # took gradient_accumulation_steps of them, but an epoch's last step ends at its last batch
    # (accelerate syncs there), so an epoch is ceil(len / accumulation) steps.
    accumulation = args.gradient_accumulation_steps
    skip = step % math.ceil(len(loader) / accumulation) * accumulation
    batches = _loop(loader, accelerator.skip_first_batches(loader, skip) if skip else loader)
    metrics = tracking.MetricBuffer(run_id, flush_every=args.log_every) if main else _NoMetrics()
    grid_prompts = disease_prompts(labels, **_templates(args))
    grids = []
    debug = _Debug.from_env(accelerator)

    def publish(path: Path) -> None:  # the main process logs the checkpoint and asks on_checkpoint
        with tracking.sigterm_deferred():  # a stop waits for the store writes, not for the grid
            info = log_pipeline(path / "pipeline", name=f"checkpoint-{step:06d}", resolution=resolution)
            mlflow.set_tag(f"{CHECKPOINT_TAG}{step:06d}", info.model_uri)
            mlflow.set_tag(tracking.TAG_STEP, str(step))
        with _averaged(emas), accelerator.autocast():  # drawn from the averaged weights, as saved
            grid, first = _grid(pipe, grid_prompts, args, resolution, make_image_grid)
        with tracking.sigterm_deferred():
            mlflow.log_image(grid, f"grids/step_{step:06d}.png")
        grids.append(first)
        for module in trained.values():
            module.train()
        if on_checkpoint is not None and on_checkpoint(step, run_id) and step < args.steps:
            accelerator.set_trigger()

    # --- steps -------------------------------------------------------------------------------
    unet_dtype = pipe.unet.dtype  # a property that walks the module tree: read once, not every step
    progress = tqdm(total=args.steps, initial=step, desc=f"{args.arm}", disable=not main)
    window_start, window_images = time.perf_counter(), 0
    while step < args.steps:
        batch = next(batches)
        debug.batch(batch)
        with accelerator.accumulate(*models):
            loss = _loss(batch, prior, args, pipe.vae, forward["unet"], forward["text_encoder"], m.noise_scheduler,
                         m.weight_dtype, unet_dtype, latent_cache, empty_ids)
            loss = debug.inject(loss, step + 1)
            losses = accelerator.gather(loss.detach()[None]) if n_procs > 1 else loss.detach()[None]
            _check_finite(losses, step + 1, args, out, metrics)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        window_images += batch["pixel_values"].shape[0] * n_procs  # throughput counts every process
        if not accelerator.sync_gradients:
            continue
        for module, ema in emas:
            ema.step(module.parameters())
        step += 1
        mean_loss = losses.mean().item()
        debug.step(step, trained, mean_loss)
        progress.update(1)
        progress.set_postfix(loss=f"{mean_loss:.4f}")
        row = {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0]}
        if step % args.log_every == 0 or step == args.steps:
            row["throughput_images_per_s"] = window_images / (time.perf_counter() - window_start)
            window_start, window_images = time.perf_counter(), 0
        metrics.log(row, step)
        if step % args.checkpoint_every == 0 or step == args.steps:
            metrics.flush()  # before the checkpoint appears: a resume from it finds every step's metrics
            path = _save_checkpoint(args, out, step, accelerator, pipe, emas, dict(zip(trained, models)))
            _from_main(accelerator, lambda: publish(path))
            if accelerator.check_trigger():  # every process stops at the same step
                if main:
                    mlflow.set_tag("harness.stopped_early", str(step))
                break
    progress.close()

    def finish():
        metrics.flush()
        if args.skip_bad:  # missing files (found up front) and unreadable ones (found while training)
            mlflow.log_metrics({"skipped_missing_images": len(table.attrs.get("skipped", [])),
                                "skipped_unreadable_images": len(dataset.images.skipped)})
        if grids:  # the write-up's figure: checkpoints (rows) against prompts (columns)
            mlflow.log_image(make_image_grid([im for row in grids for im in row], rows=len(grids),
                                             cols=len(grids[0])), "grids/iterations_vs_prompts.png")
        mlflow.log_dict({"prompts": grid_prompts}, "grids/prompts.json")

    _from_main(accelerator, finish)


class _NoMetrics:
    """The metric buffer of a process other than the main one: it logs nothing."""

    def log(self, metrics: dict, step: int) -> None:
        pass

    def flush(self) -> None:
        pass


class _Debug:
    """Test hooks, off unless their variables are set. ``HARNESS_DEBUG_DUMP=DIR``: each process
    appends a line per optimizer step to ``DIR/process_<i>.jsonl`` (the step, the images it
    trained on, a checksum of its trained weights, the loss). ``HARNESS_DEBUG_NAN=PROCESS:STEP``:
    that process's loss becomes NaN at that step."""

    def __init__(self, accelerator, dump: str | None, nan: str | None):
        self.index = accelerator.process_index
        self.dump = Path(dump) / f"process_{self.index}.jsonl" if dump else None
        self.nan = tuple(int(x) for x in nan.split(":")) if nan else None
        self.seen: list[int] = []

    @classmethod
    def from_env(cls, accelerator) -> "_Debug":
        return cls(accelerator, os.environ.get("HARNESS_DEBUG_DUMP"), os.environ.get("HARNESS_DEBUG_NAN"))

    def batch(self, batch) -> None:
        if self.dump:
            self.seen += [int(i) for i in batch["index"]]

    def inject(self, loss, step: int):
        return loss * float("nan") if self.nan == (self.index, step) else loss

    def step(self, step: int, trained: dict, loss: float) -> None:
        if not self.dump:
            return
        with torch.no_grad():
            checksum = {name: float(sum(p.double().abs().sum() for p in m.parameters())) for name, m in trained.items()}
        self.dump.parent.mkdir(parents=True, exist_ok=True)
        with open(self.dump, "a") as f:
            f.write(json.dumps({"step": step, "images": self.seen, "weights": checksum, "loss": loss}) + "\n")
        self.seen = []


def _loss(batch, prior, args, vae, unet, text_encoder, noise_scheduler, weight_dtype, unet_dtype,
          latent_cache=None, empty_ids=None):
    device = next(vae.parameters()).device
    ids = batch["input_ids"].to(device)
    if args.caption_dropout > 0 and empty_ids is not None:  # the prior's class prompt is never dropped
        drop = torch.rand(ids.shape[0]) < args.caption_dropout
        ids = torch.where(drop[:, None].to(device), empty_ids.to(device), ids)
    with torch.no_grad():
        if latent_cache is not None:
            latents = latent_cache.sample(batch["index"]).to(device, dtype=weight_dtype)
        else:
            latents = vae.encode(batch["pixel_values"].to(device, dtype=weight_dtype)).latent_dist.sample() \
                * vae.config.scaling_factor
        if prior is not None:
            n = latents.shape[0]
            pick = torch.randint(len(prior["pixel_values"]), (n,))
            prior_latents = vae.encode(prior["pixel_values"][pick].to(device, dtype=weight_dtype)).latent_dist.sample()
            latents = torch.cat([latents, prior_latents * vae.config.scaling_factor])
            ids = torch.cat([ids, prior["input_ids"].expand(n, -1).to(ids.device)])
    hidden = text_encoder(ids)[0]
    per_image = diffusion_loss(unet, noise_scheduler, latents, hidden, args.snr_gamma, dtype=unet_dtype)
    if prior is None:
        return per_image.mean()
    main, prior_part = per_image.chunk(2)
    return main.mean() + args.prior_loss_weight * prior_part.mean()


# --- weight averaging ---------------------------------------------------------------------------
def _emas(trained: dict, args, accelerator) -> list:
    """One ``EMAModel`` per trained module (none when ``--ema_decay 0``), saved with the state by
    ``_save_emas``: not ``accelerator.register_for_checkpointing``, whose state is a pickle that
    resuming loads with ``torch.load(weights_only=False)``, so a file planted in the output folder
    would run code."""
    if not args.ema_decay:
        return []
    from diffusers.training_utils import EMAModel

    emas = []
    for module in trained.values():
        # warm-up decay 1 - (1 + step)^-2/3 (diffusers' advice for short runs): 0.9 by step 30,
        # 0.99 by step 1000, capped at --ema_decay; early steps are not averaged with the base.
        ema = EMAModel(module.parameters(), decay=args.ema_decay, use_ema_warmup=True, inv_gamma=1.0,
                       power=2 / 3, foreach=True)  # one fused update, not a Python loop over tensors
        emas.append((module, ema))
    return emas


def _save_emas(emas: list, state: Path) -> None:
    """Each average as tensors (safetensors) and its step count: the rest of its state is the
    run's arguments, which resuming requires to be the same."""
    from safetensors.torch import save_file

    for i, (_, ema) in enumerate(emas):
        save_file({str(j): p.contiguous() for j, p in enumerate(ema.shadow_params)}, state / f"ema_{i}.safetensors",
                  metadata={"optimization_step": str(ema.optimization_step)})


def _load_emas(emas: list, state: Path) -> None:
    from safetensors import safe_open

    for i, (_, ema) in enumerate(emas):
        path = state / f"ema_{i}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: {state} holds no weight average to resume "
                                    "(written by an older version?); pass --resume never to start over")
        device = ema.shadow_params[0].device
        with safe_open(path, framework="pt", device=str(device)) as f:
            shadow = [f.get_tensor(str(j)) for j in range(len(ema.shadow_params))]
            step = int(f.metadata()["optimization_step"])
        ema.load_state_dict({"optimization_step": step, "shadow_params": shadow})


@contextlib.contextmanager
def _averaged(emas: list):
    """Swap the averaged weights into the trained modules for the block, then put the raw ones back."""
    for module, ema in emas:
        ema.store(module.parameters())
        ema.copy_to(module.parameters())
    try:
        yield
    finally:
        for module, ema in emas:
            ema.restore(module.parameters())


# --- checkpoints ------------------------------------------------------------------------------
def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step_[0-9]*[0-9]"))


def _save_checkpoint(args, out: Path, step: int, accelerator, pipe, emas: list, prepared: dict | None = None) -> Path:
    """Accelerate state and weight averages (to resume) and a full pipeline of the averaged weights
    (to use), written atomically. Every process saves its part of the state (its random number
    generators); the main one writes the rest and renames the folder into place once all have."""
    final = out / "checkpoints" / f"step_{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "state"))  # the raw weights: a resumed run continues their trajectory
    accelerator.wait_for_everyone()

    def write_pipeline():
        _save_emas(emas, tmp / "state")
        # the modules as trained, unwrapped from what prepare made of them (DDP, mixed precision)
        pipe.register_modules(**{name: accelerator.unwrap_model(model) for name, model in (prepared or {}).items()})
        with _averaged(emas):
            pipe.save_pretrained(tmp / "pipeline")
        (tmp / "step.json").write_text(json.dumps({"step": step}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in _checkpoints(out)[: -args.keep_checkpoints]:  # MLflow keeps every pipeline
            shutil.rmtree(old / "state", ignore_errors=True)

    _from_main(accelerator, write_pipeline)  # the others wait for the folder to be in place
    return final


def _resume(args, key: str, out: Path, run_id: str, accelerator, emas: list, resolution: int) -> int:
    """Restore the newest checkpoint of an earlier run with the same parameters; return its step.
    The caller holds the folder's lock, so the earlier run's process is gone. The main process
    chooses the checkpoint (and does the MLflow part); every process loads it."""
    meta_path = out / "run.json"

    def choose() -> str | None:
        out.mkdir(parents=True, exist_ok=True)
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
        if meta and meta["run_key"] != key and args.resume == "auto":
            raise ValueError(f"{out} holds a run with other parameters (key {meta['run_key']} != {key}); "
                             "pass another --output_dir or --resume never")
        if meta and meta["run_id"] != run_id:
            _end_previous(meta["run_id"])
        resumable = [c for c in _checkpoints(out) if (c / "state").is_dir()]
        if resumable and json.loads((resumable[-1] / "step.json").read_text())["step"] >= args.steps:
            resumable = []  # that run finished: a rerun trains again rather than logging an empty run
        if not (args.resume == "auto" and resumable and meta):
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            meta_path.write_text(json.dumps({"run_key": key, "run_id": run_id}))
            return None
        last = resumable[-1]
        if pickles := sorted((last / "state").glob("custom_checkpoint_*")):
            # accelerate would unpickle it (weights_only=False), running any code in it
            raise ValueError(f"{pickles[0]} is a pickle that this version never writes (an older version's "
                             "weight average, or planted): not loaded. Delete it to resume without it, or "
                             "pass --resume never")
        return str(last)

    chosen = _from_main(accelerator, choose)
    if chosen is None:
        return 0
    last = Path(chosen)
    accelerator.load_state(str(last / "state"))
    _load_emas(emas, last / "state")
    step = json.loads((last / "step.json").read_text())["step"]

    def adopt() -> None:
        previous = json.loads(meta_path.read_text())["run_id"]
        mlflow.set_tags({"harness.resumed_from": previous, "harness.resumed_at_step": str(step)})
        if previous != run_id:
            tracking.copy_metric_history(previous, run_id, ["loss", "lr", "throughput_images_per_s"], step)
            _adopt_checkpoints(previous, out, step, resolution)
        log.info("resuming from %s (step %d) of run %s", last, step, previous)
        meta_path.write_text(json.dumps({"run_key": key, "run_id": run_id}))

    _from_main(accelerator, adopt)
    return step


def _end_previous(previous: str) -> None:
    """Clean up after the folder's earlier run: its process is gone (the lock is ours), but a crash
    that also cut it off from the tracking server, or a kill on another host, which the
    pid-keyed reaper cannot judge, leaves it RUNNING with its last logged model PENDING."""
    from mlflow.exceptions import MlflowException

    client = mlflow.tracking.MlflowClient()
    try:
        status = client.get_run(previous).info.status
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        log.warning("run %s of this output folder is not in this tracking store: nothing to clean up", previous)
        return
    if status == "RUNNING":
        log.warning("run %s of this output folder is RUNNING but its process is gone: marking it KILLED", previous)
        tracking.end_dead_run(previous, "its process died without ending the run (found by the next run "
                                        "in its output folder)", client)
    elif failed := tracking.fail_pending_models(previous, client):
        log.warning("run %s left logged models %s PENDING: marked FAILED", previous, failed)


def _adopt_checkpoints(previous: str, out: Path, step: int, resolution: int) -> None:
    """Make the resumed run own every checkpoint up to ``step``, as if it had trained them: the
    earlier run's checkpoint tags (which it may have copied from its own predecessor), and a
    checkpoint on disk that the earlier run died before logging, logged now from disk."""
    from registry.pyfunc import log_pipeline

    prefix = CHECKPOINT_TAG
    tags = mlflow.tracking.MlflowClient().get_run(previous).data.tags
    logged = {int(k[len(prefix):]): v for k, v in tags.items() if k.startswith(prefix)}
    mlflow.set_tags({f"{prefix}{s:06d}": uri for s, uri in logged.items() if s <= step})
    for path in _checkpoints(out):
        s = json.loads((path / "step.json").read_text())["step"]
        if s <= step and s not in logged:
            log.warning("checkpoint %s was never logged by run %s: logging it now", path, previous)
            info = log_pipeline(path / "pipeline", name=f"checkpoint-{s:06d}", resolution=resolution)
            mlflow.set_tag(f"{prefix}{s:06d}", info.model_uri)
    mlflow.set_tag(tracking.TAG_STEP, str(step))  # the checkpoint resumed from is logged now, too


def _grid(pipe, prompts: dict, args, resolution: int, make_image_grid=None):
    """One row per seed, one column per prompt, each labelled with its finding; returns the grid
    and the first row. (``make_image_grid`` is unused: ``labelled_grid`` tiles with it.)"""
    from harness.grids import labelled_grid

    pipe.set_progress_bar_config(disable=True)
    texts = list(prompts.values())
    rows = []
    for seed in range(args.grid_seeds):
        generator = torch.Generator().manual_seed(seed)
        images = pipe(texts, num_inference_steps=args.grid_steps, height=resolution, width=resolution,
                      generator=generator).images
        rows.append(images)
    return labelled_grid(rows, list(prompts)), rows[0]


if __name__ == "__main__":
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("harness").setLevel(logging.INFO)
    main()
