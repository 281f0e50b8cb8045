"""Evaluating generators on the shapes domain (`evaluate`, which jobs/evaluate.py runs): Ray Data batch inference
over the evaluation prompts, then FID, KID, prompt accuracy and LPIPS diversity, and a comparison grid (same prompts
and seeds in every row).

A model is an exported generator (built-in name, local folder or s3://; run in its one step, or a DMD2 multi-step
generator in its steps, each sample's re-noising drawn from its seed as diffusers' pipeline draws it), `teacher:SPEC`
(the teacher's guided ODE sampler: --sampler, --steps, --guidance-scale) or `teacher-onestep:SPEC` (the teacher's
network once at t = T-1, read as x0, guided: what DMD starts from). Sample i has prompt i mod 180 of the evaluation set and
seed --seed + i, whatever the model, so rows of the grid compare like with like.

FID and KID are computed in the feature space of the shapes classifier (the domain's judge, shipped in the package)
against rendered images of the same prompts: Inception features say little about 32x32 shapes, and their weights are
not available offline. `prompt_accuracy` is the fraction of images whose four attributes the judge reads as the
prompt's. `lpips_diversity` is the mean LPIPS between two images of the same prompt (seeds i and i + 180; random
AlexNet backbone with the package's calibrated heads, offline): 0 is a collapsed generator.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import time

import numpy as np
import torch

from dmd_ray.config import EvalConfig
from dmd_ray.data import storage
from dmd_ray.demos import shapes
from dmd_ray.distributed.cluster import gpus_per_actor, init_ray
from dmd_ray.images import grid, png_bytes, to_uint8, to_uint8_tensor
from dmd_ray.method.denoiser import GuidedDenoiser
from dmd_ray.method.generator import MultiStepGenerator, OneStepGenerator
from dmd_ray.method.losses import LPIPSDistance
from dmd_ray.method.sampling import generate_from_seeds, ode_sample, seeded_noise
from dmd_ray.sd.export import exported_sampler
from dmd_ray.sd.resolve import describe_teacher, load_teacher, read_generator_info, resolve_generator
from dmd_ray.sd.teacher_sampler import make_scheduler


def model_kind(spec: str) -> tuple[str, str]:
    """("teacher" | "teacher-onestep" | "generator", what it loads) of one `--model` entry."""
    kind, _, source = spec.partition(":") if spec.startswith(("teacher:", "teacher-onestep:")) else ("generator", "", spec)
    return kind, source


def check_models(specs: list[str]) -> None:
    """Every model loads (weights present, or reachable for a hub id): a bad last entry must not cost the minutes of
    sampling the ones before it. Raises ModelNotFoundError naming the spec."""
    for spec in specs:
        kind, source = model_kind(spec)
        resolve_generator(source) if kind == "generator" else describe_teacher(source)


class ImageMaker:
    """Ray Data actor: (prompt, seed) rows -> uint8 images of one model. Plain Python, testable without Ray."""

    def __init__(self, spec: str, cfg: EvalConfig):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        kind, source = model_kind(spec)
        if kind == "generator":
            folder = resolve_generator(source)
            info = read_generator_info(folder)
            timestep, timesteps = int(info.get("generator_timestep", -1)), [int(t) for t in info.get("generator_timesteps", [])]
            source = folder
        self.teacher = load_teacher(source).to(device=self.device)
        schedule, prediction_type = self.teacher.schedule, self.teacher.prediction_type
        self.latent_shape = self.teacher.latent_shape(self.teacher.default_resolution)
        if kind == "teacher":
            self.scheduler = make_scheduler(cfg.sampler, self.teacher.scheduler)
            self.denoiser = GuidedDenoiser(self.teacher.denoiser(), cfg.guidance_scale, self.teacher.uncond_embedding())
            self.steps = cfg.steps
        else:
            guidance = cfg.guidance_scale if kind == "teacher-onestep" else 1.0
            net = GuidedDenoiser(self.teacher.denoiser(), guidance, self.teacher.uncond_embedding() if guidance != 1.0 else None)
            if kind == "generator" and len(timesteps) > 1:  # DMD2's multi-step generator, run as its export runs in diffusers
                self.generator = MultiStepGenerator(net, schedule, prediction_type, timesteps, exported_sampler(source))
            else:
                self.generator = OneStepGenerator(net, schedule, prediction_type, None if kind == "teacher-onestep" else (timestep if timestep >= 0 else None))
        self.kind = kind

    def __call__(self, batch: dict) -> dict:
        prompts, seeds = [str(p) for p in batch["prompt"]], [int(s) for s in batch["seed"]]
        with torch.inference_mode():
            cond = self.teacher.encode_prompts(prompts)
            if self.kind == "teacher":
                noise = torch.stack([seeded_noise(s, self.latent_shape) for s in seeds]).to(self.device)
                latents = ode_sample(self.denoiser, self.scheduler, noise, cond, self.steps)
            else:
                latents = generate_from_seeds(self.generator, seeds, self.latent_shape, cond, self.device)
            images = self.teacher.decode(latents).float().clamp(-1, 1)
        return {"prompt": np.array(prompts), "seed": np.array(seeds), "image": to_uint8(images)}


def metrics(images: np.ndarray, prompts: list[str], judge, real: torch.Tensor, intervals: bool = True, per_sample: dict | None = None) -> dict:
    """`images` uint8 NHWC and their prompts; `real` rendered uint8 NCHW images of the same prompts. With `intervals`,
    95% bootstrap intervals of FID and prompt accuracy (bootstrap_intervals); `per_sample` receives each image's judge
    features and correctness (for paired_intervals)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    fake = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    features = shapes.ClassifierFeatures(judge)
    # sync_on_compute off: inside a Ray Train run (TrainingProbe) only rank 0 scores, and torchmetrics would otherwise
    # wait for the other ranks in an all-gather
    fid = FrechetInceptionDistance(feature=features, reset_real_features=False, sync_on_compute=False)
    kid = KernelInceptionDistance(feature=features, subset_size=min(100, len(fake) // 2), subsets=20, sync_on_compute=False)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):  # KID's random subsets: the same images give the same KID in every run
        torch.manual_seed(0)
        kid_mean, kid_std = kid.compute()
    as_float = fake.float() / 127.5 - 1
    scenes, seen = [shapes.parse_prompt(p) for p in prompts], judge.read(as_float)
    correct = torch.tensor([shapes.matches(scene, s) for scene, s in zip(scenes, seen)])
    result = {
        "fid": float(fid.compute()),
        "kid": float(kid_mean),
        "kid_std": float(kid_std),
        "prompt_accuracy": float(correct.double().mean()),
        # which attributes a generator gets wrong (of the prompts that name each)
        **{f"{a}_accuracy": attribute_accuracy(scenes, seen, a) for a in ("shape", "colour", "size", "background")},
        "shape_read_as": shape_read_as(scenes, seen),
        "num_samples": len(prompts),
    }
    if intervals or per_sample is not None:
        with torch.no_grad():
            fake_features, real_features = features(fake), features(real)
        if intervals:
            result.update(bootstrap_intervals(fake_features, real_features, correct))
        if per_sample is not None:
            per_sample.update(features=fake_features, real_features=real_features, correct=correct)
    n_prompts = len(shapes.evaluation_prompts())
    if len(prompts) > n_prompts:
        lpips = LPIPSDistance("alex", pretrained_backbone=False, min_size=64)
        a, b = as_float[: len(prompts) - n_prompts], as_float[n_prompts:]
        with torch.no_grad():
            result["lpips_diversity"] = float(torch.cat([lpips(a[i : i + 256], b[i : i + 256]) for i in range(0, len(a), 256)]).mean())
    return result


def reference_renders(prompts: list[str], seed: int) -> torch.Tensor:
    """The real images a model's samples are scored against: renders of the same prompts, uint8 NCHW, drawn from
    their own seed (the evaluation's and the probe's `seed` + 10**6), so they are never the images a model copies."""
    return to_uint8_tensor(shapes.render([shapes.parse_prompt(p) for p in prompts], seed=seed + 10**6))


def attribute_accuracy(scenes: list, seen: list, attribute: str) -> float:
    named = [(getattr(a, attribute), getattr(b, attribute)) for a, b in zip(scenes, seen) if getattr(a, attribute) is not None]
    return sum(x == y for x, y in named) / len(named) if named else float("nan")


def shape_read_as(scenes: list, seen: list) -> dict[str, dict[str, float]]:
    """Per prompted shape and size ("small square"; "any square" when the prompt names no size), the fractions of its
    images that the judge read as each shape: which shapes a generator (or its teacher, or the VAE they share) turns
    into others."""
    counts: dict[str, collections.Counter] = {}
    for scene, read in zip(scenes, seen):  # every prompt names its shape
        counts.setdefault(f"{scene.size or 'any'} {scene.shape}", collections.Counter())[read.shape] += 1
    return {key: {shape: c[shape] / sum(c.values()) for shape in shapes.SHAPES} for key, c in sorted(counts.items())}


def frechet_distance(mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor, cov_b: torch.Tensor) -> float:
    """FID's formula: |m_a - m_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^1/2), the trace of the root from C_a C_b's eigenvalues."""
    root_trace = torch.linalg.eigvals(cov_a @ cov_b).real.clamp(min=0).sqrt().sum()
    return float((mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * root_trace)


def fid_against(real_features: torch.Tensor):
    """FID of a set of judge features against `real_features`, whose mean and covariance are computed once."""
    real_mean, real_cov = real_features.mean(0), torch.cov(real_features.T)
    return lambda features: frechet_distance(features.mean(0), torch.cov(features.T), real_mean, real_cov)


def bootstrap_intervals(fake_features: torch.Tensor, real_features: torch.Tensor, correct: torch.Tensor,
                        resamples: int = 200, seed: int = 0) -> dict:
    """95% intervals of FID and prompt accuracy: the estimate +- 1.96 standard deviations over resamplings (with
    replacement) of the generated images, the renders held fixed. The spread, not the percentiles: a resample's
    repeated images shrink its covariance, which biases FID upward by more than its spread at small sizes."""
    gen = torch.Generator().manual_seed(seed)
    fid_of = fid_against(real_features)
    fids, accuracies = [], []
    for _ in range(resamples):
        pick = torch.randint(len(fake_features), (len(fake_features),), generator=gen)
        fids.append(fid_of(fake_features[pick]))
        accuracies.append(float(correct[pick].double().mean()))
    fid = fid_of(fake_features)
    accuracy = float(correct.double().mean())
    fid_sd, accuracy_sd = (float(torch.tensor(v, dtype=torch.float64).std()) for v in (fids, accuracies))
    return {"fid_ci95": [fid - 1.96 * fid_sd, fid + 1.96 * fid_sd],
            "prompt_accuracy_ci95": [accuracy - 1.96 * accuracy_sd, accuracy + 1.96 * accuracy_sd]}


def paired_intervals(baseline: dict, other: dict, resamples: int = 200, seed: int = 0) -> dict:
    """`other` minus `baseline` (each metrics' per_sample, sample i of both from the same prompt and seed): FID and
    accuracy differences, each with a 95% interval (+- 1.96 standard deviations) over resamplings that pick the same
    samples from both models. The shared prompts and seeds cancel out of the difference, which is why its interval is
    narrower than the two models' own intervals suggest."""
    gen = torch.Generator().manual_seed(seed)
    fid = fid_against(baseline["real_features"])

    def differences(pick) -> tuple[float, float]:
        return (fid(other["features"][pick]) - fid(baseline["features"][pick]),
                float(other["correct"][pick].double().mean() - baseline["correct"][pick].double().mean()))

    n = len(baseline["correct"])
    if len(other["correct"]) != n:
        raise ValueError(f"paired intervals need the same samples: {n} against {len(other['correct'])}")
    spread = torch.tensor([differences(torch.randint(n, (n,), generator=gen)) for _ in range(resamples)], dtype=torch.float64).std(0)
    fid_difference, accuracy_difference = differences(torch.arange(n))
    return {"fid_difference": fid_difference, "fid_difference_ci95": [fid_difference - 1.96 * float(spread[0]), fid_difference + 1.96 * float(spread[0])],
            "prompt_accuracy_difference": accuracy_difference,
            "prompt_accuracy_difference_ci95": [accuracy_difference - 1.96 * float(spread[1]), accuracy_difference + 1.96 * float(spread[1])]}


class TrainingProbe:
    """Quality during distillation (DistillConfig.eval_every): `rows()` gives the prompts and seeds the worker's
    generator draws, the call scores its uint8 images with `metrics` against renders of the same prompts. The
    evaluation prompts in order, seeds from `seed`: the same rows as the first `num_samples` of jobs/evaluate.py."""

    def __init__(self, num_samples: int = 360, seed: int = 0):
        self.num_samples, self.seed = num_samples, seed
        self._judge = self._real = None

    def rows(self) -> tuple[list[str], list[int]]:
        rows = sample_rows(EvalConfig(num_samples=self.num_samples, seed=self.seed))
        return [r["prompt"] for r in rows], [r["seed"] for r in rows]

    def __call__(self, images: np.ndarray, prompts: list[str]) -> dict:
        if self._judge is None:  # once per worker: the judge and the rendered reference images
            self._judge = shapes.load_classifier()
            self._real = reference_renders(prompts, self.seed)
        result = metrics(images, prompts, self._judge, self._real, intervals=False)
        return {k: result[k] for k in ("fid", "prompt_accuracy", *(["lpips_diversity"] if "lpips_diversity" in result else []))}


def comparison_grid(specs: list[str], columns: int = 8, seed: int = 0) -> np.ndarray:
    """One row per model of the first `columns` evaluation prompts and seeds, under a row of renders: in-process
    (no Ray), for small grids such as the end of the README's demo."""
    cfg = EvalConfig(num_samples=columns, seed=seed)
    rows = sample_rows(cfg)
    batch = {"prompt": [r["prompt"] for r in rows], "seed": [r["seed"] for r in rows]}
    real = reference_renders(batch["prompt"], seed).permute(0, 2, 3, 1).numpy()
    return grid(np.concatenate([real, *(ImageMaker(spec, cfg)(batch)["image"] for spec in specs)]), columns)


# --------------------------------------------------------------------------------------------- the job
def log(msg: str) -> None:
    print(f"[evaluate {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sample_rows(cfg: EvalConfig) -> list[dict]:
    prompts = shapes.evaluation_prompts()
    return [{"prompt": prompts[i % len(prompts)], "seed": cfg.seed + i} for i in range(cfg.num_samples)]


def generate(spec: str, cfg: EvalConfig) -> tuple[np.ndarray, list[str]]:
    """All samples of one model through a Ray Data actor pool; returned in row order."""
    import ray.data

    gpus = gpus_per_actor(cfg.gpus_per_actor)
    ds = ray.data.from_items(sample_rows(cfg)).map_batches(
        ImageMaker,
        fn_constructor_kwargs={"spec": spec, "cfg": cfg},
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_gpus=gpus,
        num_cpus=1 if gpus else 0.5,  # fractional on CPU: the read tasks must find a slot beside the actors
    )
    rows = sorted(ds.take_all(), key=lambda r: r["seed"])
    return np.stack([r["image"] for r in rows]), [r["prompt"] for r in rows]


def evaluate(cfg: EvalConfig) -> dict:
    """Samples every model of `cfg.model` through Ray Data, scores them and writes metrics.json and grid.png."""
    cfg.check()
    # the actors run in another directory: local model folders become absolute paths here
    def absolute(spec: str) -> str:
        kind, source = model_kind(spec)
        return ("" if kind == "generator" else f"{kind}:") + storage.absolute(source, only_if_exists=True)

    cfg = dataclasses.replace(cfg, model=",".join(map(absolute, cfg.models())), output=storage.absolute(cfg.output),
                              paired_against=absolute(cfg.paired_against) if cfg.paired_against else "")
    storage.check_access(cfg.output)
    check_models(cfg.models())
    init_ray()  # after the checks: a refused evaluation starts no cluster
    judge = shapes.load_classifier()
    rows = sample_rows(cfg)
    real = reference_renders([r["prompt"] for r in rows], cfg.seed)
    results, grid_rows, per_sample = {}, [], {}
    for spec in cfg.models():
        start = time.perf_counter()
        images, prompts = generate(spec, cfg)
        per_sample[spec] = {}
        results[spec] = {**metrics(images, prompts, judge, real, per_sample=per_sample[spec]), "seconds": round(time.perf_counter() - start, 1)}
        log(f"{spec}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in results[spec].items()
                                    if not k.endswith("ci95") and not isinstance(v, dict))
            + ", FID 95% interval [{:.3f}, {:.3f}], accuracy [{:.3f}, {:.3f}]".format(*results[spec]["fid_ci95"], *results[spec]["prompt_accuracy_ci95"]))
        grid_rows.append(images[: cfg.grid_columns])
    if cfg.paired_against:
        for spec in (s for s in cfg.models() if s != cfg.paired_against):
            paired = paired_intervals(per_sample[cfg.paired_against], per_sample[spec])
            results[spec][f"paired_against {cfg.paired_against}"] = paired
            log(f"{spec} minus {cfg.paired_against}: FID {paired['fid_difference']:+.3f} [{paired['fid_difference_ci95'][0]:+.3f}, "
                f"{paired['fid_difference_ci95'][1]:+.3f}], accuracy {paired['prompt_accuracy_difference']:+.3f} "
                f"[{paired['prompt_accuracy_difference_ci95'][0]:+.3f}, {paired['prompt_accuracy_difference_ci95'][1]:+.3f}]")
    real_row = real[: cfg.grid_columns].permute(0, 2, 3, 1).numpy()
    summary = {"models": results, "rows_of_grid": ["rendered (a real image of each prompt)", *cfg.models()],
               "columns_of_grid": [r["prompt"] for r in rows[: cfg.grid_columns]], "config": cfg.__dict__}
    storage.write_bytes(storage.join(cfg.output, "metrics.json"), json.dumps(summary, indent=1).encode())
    storage.write_bytes(storage.join(cfg.output, "grid.png"), png_bytes(grid(np.concatenate([real_row, *grid_rows]), cfg.grid_columns), 64 * cfg.grid_columns))
    log(f"metrics at {storage.join(cfg.output, 'metrics.json')}, grid at {storage.join(cfg.output, 'grid.png')}")
    return summary
