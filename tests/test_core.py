"""The DMD core: schedule maths, CFG, the three losses, the generator and the ODE sampler."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from dmd_ray.method.denoiser import GuidedDenoiser, X0Denoiser
from dmd_ray.method.generator import OneStepGenerator
from dmd_ray.method.losses import DenoisingLoss, DistributionMatchingLoss, LPIPSDistance, RegressionLoss, squared_l2
from dmd_ray.method.sampling import ode_sample
from dmd_ray.sd.teacher_sampler import make_scheduler
from dmd_ray.method.schedule import PREDICTION_TYPES, NoiseSchedule

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_betas(**SD_BETAS)


class Recorder:
    """A denoiser that records what it was called with and returns `fn(x_t, t)`."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, x_t, t, cond):
        self.calls.append((x_t.clone(), t.clone(), cond))
        return self.fn(x_t, t)


# ------------------------------------------------------------------------------------------------ schedule
@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_schedule_matches_diffusers(kind):
    ours = NoiseSchedule.from_betas(kind, 0.00085, 0.012, 1000)
    theirs = DDPMScheduler(beta_schedule=kind, beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=1e-5, atol=1e-7)
    assert NoiseSchedule.from_scheduler(theirs).alphas_cumprod.dtype == torch.float64


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_conversions_round_trip(schedule, prediction_type):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(64, 4, 8, 8, generator=g), torch.randn(64, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    t[:2] = torch.tensor([0, 999])  # the ends, where 1/alpha and 1/sigma are largest
    x_t = schedule.add_noise(x0, noise, t)
    pred = schedule.training_target(x0, noise, t, prediction_type)
    torch.testing.assert_close(schedule.to_x0(pred, x_t, t, prediction_type), x0, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(schedule.to_epsilon(pred, x_t, t, prediction_type), noise, rtol=1e-4, atol=2e-4)


def test_conversions_run_in_float64(schedule):
    """bf16 predictions are read out in float64 and returned in float32, not re-rounded to bf16."""
    x_t = torch.randn(8, 4, dtype=torch.bfloat16)
    eps = torch.randn(8, 4, dtype=torch.bfloat16)
    t = torch.full((8,), 999)
    x0 = schedule.to_x0(eps, x_t, t, "epsilon")
    assert x0.dtype == torch.float32
    a, s = schedule.alpha_sigma(t, 2)
    torch.testing.assert_close(x0.double(), (x_t.double() - s * eps.double()) / a, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_add_noise_and_targets_match_diffusers(schedule, prediction_type):
    sched = DDPMScheduler(**SD_BETAS, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(16, 4, 8, 8, generator=g), torch.randn(16, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (16,), generator=g)
    torch.testing.assert_close(schedule.add_noise(x0, noise, t), sched.add_noise(x0, noise, t), rtol=1e-5, atol=1e-5)
    expected = noise if prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
    torch.testing.assert_close(schedule.training_target(x0, noise, t, prediction_type), expected, rtol=1e-5, atol=1e-5)


def test_schedule_rejects_bad_input(schedule):
    with pytest.raises(ValueError, match="prediction_type"):
        schedule.to_x0(torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, dtype=torch.long), "flow")
    with pytest.raises(ValueError, match="timesteps must lie"):
        schedule.alpha_sigma(torch.tensor([1000]), 2)
    with pytest.raises(ValueError, match="t_range"):
        schedule.sample_timesteps(4, (0.5, 0.2))
    with pytest.raises(ValueError, match="non-increasing"):
        NoiseSchedule(torch.linspace(0.1, 0.9, 10))


# ------------------------------------------------------------------------------------------------ guidance
def test_cfg_combination():
    def net(x, t, c):  # a prediction that depends on the condition in a known way
        return x * 0 + c[:, None]

    cond, uncond = torch.tensor([2.0, 5.0]), torch.tensor([1.0])
    guided = GuidedDenoiser(net, guidance_scale=3.0, uncond=uncond)
    out = guided(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), cond)
    expected = 1.0 + 3.0 * (cond - 1.0)  # uncond + s * (cond - uncond)
    torch.testing.assert_close(out, expected[:, None].expand(2, 4))

    calls = Recorder(lambda x, t: x)
    GuidedDenoiser(calls, 1.0)(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), torch.ones(3))
    assert len(calls.calls) == 1 and calls.calls[0][0].shape[0] == 3  # scale 1: one unbatched call
    with pytest.raises(ValueError, match="uncond"):
        GuidedDenoiser(net, guidance_scale=2.0)


# ------------------------------------------------------------------------------------------------ DM loss
def test_dm_loss_gradient_is_normalised_score_difference(schedule):
    real = Recorder(lambda x_t, t: 0.5 * x_t + 0.1)
    fake = Recorder(lambda x_t, t: -0.3 * x_t)
    loss_fn = DistributionMatchingLoss(real, fake, schedule)  # x0-form denoisers
    x = torch.randn(6, 3, 4, 4, requires_grad=True)
    loss = loss_fn(x, None, generator=torch.Generator().manual_seed(0))
    loss.backward()

    x_t, t, _ = real.calls[0]
    assert torch.equal(fake.calls[0][0], x_t) and torch.equal(fake.calls[0][1], t)  # same x_t for both scores
    p_real = x.detach() - (0.5 * x_t + 0.1)
    p_fake = x.detach() - (-0.3 * x_t)
    norm = p_real.abs().mean(dim=(1, 2, 3), keepdim=True)
    grad = (p_real - p_fake) / norm
    torch.testing.assert_close(x.grad, grad / x.numel(), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(loss, 0.5 * grad.pow(2).mean(), rtol=1e-5, atol=1e-8)


def test_dm_loss_uses_guided_real_score_and_unguided_fake(schedule):
    """The real score is the CFG teacher; the fake score sees only the condition."""
    seen = {"real": [], "fake": []}

    def make(name):
        def net(x_t, t, c):
            seen[name].append(c.clone())
            return torch.zeros_like(x_t)

        return net

    real = X0Denoiser(GuidedDenoiser(make("real"), 3.0, uncond=torch.zeros(1)), schedule, "epsilon")
    fake = X0Denoiser(make("fake"), schedule, "epsilon")
    DistributionMatchingLoss(real, fake, schedule)(torch.randn(4, 2), torch.ones(4))
    assert seen["real"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert seen["fake"][0].tolist() == [1, 1, 1, 1]


def test_dm_loss_does_not_train_the_scores(schedule):
    fake_net = torch.nn.Linear(2, 2)
    loss_fn = DistributionMatchingLoss(lambda x, t, c: x * 0.9, lambda x, t, c: fake_net(x), schedule)
    x = torch.randn(8, 2, requires_grad=True)
    loss_fn(x).backward()
    assert x.grad is not None and all(p.grad is None for p in fake_net.parameters())


@pytest.mark.parametrize("t_range,lo,hi", [((0.02, 0.98), 20, 980), ((0.0, 1.0), 0, 999), ((0.3, 0.5), 300, 500)])
def test_dm_loss_t_range_respected(schedule, t_range, lo, hi):
    real = Recorder(lambda x_t, t: x_t)
    loss_fn = DistributionMatchingLoss(real, lambda x, t, c: x * 0, schedule, t_range)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        loss_fn(torch.randn(256, 2), generator=g)
    ts = torch.cat([c[1] for c in real.calls])
    assert int(ts.min()) == lo and int(ts.max()) == hi


# ------------------------------------------------------------------------------------------------ fake-score loss
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_fake_loss_trains_towards_diffusers_target(prediction_type):
    """The denoising loss's target is what diffusers' training scripts use: noise, or get_velocity(x0, noise, t)."""
    sched = DDPMScheduler(**SD_BETAS, prediction_type=prediction_type)
    schedule = NoiseSchedule.from_scheduler(sched)
    x0 = torch.randn(32, 4, 8, 8)
    a = sched.alphas_cumprod

    def denoiser(x_t, t, c):
        at = a[t].reshape(-1, 1, 1, 1)
        noise = (x_t - at.sqrt() * x0) / (1 - at).sqrt()  # the noise the loss drew, recovered
        target = noise if prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
        return target + 0.5  # off by exactly 0.5 everywhere

    loss = DenoisingLoss(schedule, prediction_type)(denoiser, x0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loss, torch.tensor(0.25), rtol=1e-3, atol=1e-3)


def test_fake_loss_covers_full_t_range(schedule):
    rec = Recorder(lambda x_t, t: x_t)
    loss = DenoisingLoss(schedule)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        loss(rec, torch.randn(256, 2), generator=g)
    ts = torch.cat([c[1] for c in rec.calls])
    assert int(ts.min()) == 0 and int(ts.max()) == 999


# ------------------------------------------------------------------------------------------------ generator
@pytest.mark.parametrize("timestep", [999, 399])
def test_generator_reads_x0_at_fixed_timestep(schedule, timestep):
    class Net(torch.nn.Linear):
        def forward(self, x, t, c):
            self.seen_t = t
            return super().forward(x)

    net = Net(2, 2)
    gen = OneStepGenerator(net, schedule, "epsilon", timestep)
    z = torch.randn(5, 2)
    out = gen(z)
    assert net.seen_t.tolist() == [timestep] * 5
    a, s = schedule.alpha_sigma(torch.tensor([timestep]), 2)
    torch.testing.assert_close(out, ((z.double() - s * torch.nn.functional.linear(z, net.weight, net.bias).double()) / a).float())
    out.sum().backward()
    assert net.weight.grad is not None
    with pytest.raises(ValueError, match="timestep"):
        OneStepGenerator(net, schedule, "epsilon", 1000)


# ------------------------------------------------------------------------------------------------ regression
def test_regression_l2_and_decode():
    reg = RegressionLoss(squared_l2, decode=lambda x: 2 * x)
    a, b = torch.zeros(4, 3, requires_grad=True), torch.ones(4, 3)
    loss = reg(a, b)
    assert loss.item() == pytest.approx(4.0)
    loss.backward()
    assert a.grad is not None


def test_lpips_distance_offline():
    lp = LPIPSDistance(backbone="alex", pretrained_backbone=False)
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1).requires_grad_(True)
    b = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    d_same, d_diff = lp(a, a.detach()), lp(a, b)
    assert d_same.shape == (2,) and float(d_same.max()) < 1e-6 and float(d_diff.min()) > 1e-3
    RegressionLoss(lp)(a, b).backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    # the random backbone is drawn from its seed, not from the caller's RNG (which it leaves as it was)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    again = LPIPSDistance(backbone="alex", pretrained_backbone=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(again(a.detach(), b), d_diff.detach())
    assert not torch.equal(LPIPSDistance(backbone="alex", pretrained_backbone=False, seed=1)(a.detach(), b), d_diff.detach())


# ------------------------------------------------------------------------------------------------ ODE sampler
@pytest.mark.parametrize("sampler,steps", [("ddim", 200), ("pndm", 100), ("euler", 200)])
def test_ode_sampler_solves_gaussian_flow(schedule, sampler, steps):
    """For data ~ N(0, s^2 I) the exact denoiser is known and the probability-flow ODE maps x_T to
    x_T * s / sqrt(alpha_T^2 s^2 + sigma_T^2). Any deterministic sampler must land there."""
    s = 0.5
    acp = schedule.alphas_cumprod

    def eps_model(x_t, t, c):
        a = acp.to(torch.float32)[t.round().long()].reshape(-1, 1)
        return (1 - a).sqrt() * x_t / (a * s * s + 1 - a)

    base = DDPMScheduler(**SD_BETAS)
    scheduler = make_scheduler(sampler, base)
    z = torch.randn(1024, 2, generator=torch.Generator().manual_seed(0))
    out = ode_sample(eps_model, scheduler, z, None, steps)
    first = make_scheduler(sampler, base)
    first.set_timesteps(steps)
    a_first = acp[int(first.timesteps[0].round())]  # where the sampler starts from
    expected = z * s / (a_first * s * s + 1 - a_first).sqrt().float()
    torch.testing.assert_close(out, expected, rtol=0.02, atol=0.02)
    # batched == one at a time
    single = torch.cat([ode_sample(eps_model, scheduler, z[i : i + 1], None, steps) for i in range(3)])
    torch.testing.assert_close(out[:3], single, rtol=1e-5, atol=1e-6)


def test_ddim_matches_diffusers_step_by_step(schedule):
    """Our loop with DDIM (eta 0) equals diffusers' own DDIMScheduler loop."""
    net = torch.nn.Sequential(torch.nn.Linear(3, 3))
    model = lambda x, t, c: net(x) * 0.1  # noqa: E731
    sched = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    z = torch.randn(8, 3, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = ode_sample(model, sched, z, None, 20)
        ref = DDIMScheduler.from_config(sched.config)
        ref.set_timesteps(20)
        x = z.clone()
        for t in ref.timesteps:
            x = ref.step(model(x, t, None), t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, x)
    assert sched.num_inference_steps is None  # the scheduler passed in was not mutated
