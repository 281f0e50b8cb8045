"""The shapes domain: a procedural text-to-image world the project controls, for a real teacher without downloads.

A prompt names a shape, its colour, optionally its size and the background colour ("a small red circle on a blue
background", "a green triangle"). The image is 32x32 with that shape somewhere, at a random position, rotation and
exact size, in a slightly jittered colour: one prompt has many valid images, so a generator must learn a
distribution, not a lookup table. What a prompt leaves out (size, background) is drawn at random.

`ShapesClassifier` reads the four attributes back from an image. It is the domain's judge: `prompt_accuracy` is the
fraction of images whose attributes all match their prompt, and its penultimate features are the feature space of
FID and KID (an Inception network trained on ImageNet says little about 32x32 shapes, and is not available offline).
"""
from __future__ import annotations

import math
import os
import random
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmd_ray import ASSETS

RESOLUTION = 32
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
COLOURS = {
    "red": (0.86, 0.16, 0.16),
    "green": (0.18, 0.70, 0.24),
    "blue": (0.16, 0.28, 0.86),
    "yellow": (0.94, 0.86, 0.16),
    "white": (0.96, 0.96, 0.96),
    "black": (0.08, 0.08, 0.08),
}
COLOUR_NAMES = tuple(COLOURS)
# half-extent of the shape as a fraction of the image side, per size word
SIZE_RANGES = {"small": (0.14, 0.20), "large": (0.28, 0.36)}
COLOUR_JITTER = 0.06
ATTRIBUTES = {"shape": SHAPES, "colour": COLOUR_NAMES, "background": COLOUR_NAMES, "size": SIZES}

_PROMPT = re.compile(
    r"^\s*an?\s+(?:(?P<size>small|large)\s+)?(?P<colour>\w+)\s+(?P<shape>circle|square|triangle)"
    r"(?:\s+on\s+an?\s+(?P<background>\w+)\s+background)?\s*$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Scene:
    """What a prompt says; None where it says nothing (drawn at random when rendering, not checked when judging)."""

    shape: str
    colour: str
    size: str | None = None
    background: str | None = None

    @property
    def prompt(self) -> str:
        size = f"{self.size} " if self.size else ""
        background = f" on a {self.background} background" if self.background else ""
        article = "an" if (size or self.colour)[0] in "aeiou" else "a"
        return f"{article} {size}{self.colour} {self.shape}{background}"


def parse_prompt(prompt: str) -> Scene:
    """The scene a prompt describes; ValueError naming the problem for anything outside the domain's grammar."""
    m = _PROMPT.match(prompt)
    if not m:
        raise ValueError(f"not a shapes prompt: {prompt!r} (expected e.g. 'a small red circle on a blue background')")
    scene = Scene(m["shape"].lower(), m["colour"].lower(), m["size"] and m["size"].lower(), m["background"] and m["background"].lower())
    for name in (scene.colour, scene.background):
        if name is not None and name not in COLOURS:
            raise ValueError(f"unknown colour {name!r} in {prompt!r}; known: {', '.join(COLOUR_NAMES)}")
    if scene.background is not None and scene.background == scene.colour:
        raise ValueError(f"shape and background have the same colour in {prompt!r}")
    return scene


def full_scenes() -> list[Scene]:
    """Every fully specified scene (180): the evaluation prompt set."""
    return [Scene(sh, c, s, b) for s in SIZES for c in COLOUR_NAMES for sh in SHAPES for b in COLOUR_NAMES if b != c]


def evaluation_prompts() -> list[str]:
    """The fully specified prompts, shuffled with a fixed seed so that any prefix covers the domain evenly."""
    prompts = [s.prompt for s in full_scenes()]
    random.Random(0).shuffle(prompts)
    return prompts


def random_scenes(n: int, rng: random.Random, partial: float = 0.0) -> list[Scene]:
    """n scenes; with probability `partial` each, the size and the background are left unsaid."""
    scenes = []
    for _ in range(n):
        colour, background = rng.sample(COLOUR_NAMES, 2)
        size = None if rng.random() < partial else rng.choice(SIZES)
        scenes.append(Scene(rng.choice(SHAPES), colour, size, None if rng.random() < partial else background))
    return scenes


def _complete(scene: Scene, rng: random.Random) -> Scene:
    size = scene.size or rng.choice(SIZES)
    background = scene.background or rng.choice([c for c in COLOUR_NAMES if c != scene.colour])
    return Scene(scene.shape, scene.colour, size, background)


def render(scenes: list[Scene], seed: int = 0, resolution: int = RESOLUTION, device: torch.device | str = "cpu") -> Tensor:
    """Images of the scenes, (N, 3, R, R) in [-1, 1]; position, rotation, exact size and colour jitter from `seed`.

    Shapes are signed-distance fields with a one-pixel anti-aliased edge, vectorised over the batch.
    """
    rng = random.Random(seed)
    scenes = [_complete(s, rng) for s in scenes]
    n = len(scenes)
    gen = torch.Generator().manual_seed(seed)
    # the random draws on the CPU (identical on every device), the per-pixel work on `device`
    u = torch.rand(n, 4, generator=gen, dtype=torch.float64)
    jitter = (torch.rand(n, 2, 3, generator=gen, dtype=torch.float64) * 2 - 1) * COLOUR_JITTER
    lo = torch.tensor([SIZE_RANGES[s.size][0] for s in scenes], dtype=torch.float64)
    hi = torch.tensor([SIZE_RANGES[s.size][1] for s in scenes], dtype=torch.float64)
    radius = lo + (hi - lo) * u[:, 0]
    centre = radius[:, None] + (1 - 2 * radius[:, None]) * u[:, 1:3]  # the whole shape stays inside the image
    angle = u[:, 3] * 2 * math.pi
    colour = (torch.tensor([COLOURS[s.colour] for s in scenes], dtype=torch.float64) + jitter[:, 0]).clamp(0, 1)
    background = (torch.tensor([COLOURS[s.background] for s in scenes], dtype=torch.float64) + jitter[:, 1]).clamp(0, 1)
    kind = torch.tensor([SHAPES.index(s.shape) for s in scenes])
    radius, centre, angle, colour, background, kind = (v.to(device) for v in (radius, centre, angle, colour.float(), background.float(), kind))

    coords = (torch.arange(resolution, dtype=torch.float32, device=device) + 0.5) / resolution
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dx, dy = x[None] - centre[:, 0, None, None].float(), y[None] - centre[:, 1, None, None].float()
    cos, sin = torch.cos(angle).float()[:, None, None], torch.sin(angle).float()[:, None, None]
    px, py = cos * dx + sin * dy, -sin * dx + cos * dy  # rotated into the shape's frame
    r = radius.float()[:, None, None]
    kind = kind[:, None, None]
    circle = torch.sqrt(px**2 + py**2) - r
    square = torch.maximum(px.abs(), py.abs()) - r * 0.85  # about the circle's area
    # equilateral triangle with circumradius r: inside all three edges, each at distance r/2 from the centre
    triangle = torch.stack([px * math.cos(a) + py * math.sin(a) for a in (math.pi / 2, math.pi * 7 / 6, math.pi * 11 / 6)]).amax(0) - r / 2
    distance = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))
    coverage = (0.5 - distance * resolution).clamp(0, 1)[:, None]  # one-pixel anti-aliased edge
    image = coverage * colour[:, :, None, None] + (1 - coverage) * background[:, :, None, None]
    return image * 2 - 1


class Renderer:
    """The shapes domain's real images for prompts, as DMD2's GAN takes them (`--gan-real renders`, sd/real_bank.py):
    `check(prompts)` raises ValueError for a prompt it cannot draw; a call draws them. Picklable (it holds nothing)."""

    def check(self, prompts: list[str]) -> None:
        for prompt in prompts:
            parse_prompt(prompt)

    def __call__(self, prompts: list[str], seed: int, resolution: int, device: torch.device | str) -> Tensor:
        return render([parse_prompt(p) for p in prompts], seed=seed, resolution=resolution, device=device)


# --------------------------------------------------------------------------------------------- the judge
class ShapesClassifier(nn.Module):
    """A small CNN reading shape, colour, background and size from a 32x32 image in [-1, 1]."""

    feature_dim = 128

    def __init__(self):
        super().__init__()

        def block(c_in, c_out, stride):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU())

        self.body = nn.Sequential(block(3, 32, 1), block(32, 64, 2), block(64, 64, 1), block(64, 128, 2), block(128, 128, 1), block(128, 128, 2))
        self.heads = nn.ModuleDict({name: nn.Linear(self.feature_dim, len(values)) for name, values in ATTRIBUTES.items()})

    def features(self, images: Tensor) -> Tensor:
        if images.shape[-1] != RESOLUTION:
            images = F.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True, align_corners=False)
        return self.body(images).mean((2, 3))

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        h = self.features(images)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def read(self, images: Tensor) -> list[Scene]:
        logits = self(images)
        idx = {name: logits[name].argmax(1).tolist() for name in ATTRIBUTES}
        return [Scene(SHAPES[s], COLOUR_NAMES[c], SIZES[z], COLOUR_NAMES[b]) for s, c, z, b in zip(idx["shape"], idx["colour"], idx["size"], idx["background"])]


def matches(scene: Scene, seen: Scene) -> bool:
    """Whether what the classifier saw agrees with everything the prompt said."""
    return all(getattr(scene, a) is None or getattr(scene, a) == getattr(seen, a) for a in ("shape", "colour", "size", "background"))


def prompt_accuracy(classifier: ShapesClassifier, images: Tensor, prompts: list[str]) -> float:
    seen = classifier.read(images)
    return sum(matches(parse_prompt(p), s) for p, s in zip(prompts, seen)) / len(prompts)


class ClassifierFeatures(nn.Module):
    """The classifier's penultimate features for torchmetrics' FID/KID (which pass images as uint8 unless told)."""

    def __init__(self, classifier: ShapesClassifier):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)

    def forward(self, images: Tensor) -> Tensor:
        images = images.float()
        if images.max() > 1.5:  # uint8 range
            images = images / 127.5 - 1
        return self.classifier.features(images).double()


def _degrade(images: Tensor, gen: torch.Generator) -> Tensor:
    """Augmentation so the judge reads generated images too: noise, blur and contrast changes of random strength."""
    n = images.shape[0]
    strength = torch.rand(n, 1, 1, 1, generator=gen, device="cpu").to(images.device)
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    images = torch.where(torch.rand(n, 1, 1, 1, generator=gen).to(images.device) < 0.3, blurred, images)
    noise = torch.randn(images.shape, generator=gen).to(images.device) * 0.15 * strength
    contrast = 1 + (torch.rand(n, 1, 1, 1, generator=gen).to(images.device) - 0.5) * 0.3
    return (images * contrast + noise).clamp(-1, 1)


def train_classifier(steps: int = 3000, batch_size: int = 256, device: str = "cpu", seed: int = 0, log=print) -> ShapesClassifier:
    """Trains the judge on freshly rendered scenes (every batch new); a few minutes on a GPU, longer on CPU."""
    torch.manual_seed(seed)
    model = ShapesClassifier().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    for step in range(steps):
        scenes = [_complete(s, rng) for s in random_scenes(batch_size, rng)]
        images = _degrade(render(scenes, seed=rng.getrandbits(62), device=device), gen)
        logits = model(images)
        loss = sum(F.cross_entropy(logits[a], torch.tensor([values.index(getattr(s, a)) for s in scenes], device=device)) for a, values in ATTRIBUTES.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 500 == 0 or step == steps - 1:
            log(f"classifier step {step}: loss {loss.item():.4f}")
    return model.eval()


# --------------------------------------------------------------------------------------------- the shipped judge
CLASSIFIER_PATH = os.path.join(ASSETS, "shapes_classifier.safetensors")


def load_classifier(path: str = CLASSIFIER_PATH, device: str | torch.device = "cpu") -> ShapesClassifier:
    from safetensors.torch import load_file

    if not os.path.exists(path):
        raise FileNotFoundError(f"no shapes classifier at {path}: train one with `python -m dmd_ray.demos.shapes --out {path}`")
    model = ShapesClassifier()
    model.load_state_dict(load_file(path))
    return model.to(device).eval().requires_grad_(False)


@torch.no_grad()
def classifier_accuracy(model: ShapesClassifier, num_images: int = 2048, seed: int = 99, device: str | torch.device = "cpu") -> float:
    """prompt_accuracy on freshly rendered, clean images of full prompts: the judge's own error rate."""
    prompts = [s.prompt for s in random_scenes(num_images, random.Random(seed))]
    return prompt_accuracy(model, render([parse_prompt(p) for p in prompts], seed=seed, device=device), prompts)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from safetensors.torch import save_file

    parser = argparse.ArgumentParser(description="Train the shapes domain's attribute classifier (the evaluation judge).")
    parser.add_argument("--out", default=CLASSIFIER_PATH)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = train_classifier(args.steps, args.batch_size, device, args.seed)
    print(f"prompt accuracy on clean renders: {classifier_accuracy(model, device=device):.4f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, args.out)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
