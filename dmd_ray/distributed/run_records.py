"""What a distillation run leaves besides its export: checkpoints, sample grids and the metrics history.

Checkpoints hold both DeepSpeed engines (weights and optimizer state), each worker's RNG state and the generator's
weight average where the run keeps one (safetensors) and, in trainer_state.json, the step, every worker's pair-stream
position and the config: a resumed run replays the uninterrupted one exactly. The history is <output>/metrics.jsonl
(one row per logged step, every `log_every` steps and at checkpoints, written at least once a minute; rows of an
attempt that died are replaced on replay), plotted into <output>/metrics.png at the end and TensorBoard logs under
<output>/tensorboard (staged locally for s3:// outputs).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time

import torch

from dmd_ray.data import storage
from dmd_ray.data.pairs import pair_seed
from dmd_ray.images import grid, png_bytes, to_uint8
from dmd_ray.method.sampling import generate_from_seeds

SAMPLE_SEED_OFFSET = 12345  # sample-grid noise never coincides with a pair's
AVERAGE_FILE = "generator_average.safetensors"  # a checkpoint's weight average of the generator (ema_decay)
FLUSH_EVERY_S = 60.0  # the history is also written at checkpoints and at the end


def worker_print(message: str) -> None:
    """One line from a Ray Train worker to the job's output, once: Ray Train 2.60 replaces print() on its workers
    with one that logs through its logger and also copies the line to the redirected stdout, so every line reached
    the driver twice. The process's own stdout is forwarded once."""
    print(message, file=sys.__stdout__, flush=True)


def history_uri(output: str) -> str:
    return storage.join(output, "metrics.jsonl")


def read_history(output: str) -> list[dict]:
    """The run's metrics, one row per logged step in step order (the last row written for a step wins)."""
    uri = history_uri(output)
    if not storage.exists(uri):
        return []
    by_step = {int(r["step"]): r for r in (json.loads(line) for line in storage.read_bytes(uri).decode().splitlines() if line.strip())}
    return [by_step[s] for s in sorted(by_step)]


@torch.no_grad()
def generated_images(generator, teacher, prompts: list[str], seeds: list[int], latent_shape, device, batch_size: int = 64):
    """uint8 NHWC images of the generator from the seeded noise of `seeds`, eager: a new batch size would compile
    (and CUDA-graph) graphs of its own. Every rank calls it (ZeRO-3 gathers weights collectively)."""
    import numpy as np

    out = []
    with torch.compiler.set_stance("force_eager"):
        for i in range(0, len(prompts), batch_size):
            latents = generate_from_seeds(generator, seeds[i : i + batch_size], latent_shape, teacher.encode_prompts(prompts[i : i + batch_size]), device)
            out.append(to_uint8(teacher.decode(latents)))
    return np.concatenate(out)


class RunRecords:
    """One per worker; rank 0 writes the shared files, every rank takes part in checkpoints and sample grids."""

    def __init__(self, cfg, rank: int, world: int):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.history = read_history(cfg.output) if rank == 0 else []
        self.flushed_at = time.monotonic()
        self.writer = None
        if rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = tempfile.mkdtemp(prefix="dmd-ray-tb-") if storage.is_s3(cfg.output) else storage.join(cfg.output, "tensorboard")
            self.writer = SummaryWriter(self.tensorboard)

    # ---------------------------------------------------------------------------------------- checkpoints
    def resume(self, gen_engine, fake_engine, rng: torch.Generator, average=None) -> tuple[int, dict | None]:
        """Loads the latest checkpoint, if any, into the engines, `rng` and the generator's weight `average`
        (ema_decay): (step, this worker's stream state)."""
        import ray.train
        from safetensors.torch import load_file

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return 0, None
        with checkpoint.as_directory() as d:
            # The lr schedule is a function of the step: replayed, not loaded (checkpoints written before 2026-12
            # hold DeepSpeed's WarmupLR state, which torch's LambdaLR cannot read)
            gen_engine.load_checkpoint(os.path.join(d, "generator"), load_lr_scheduler_states=False)
            fake_engine.load_checkpoint(os.path.join(d, "fake"), load_lr_scheduler_states=False)
            with open(os.path.join(d, "trainer_state.json")) as f:
                state = json.load(f)
            for engine in (gen_engine, fake_engine):
                for _ in range(state["step"]):
                    engine.lr_scheduler.step()
            if average is not None:
                average_file = os.path.join(d, AVERAGE_FILE)
                if os.path.exists(average_file):
                    average.load(load_file(average_file))
                elif self.rank == 0:  # ema_decay turned on for a resumed run: the average starts here
                    worker_print(f"[distill] the checkpoint of step {state['step']} holds no weight average: it starts from its weights")
            rng_file = os.path.join(d, f"rng_rank{self.rank}.safetensors")
            stream_state = None
            if state["world_size"] == self.world and os.path.exists(rng_file):
                rng.set_state(load_file(rng_file)["rng"])
                stream_state = state["pair_streams"][self.rank]
            else:  # resumed on another number of workers: exact replay is impossible, start a fresh epoch order
                rng.manual_seed(self.cfg.seed * 1000 + self.rank + 7919 * state["step"])
        if self.rank == 0:
            worker_print(f"[distill] resumed from step {state['step']}")
        return state["step"], stream_state

    def save_checkpoint(self, step: int, metrics: dict, gen_engine, fake_engine, rng: torch.Generator, stream, average=None) -> None:
        import ray.train
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory(prefix="dmd-ray-ckpt-") as d:
            gen_engine.save_checkpoint(os.path.join(d, "generator"), tag=f"step{step}")
            fake_engine.save_checkpoint(os.path.join(d, "fake"), tag=f"step{step}")
            save_file({"rng": rng.get_state()}, os.path.join(d, f"rng_rank{self.rank}.safetensors"))
            if average is not None and self.rank == 0:  # the same on every rank (ZeRO 0-2 replicate the weights)
                save_file({k: v.cpu().contiguous() for k, v in average.shadow.items()}, os.path.join(d, AVERAGE_FILE))
            # every rank's stream position, gathered so that rank 0 can write one trainer_state.json
            states = [None] * self.world
            torch.distributed.all_gather_object(states, stream.state())
            if self.rank == 0:
                with open(os.path.join(d, "trainer_state.json"), "w") as f:
                    json.dump({"step": step, "world_size": self.world, "pair_streams": states, "config": dataclasses.asdict(self.cfg)}, f)
                self.flush()
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=f"checkpoint_step{step:07d}")

    # ---------------------------------------------------------------------------------------- metrics
    def record(self, metrics: dict, echo: bool = True) -> None:
        """Keeps a logged step's metrics (rank 0): history, TensorBoard, and a log line when `echo`."""
        if self.rank != 0:
            return
        self.history.append(metrics)
        for k, v in metrics.items():
            if k != "step":
                self.writer.add_scalar(k, v, metrics["step"])
        if echo:
            worker_print("[distill] " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
        if time.monotonic() - self.flushed_at > FLUSH_EVERY_S:  # a run killed between checkpoints keeps its history
            self.flush()

    def flush(self) -> None:
        """Writes the history and publishes TensorBoard's files (rank 0)."""
        if self.rank != 0:
            return
        self.flushed_at = time.monotonic()
        by_step = {int(row["step"]): row for row in self.history}
        storage.write_bytes(history_uri(self.cfg.output), "".join(json.dumps(by_step[s]) + "\n" for s in sorted(by_step)).encode())
        self.writer.flush()
        if storage.is_s3(self.cfg.output):
            storage.upload_tree(self.tensorboard, storage.join(self.cfg.output, "tensorboard"))

    def close(self) -> None:
        self.flush()
        if self.writer is not None:
            self.writer.close()
        if self.rank == 0 and self.history:
            storage.write_bytes(storage.join(self.cfg.output, "metrics.png"), plot_history(self.history))

    # ---------------------------------------------------------------------------------------- samples
    def sample_grid(self, tag: str, generator, teacher, latent_shape, device) -> None:
        """The generator on fixed noise and the config's sample prompts. Every rank runs it (ZeRO-3 gathers weights
        collectively); rank 0 writes samples/<tag>.png and samples/latest.png."""
        prompts = list(self.cfg.sample_prompts)
        seeds = [pair_seed(self.cfg.seed + SAMPLE_SEED_OFFSET, i) for i in range(len(prompts))]
        images = generated_images(generator, teacher, prompts, seeds, latent_shape, device)
        if self.rank != 0:
            return
        data = png_bytes(grid(images, columns=len(prompts)), min_size=256)
        for name in (f"{tag}.png", "latest.png"):
            storage.write_bytes(storage.join(self.cfg.output, "samples", name), data)


def plot_history(history: list[dict]) -> bytes:
    """PNG of a run's history: the losses, and the in-training evaluation (FID, prompt accuracy) when there is one."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(history, key=lambda r: r["step"])
    losses = [k for k in ("loss_dm", "loss_reg", "loss_fake", "loss_gan_generator", "loss_gan_discriminator") if any(k in r for r in rows)]
    evals = [k for k in ("eval_fid", "eval_prompt_accuracy") if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, 1 + len(evals), figsize=(5 * (1 + len(evals)), 3.6), squeeze=False)
    for ax, keys in zip(axes[0], [losses, *[[k] for k in evals]]):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot(*zip(*points), marker="o" if key.startswith("eval_") else None, markersize=3, label=key)
        ax.set_xlabel("iteration")
        ax.set_title("losses" if keys is losses else keys[0].removeprefix("eval_").replace("_", " "))
        ax.grid(alpha=0.3)
        if keys is losses:
            ax.set_yscale("log")
            ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
