"""Evaluating generators on the shapes domain (jobs/evaluate.py runs this over Ray Data): making images for
(prompt, seed) rows with one model, and the metrics (FID/KID in the judge's feature space, prompt accuracy, LPIPS
diversity). No Ray here: the image maker is a plain callable class that Ray Data runs as an actor pool."""
from __future__ import annotations

import numpy as np
import torch

from dmd_ray import shapes


class ImageMaker:
    """Ray Data actor: (prompt, seed) rows -> uint8 images of one model. Plain Python, testable without Ray."""

    def __init__(self, spec: str, cfg: dict):
        from dmd_ray.denoiser import GuidedDenoiser
        from dmd_ray.generator import OneStepGenerator
        from dmd_ray.models import load_teacher
        from dmd_ray.sampling import make_scheduler

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        kind, _, source = spec.partition(":") if spec.startswith(("teacher:", "teacher-onestep:")) else ("generator", "", spec)
        if kind == "generator":
            from dmd_ray.serving import read_generator_info, resolve_generator

            folder = resolve_generator(source)
            timestep = int(read_generator_info(folder).get("generator_timestep", -1))
            source = folder
        self.teacher = load_teacher(source).to(device=self.device)
        schedule, prediction_type = self.teacher.schedule, self.teacher.prediction_type
        self.latent_shape = self.teacher.latent_shape(self.teacher.default_resolution)
        if kind == "teacher":
            self.scheduler = make_scheduler(cfg["sampler"], self.teacher.scheduler)
            self.denoiser = GuidedDenoiser(self.teacher.denoiser(), cfg["guidance_scale"], self.teacher.uncond_embedding())
            self.steps = cfg["steps"]
        else:
            guidance = cfg["guidance_scale"] if kind == "teacher-onestep" else 1.0
            net = GuidedDenoiser(self.teacher.denoiser(), guidance, self.teacher.uncond_embedding() if guidance != 1.0 else None)
            self.one_step = OneStepGenerator(net, schedule, prediction_type, None if kind == "teacher-onestep" else (timestep if timestep >= 0 else None))
        self.kind = kind

    def __call__(self, batch: dict) -> dict:
        from dmd_ray.images import to_uint8
        from dmd_ray.pairs import pair_noise
        from dmd_ray.sampling import ode_sample

        prompts, seeds = [str(p) for p in batch["prompt"]], [int(s) for s in batch["seed"]]
        noise = torch.stack([pair_noise(s, self.latent_shape) for s in seeds]).to(self.device)
        with torch.inference_mode():
            cond = self.teacher.encode_prompts(prompts)
            latents = ode_sample(self.denoiser, self.scheduler, noise, cond, self.steps) if self.kind == "teacher" else self.one_step(noise, cond)
            images = self.teacher.decode(latents).float().clamp(-1, 1)
        return {"prompt": np.array(prompts), "seed": np.array(seeds), "image": to_uint8(images)}


def metrics(images: np.ndarray, prompts: list[str], judge, real: torch.Tensor) -> dict:
    """`images` uint8 NHWC and their prompts; `real` rendered uint8 NCHW images of the same prompts."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    from dmd_ray.losses import LPIPSDistance

    fake = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
    features = shapes.ClassifierFeatures(judge)
    fid = FrechetInceptionDistance(feature=features, reset_real_features=False)
    kid = KernelInceptionDistance(feature=features, subset_size=min(100, len(fake) // 2), subsets=20)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    kid_mean, kid_std = kid.compute()
    as_float = fake.float() / 127.5 - 1
    result = {
        "fid": float(fid.compute()),
        "kid": float(kid_mean),
        "kid_std": float(kid_std),
        "prompt_accuracy": shapes.prompt_accuracy(judge, as_float, prompts),
        "num_samples": len(prompts),
    }
    n_prompts = len(shapes.evaluation_prompts())
    if len(prompts) > n_prompts:
        lpips = LPIPSDistance("alex", pretrained_backbone=False, min_size=64)
        a, b = as_float[: len(prompts) - n_prompts], as_float[n_prompts:]
        with torch.no_grad():
            result["lpips_diversity"] = float(torch.cat([lpips(a[i : i + 256], b[i : i + 256]) for i in range(0, len(a), 256)]).mean())
    return result
