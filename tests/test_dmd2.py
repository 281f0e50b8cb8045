"""DMD2's switches on small networks without Ray: the multi-step generator (its schedule, sampling, backward
simulation and diffusers export), the GAN term (which network each side's gradients reach), one DMD2 iteration on the
tiny teacher, and the refusals of combinations that cannot train."""
import copy

import numpy as np
import pytest
import torch

from dmd_ray.config import DistillConfig
from dmd_ray.demos.toy2d import MLPDenoiser
from dmd_ray.method.gan import FeatureClassifier, GANLoss
from dmd_ray.method.generator import MultiStepGenerator, OneStepGenerator
from dmd_ray.method.objective import read_logs
from dmd_ray.method.optim import optimizer_update
from dmd_ray.method.schedule import NoiseSchedule
from dmd_ray.sd.architectures import build_tiny_teacher
from dmd_ray.sd.conditioning import PromptConditions
from dmd_ray.sd.dmd import build_step, gan_classifier, generator_timesteps
from dmd_ray.sd.resolve import read_generator_info
from dmd_ray.sd.teacher import UNetDenoiser, unet_features
from dmd_ray.typed_config import ConfigError

SCHEDULE = NoiseSchedule.from_betas("scaled_linear", 0.00085, 0.012, 1000)


class Recording(torch.nn.Module):
    """An MLP denoiser that records each call's timesteps and whether it builds a graph."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = MLPDenoiser(hidden=32, depth=1)
        self.calls = []

    def forward(self, x_t, t, cond=None):
        self.calls.append((t.tolist(), torch.is_grad_enabled()))
        return self.net(x_t, t, cond)


def test_the_multi_step_schedule_is_dmd2s_and_lcms():
    assert generator_timesteps(1000, 4) == [999, 749, 499, 249]
    assert generator_timesteps(1000, 2) == [999, 499]
    assert generator_timesteps(1000, 1) == [999]
    with pytest.raises(ValueError, match="distinct, decreasing"):
        MultiStepGenerator(Recording(), SCHEDULE, "epsilon", [499, 999])


def test_sampling_denoises_then_renoises_and_one_step_is_the_one_step_generator():
    net = Recording()
    gen = MultiStepGenerator(net, SCHEDULE, "epsilon", [999, 499])
    z = torch.randn(5, 2)
    with torch.no_grad():
        out = gen(z, None, torch.Generator().manual_seed(3))
        x0 = SCHEDULE.to_x0(net(z, torch.full((5,), 999), None), z, torch.full((5,), 999), "epsilon")
        fresh = torch.randn(z.shape, generator=torch.Generator().manual_seed(3))
        x = SCHEDULE.add_noise(x0, fresh, torch.full((5,), 499))
        expected = SCHEDULE.to_x0(net(x, torch.full((5,), 499), None), x, torch.full((5,), 499), "epsilon")
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(MultiStepGenerator(net, SCHEDULE, "epsilon", [999])(z), OneStepGenerator(net, SCHEDULE, "epsilon")(z))


def test_ddim_sampling_renoises_with_the_networks_own_noise():
    # DDIM with eta = 0: the image is a function of the starting noise alone (no generator draws, step noises unused)
    net = Recording()
    gen = MultiStepGenerator(net, SCHEDULE, "epsilon", [999, 499], sampler="ddim")
    z = torch.randn(5, 2)
    with torch.no_grad():
        out = gen(z, None, torch.Generator().manual_seed(3))
        torch.testing.assert_close(gen(z, None, torch.Generator().manual_seed(4), step_noise=[torch.randn(5, 2)]), out)
        t999, t499 = torch.full((5,), 999), torch.full((5,), 499)
        eps = net(z, t999, None)
        x = SCHEDULE.add_noise(SCHEDULE.to_x0(eps, z, t999, "epsilon"), eps, t499)
        torch.testing.assert_close(out, SCHEDULE.to_x0(net(x, t499, None), x, t499, "epsilon"))
    with pytest.raises(ValueError, match="sampler must be one of lcm, ddim"):
        MultiStepGenerator(net, SCHEDULE, "epsilon", [999, 499], sampler="euler")


def test_backward_simulation_feeds_the_generators_own_chain_and_differentiates_one_forward():
    net = Recording()
    gen = MultiStepGenerator(net, SCHEDULE, "epsilon", [999, 749, 499, 249])
    z = torch.randn(64, 2)
    out = gen.train_sample(z, None, torch.Generator().manual_seed(1))
    k = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(1))  # the first draw: each sample's step
    assert [(t[0], grad) for t, grad in net.calls[:3]] == [(999, False), (749, False), (499, False)]  # the chain, no graph
    last_t, last_grad = net.calls[-1]
    assert last_grad and last_t == [[999, 749, 499, 249][i] for i in k.tolist()] and len(net.calls) == 4
    assert set(k.tolist()) == {0, 1, 2, 3}
    with torch.no_grad():  # samples at step 0 were denoised from the pure noise itself
        first = k == 0
        t0 = torch.full((int(first.sum()),), 999)
        torch.testing.assert_close(out[first], SCHEDULE.to_x0(net.net(z[first], t0), z[first], t0, "epsilon"))
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def tiny_nets(teacher, gan=True, features="bottleneck"):
    cfg = DistillConfig(gan_weight=1e-3 if gan else 0.0, gan_features=features)
    gen = UNetDenoiser(copy.deepcopy(teacher.unet).requires_grad_(True))
    fake = UNetDenoiser(copy.deepcopy(teacher.unet).requires_grad_(True), gan_classifier(cfg, teacher.unet))
    return gen, fake


def test_gan_generator_side_reaches_only_the_generator_and_classifier_side_only_the_fake_score():
    teacher = build_tiny_teacher()
    gen_net, fake_net = tiny_nets(teacher)
    assert isinstance(fake_net.classifier, FeatureClassifier)
    gan = GANLoss(fake_net, teacher.schedule)
    cond = teacher.encode_prompts(["a red circle", "a blue square"])
    generator = OneStepGenerator(gen_net, teacher.schedule, teacher.prediction_type)
    rng = torch.Generator().manual_seed(0)
    gan.generator_loss(generator(torch.randn(2, 4, 8, 8), cond), cond, rng).backward()
    assert all(p.grad is not None for p in gen_net.parameters())
    assert all(p.grad is None for p in fake_net.parameters())
    assert all(p.requires_grad for p in fake_net.parameters())  # restored after the generator's turn
    gen_net.zero_grad(set_to_none=True)
    with torch.no_grad():
        fake = generator(torch.randn(2, 4, 8, 8), cond)
    loss_d = gan.discriminator_loss(fake, cond, torch.randn(2, 4, 8, 8), cond, rng)
    loss_d.backward()
    assert all(p.grad is not None for p in fake_net.classifier.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in fake_net.unet.parameters())
    assert all(p.grad is None for p in gen_net.parameters())
    assert 0 < float(loss_d.detach()) < 10


def test_the_discriminator_loss_classifies_both_batches_in_one_pass_with_the_logits_of_two():
    """discriminator_loss runs the classifier once on generated and real samples together (half the launches); the
    loss equals the two-pass form on the same noised inputs, and real samples of another batch size work."""
    teacher = build_tiny_teacher()
    _, fake_net = tiny_nets(teacher)
    gan = GANLoss(fake_net, teacher.schedule)
    fake, real = torch.randn(2, 4, 8, 8), torch.randn(3, 4, 8, 8)
    fake_cond, real_cond = teacher.encode_prompts(["a red circle", "a blue square"]), teacher.encode_prompts(["a", "b", ""])
    calls = []
    hook = fake_net.classifier.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    loss = gan.discriminator_loss(fake, fake_cond, real, real_cond, torch.Generator().manual_seed(0))
    hook.remove()
    assert calls == [torch.Size([5])]
    rng = torch.Generator().manual_seed(0)  # the same draws, in the same order, as inside discriminator_loss
    fake_t, t_fake, _ = teacher.schedule.diffuse(fake, gan.t_range, rng)
    real_t, t_real, _ = teacher.schedule.diffuse(real, gan.t_range, rng)
    two_pass = (torch.nn.functional.softplus(fake_net(fake_t, t_fake, fake_cond, classify=True)).mean()
                + torch.nn.functional.softplus(-fake_net(real_t, t_real, real_cond, classify=True)).mean())
    torch.testing.assert_close(loss, two_pass, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("level", ["bottleneck", "decoder"])
def test_the_classifier_reads_the_features_a_full_forward_computes(level):
    """The classify path runs the UNet up to its mid block ("bottleneck") or its last up block ("decoder"): the
    features are those of the full forward (that block's output, captured by a hook), so skipping the rest changes
    the cost, not the logits."""
    teacher = build_tiny_teacher()
    _, fake_net = tiny_nets(teacher, features=level)
    assert fake_net.classifier.features == level
    x_t, t = torch.randn(3, 4, 8, 8), torch.tensor([5, 500, 999])
    cond = teacher.encode_prompts(["a red circle", "a blue square", ""])
    seen = []
    block = fake_net.unet.mid_block if level == "bottleneck" else fake_net.unet.up_blocks[-1]
    hook = block.register_forward_hook(lambda module, args, output: seen.append(output))
    fake_net.unet(x_t, t, encoder_hidden_states=cond)
    hook.remove()
    features = unet_features(fake_net.unet, x_t, t, cond, level)
    assert (features.shape[-1] == 8) == (level == "decoder")  # the latent resolution, or the bottleneck's lower one
    torch.testing.assert_close(features, seen[0], rtol=0, atol=0)
    torch.testing.assert_close(fake_net(x_t, t, cond, classify=True), fake_net.classifier(seen[0]), rtol=0, atol=0)
    with pytest.raises(ValueError, match="classifier head"):
        tiny_nets(teacher)[0](x_t, t, cond, classify=True)  # the generator has no head


@pytest.mark.parametrize("generator_steps, features", [(1, "bottleneck"), (2, "bottleneck"), (1, "decoder")])
def test_one_dmd2_iteration_on_the_tiny_teacher(generator_steps, features):
    """GAN + TTUR + no regression (+ the 2-step generator with backward simulation, + the head on the decoder's
    features), as the worker builds it."""
    teacher = build_tiny_teacher()
    cfg = DistillConfig(gan_weight=1e-3, lambda_reg=0.0, fake_updates=2, generator_steps=generator_steps, regression_space="latent", gan_features=features)
    cfg.check()
    gen_net, fake_net = tiny_nets(teacher, features=features)
    opts = [torch.optim.AdamW(n.parameters(), lr=1e-4) for n in (gen_net, fake_net)]
    conditions = PromptConditions(teacher, ["a red circle", "a blue square"], (4, 8, 8), "cpu")
    step = build_step(cfg, teacher, conditions, gen_net, fake_net, optimizer_update(opts[0], gen_net.parameters(), 10.0),
                      optimizer_update(opts[1], fake_net.parameters(), 10.0), torch.Generator().manual_seed(0), 2, "cpu")
    assert isinstance(step.objective.generator, MultiStepGenerator if generator_steps > 1 else OneStepGenerator)
    head_before = copy.deepcopy(fake_net.classifier.state_dict())
    logs = read_logs(step(None, conditions.encode(["a red circle", "a blue square"]), torch.randn(2, 4, 8, 8)))
    assert {"loss_dm", "loss_gan_generator", "loss_gan_discriminator", "loss_fake", "grad_norm_generator"} <= set(logs)
    assert "loss_reg" not in logs and all(v == v for v in logs.values())
    assert any(not torch.equal(v, fake_net.classifier.state_dict()[k]) for k, v in head_before.items())  # the head trains


@pytest.mark.parametrize("timestep", [999, 399])
def test_one_step_export_at_any_timestep_runs_in_diffusers_as_the_generator(tmp_path, timestep):
    # DMD2's timestep shift (one-step SDXL reads pure noise at t = 399): diffusers' single step is the generator's
    from diffusers import DiffusionPipeline

    from dmd_ray.sd.export import export_generator

    teacher = build_tiny_teacher()
    folder = export_generator(teacher, copy.deepcopy(teacher.unet), str(tmp_path / f"t{timestep}"), timestep=timestep)
    assert read_generator_info(folder)["generator_timestep"] == timestep
    pipe = DiffusionPipeline.from_pretrained(folder)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a blue triangle", "a small red circle"]
    latents = pipe(prompts, num_inference_steps=1, guidance_scale=1.0, latents=z.clone(), output_type="latent").images
    with torch.no_grad():
        expected = OneStepGenerator(teacher.denoiser(), teacher.schedule, teacher.prediction_type, timestep)(z, teacher.encode_prompts(prompts))
        elsewhere = OneStepGenerator(teacher.denoiser(), teacher.schedule, teacher.prediction_type, 999 if timestep != 999 else 399)(z, teacher.encode_prompts(prompts))
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)
    assert (latents - elsewhere).abs().max() > 0.1  # the timestep matters: the test can tell them apart
    from dmd_ray.config import EvalConfig
    from dmd_ray.demos.shapes_eval import ImageMaker

    made = ImageMaker(folder, EvalConfig())({"prompt": prompts[:1], "seed": [7]})["image"][0]  # evaluation reads the timestep too
    drawn = pipe(prompts[0], num_inference_steps=1, guidance_scale=1.0, output_type="np", generator=torch.Generator().manual_seed(7)).images[0]
    assert np.abs(made.astype(np.float64) - drawn * 255).max() <= 1.0
    with pytest.raises(ValueError, match="outside the teacher's"):
        export_generator(teacher, teacher.unet, str(tmp_path / "bad"), timestep=1000)


@pytest.mark.parametrize("sampler", ["lcm", "ddim"])
def test_multi_step_export_runs_in_diffusers_with_that_many_steps(tmp_path, sampler):
    from diffusers import DiffusionPipeline

    from dmd_ray.sd.export import export_generator, exported_sampler
    from dmd_ray.sd.one_step import OneStepImageGenerator

    teacher = build_tiny_teacher()
    timesteps = generator_timesteps(1000, 2)
    folder = export_generator(teacher, copy.deepcopy(teacher.unet), str(tmp_path / "two-step"), timestep=999, timesteps=timesteps, sampler=sampler)
    assert exported_sampler(folder) == sampler and read_generator_info(folder)["multi_step_sampler"] == sampler
    pipe = DiffusionPipeline.from_pretrained(folder)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    latents = pipe("a blue triangle", num_inference_steps=2, guidance_scale=1.0, latents=z.clone(), output_type="latent",
                   generator=torch.Generator().manual_seed(5)).images
    gen = MultiStepGenerator(teacher.denoiser(), teacher.schedule, teacher.prediction_type, timesteps, sampler)
    with torch.no_grad():
        expected = gen(z, teacher.encode_prompts(["a blue triangle"]), torch.Generator().manual_seed(5))
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="2-step generator.*num_inference_steps=2"):
        OneStepImageGenerator(folder)

    # jobs/evaluate.py runs the export in its two steps, each image from its own seed alone: the image diffusers'
    # pipeline makes from that seed, whatever the batch
    from dmd_ray.config import EvalConfig
    from dmd_ray.demos.shapes_eval import ImageMaker

    prompts, seeds = ["a blue triangle", "a small red circle on a green background"], [3, 11]
    made = ImageMaker(folder, EvalConfig())({"prompt": prompts, "seed": seeds})["image"]
    alone = ImageMaker(folder, EvalConfig())({"prompt": prompts[1:], "seed": seeds[1:]})["image"]
    assert np.abs(made[1:].astype(int) - alone.astype(int)).max() <= 1  # a batch's float rounding, not its noise
    for image, prompt, seed in zip(made, prompts, seeds):
        expected = pipe(prompt, num_inference_steps=2, guidance_scale=1.0, output_type="np", generator=torch.Generator().manual_seed(seed)).images[0]
        assert np.abs(image.astype(np.float64) - expected * 255).max() <= 1.0
    one_step = ImageMaker(folder, EvalConfig())  # the same network in one step is another image: the steps were used
    one_step.generator = OneStepGenerator(teacher.denoiser(), teacher.schedule, teacher.prediction_type)
    assert not np.array_equal(one_step({"prompt": prompts, "seed": seeds})["image"], made)


@pytest.mark.parametrize("overrides, problem", [
    (dict(generator_steps=2), "set --lambda-reg 0"),
    (dict(generator_steps=0), "generator_steps must be >= 1"),
    (dict(multi_step_sampler="euler"), "multi_step_sampler must be one of lcm, ddim"),
    (dict(gan_weight=-1.0), "must be >= 0"),
    (dict(dm_weight=0.0, lambda_reg=0.0), "not all 0"),
    (dict(gan_weight=1e-3, gan_real="laion"), "gan_real must be pairs or renders"),
    (dict(gan_real_size=0), "gan_real_size must be >= 1"),
])
def test_dmd2_combinations_that_cannot_train_are_refused(overrides, problem):
    with pytest.raises(ConfigError, match=problem):
        DistillConfig(**overrides).check()
    DistillConfig(dm_weight=0.0, lambda_reg=0.0, gan_weight=1e-3).check()  # GAN only: DMD2's "GAN only" row


def test_the_real_bank_holds_encoded_renders_and_draws_them_with_their_prompts():
    """--gan-real renders: the shapes domain's real images, encoded once by the teacher's VAE; draws replay from the
    step's RNG and come with their own prompts' conditions."""
    from dmd_ray.demos import shapes
    from dmd_ray.sd.real_bank import RealLatentBank

    teacher = build_tiny_teacher()
    conditions = PromptConditions(teacher, ["a red circle", "a large blue square on a white background"], (4, 8, 8), "cpu")
    bank = RealLatentBank(teacher, conditions, shapes.Renderer(), size=6, resolution=32, seed=0, chunk=4)
    assert bank.latents.shape == (6, 4, 8, 8) and len(bank) == 6
    prompts = [conditions.prompts[i] for i in bank.prompt_index[:4].tolist()]
    torch.testing.assert_close(bank.latents[:4], teacher.encode(shapes.Renderer()(prompts, 0, 32, "cpu")))
    latents, cond = bank.draw(5, torch.Generator().manual_seed(3))
    again, cond_again = bank.draw(5, torch.Generator().manual_seed(3))
    assert torch.equal(latents, again) and torch.equal(cond, cond_again) and latents.shape == (5, 4, 8, 8)
    chosen = torch.randint(0, 6, (5,), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(cond, conditions.encode([conditions.prompts[i] for i in bank.prompt_index[chosen].tolist()]))
    with pytest.raises(ValueError, match="not a shapes prompt"):
        shapes.Renderer().check(["a red circle", "a photo of a cat"])


def test_the_classifier_sees_draw_reals_samples_instead_of_the_pairs():
    teacher = build_tiny_teacher()
    cfg = DistillConfig(gan_weight=1e-3, lambda_reg=0.0, fake_updates=2, regression_space="latent")
    gen_net, fake_net = tiny_nets(teacher)
    conditions = PromptConditions(teacher, ["a red circle", "a blue square"], (4, 8, 8), "cpu")
    drawn = []

    def draw_real(n, rng):
        drawn.append((torch.randn(n, 4, 8, 8, generator=rng), conditions.encode(["a blue square"] * n)))
        return drawn[-1]

    opts = [torch.optim.AdamW(n.parameters(), lr=1e-4) for n in (gen_net, fake_net)]
    step = build_step(cfg, teacher, conditions, gen_net, fake_net, optimizer_update(opts[0], gen_net.parameters(), 10.0),
                      optimizer_update(opts[1], fake_net.parameters(), 10.0), torch.Generator().manual_seed(0), 2, "cpu", draw_real=draw_real)
    seen = []
    discriminator_loss = step.objective.gan.discriminator_loss
    step.objective.gan.discriminator_loss = lambda samples, cond, real, real_cond, **kw: seen.append((real, real_cond)) or discriminator_loss(samples, cond, real, real_cond, **kw)
    pair_target = torch.randn(2, 4, 8, 8)
    step(None, conditions.encode(["a red circle"] * 2), pair_target)
    assert len(seen) == len(drawn) == 2  # one real batch per fake-score update, of the DM batch's size
    for (real, real_cond), (want, want_cond) in zip(seen, drawn):
        assert real is want and real_cond is want_cond and real.shape[0] == 2
