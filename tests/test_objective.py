"""The DMD objective and one iteration of it, on small networks without Ray: which network each loss's gradients
reach, how the concatenated DM/regression batch splits, the two ablations, and one step on the tiny teacher."""
import copy
import dataclasses

import pytest
import torch

from dmd_ray.demos.toy2d import MLPDenoiser
from dmd_ray.method.denoiser import X0Denoiser
from dmd_ray.method.generator import OneStepGenerator
from dmd_ray.method.losses import DenoisingLoss, DistributionMatchingLoss, RegressionLoss, squared_l2
from dmd_ray.method.objective import DMDObjective, DMDStep, LogWindow, read_logs
from dmd_ray.method.optim import optimizer_update
from dmd_ray.method.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule.from_betas("scaled_linear", 0.00085, 0.012, 1000)


def networks(seed=0):
    torch.manual_seed(seed)
    teacher = MLPDenoiser(hidden=32, depth=1).requires_grad_(False)
    return teacher, copy.deepcopy(teacher).requires_grad_(True), copy.deepcopy(teacher).requires_grad_(True)


def objective(teacher, gen_net, fake_net, lambda_reg=0.25, dm_weight=1.0, regression=True):
    generator = OneStepGenerator(gen_net, SCHEDULE, "epsilon")
    dm = DistributionMatchingLoss(X0Denoiser(teacher, SCHEDULE, "epsilon"), X0Denoiser(fake_net, SCHEDULE, "epsilon"), SCHEDULE)
    return DMDObjective(generator, dm, DenoisingLoss(SCHEDULE, "epsilon"), RegressionLoss(squared_l2) if regression else None, lambda_reg, dm_weight)


def grads(module):
    return [p.grad for p in module.parameters()]


def test_generator_loss_reaches_only_the_generator_and_fake_loss_only_the_fake_score():
    teacher, gen_net, fake_net = networks()
    obj = objective(teacher, gen_net, fake_net)
    loss, logs = obj.generator_loss(torch.randn(8, 2), None, torch.randn(4, 2), None, torch.randn(4, 2), generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert all(g is not None and g.abs().sum() > 0 for g in grads(gen_net))
    assert all(g is None for g in grads(fake_net)) and all(g is None for g in grads(teacher))
    assert set(logs) == {"loss_dm", "loss_reg", "loss_generator"} and not any(v.requires_grad for v in logs.values())
    gen_net.zero_grad(set_to_none=True)
    loss_fake, _ = obj.fake_score_loss(fake_net, torch.randn(8, 2), None, generator=torch.Generator().manual_seed(1))
    loss_fake.backward()
    assert all(g is not None for g in grads(fake_net))
    assert all(g is None for g in grads(gen_net)) and all(g is None for g in grads(teacher))


def test_the_concatenated_batch_splits_into_dm_and_regression_parts():
    """One generator forward over [noise; pair_noise]: the first rows feed the DM loss, the last the regression."""
    teacher, gen_net, fake_net = networks()
    obj = objective(teacher, gen_net, fake_net)
    noise, pair_noise, target = torch.randn(6, 2), torch.randn(3, 2), torch.randn(3, 2)
    _, logs = obj.generator_loss(noise, None, pair_noise, None, target, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected_reg = squared_l2(obj.generator(pair_noise), target).mean()
        expected_dm = obj.dm_loss(obj.generator(noise), None, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(logs["loss_reg"], expected_reg)
    torch.testing.assert_close(logs["loss_dm"], expected_dm)
    torch.testing.assert_close(logs["loss_generator"], expected_dm + 0.25 * expected_reg)


def test_ablations_and_the_refusal_with_nothing_to_learn():
    teacher, gen_net, fake_net = networks()
    no_dm = objective(teacher, gen_net, fake_net, dm_weight=0.0)
    assert not no_dm.needs_fake_score
    _, logs = no_dm.generator_loss(torch.randn(4, 2), None, torch.randn(2, 2), None, torch.randn(2, 2))
    assert set(logs) == {"loss_reg", "loss_generator"}
    no_reg = objective(teacher, gen_net, fake_net, lambda_reg=0.0)
    assert not no_reg.uses_regression
    _, logs = no_reg.generator_loss(torch.randn(4, 2))  # no pairs needed
    assert set(logs) == {"loss_dm", "loss_generator"}
    with pytest.raises(ValueError, match="regression loss needs a batch"):
        objective(teacher, gen_net, fake_net).generator_loss(torch.randn(4, 2))
    for kwargs in (dict(dm_weight=0.0, lambda_reg=0.0), dict(dm_weight=0.0, regression=False)):
        with pytest.raises(ValueError, match="nothing to learn"):
            objective(teacher, gen_net, fake_net, **kwargs)


@pytest.mark.parametrize("dm_weight, fake_updates, fake_steps", [(1.0, 1, 1), (1.0, 3, 3), (0.0, 3, 0)])
def test_one_step_updates_each_network_as_often_as_it_should(dm_weight, fake_updates, fake_steps):
    teacher, gen_net, fake_net = networks()
    calls = {"generator": 0, "fake": 0}

    def counting(name, update):
        def run(loss):
            calls[name] += 1
            return update(loss)
        return run

    opt_g, opt_f = torch.optim.SGD(gen_net.parameters(), lr=0.1), torch.optim.SGD(fake_net.parameters(), lr=0.1)
    before = [copy.deepcopy(m.state_dict()) for m in (teacher, gen_net, fake_net)]
    step = DMDStep(objective(teacher, gen_net, fake_net, dm_weight=dm_weight), fake_net, lambda n, rng: (torch.randn(n, 2, generator=rng), None),
                   counting("generator", optimizer_update(opt_g, gen_net.parameters(), 10.0)), counting("fake", optimizer_update(opt_f, fake_net.parameters(), 10.0)),
                   torch.Generator().manual_seed(0), dm_batch=8, fake_updates=fake_updates)
    logs = read_logs(step(torch.randn(4, 2), None, torch.randn(4, 2)))
    assert calls == {"generator": 1, "fake": fake_steps}
    assert all(v == v for v in logs.values()) and ("loss_fake" in logs) == (fake_steps > 0)
    changed = [any(not torch.equal(a[k], m.state_dict()[k]) for k in a) for a, m in zip(before, (teacher, gen_net, fake_net))]
    assert changed == [False, True, fake_steps > 0]


def test_one_iteration_on_the_tiny_teacher_with_torch_optimisers():
    """The SD adapter's step (what the Ray Train worker runs with DeepSpeed engines) with plain AdamW."""
    from dmd_ray.config import DistillConfig
    from dmd_ray.sd.architectures import build_tiny_teacher
    from dmd_ray.sd.conditioning import PromptConditions
    from dmd_ray.sd.dmd import build_step

    teacher = build_tiny_teacher()
    cfg = DistillConfig(regression_space="pixel", lpips_backbone="alex", lpips_pretrained_backbone=False, lpips_min_size=32, fake_updates=2)
    nets = [teacher.denoiser(copy.deepcopy(teacher.unet).requires_grad_(True)) for _ in range(2)]
    opts = [torch.optim.AdamW(n.parameters(), lr=1e-4) for n in nets]
    conditions = PromptConditions(teacher, ["a red circle", "a blue square"], (4, 8, 8), "cpu")
    step = build_step(cfg, teacher, conditions, nets[0], nets[1], optimizer_update(opts[0], nets[0].parameters(), 10.0),
                      optimizer_update(opts[1], nets[1].parameters(), 10.0), torch.Generator().manual_seed(0), 2, "cpu")
    unet_before = copy.deepcopy(nets[0].state_dict())
    logs = read_logs(step(torch.randn(2, 4, 8, 8), conditions.encode(["a red circle", "a red circle"]), torch.randn(2, 4, 8, 8)))
    assert set(logs) >= {"loss_dm", "loss_reg", "loss_fake", "grad_norm_generator", "grad_norm_fake"}
    assert all(v == v and abs(v) < 1e6 for v in logs.values())
    assert any(not torch.equal(v, nets[0].state_dict()[k]) for k, v in unet_before.items())
    torch.testing.assert_close(conditions.encode(["a blue square"]), teacher.encode_prompts(["a blue square"]))  # cached == fresh


def test_a_zero0_engine_steps_as_torch_adamw_and_drops_its_gradients(monkeypatch):
    """The worker's ZeRO-0 DeepSpeed engine (fp32 here, no autocast) with engine_update against the plain loop's
    AdamW with optimizer_update: the same gradient norms and weights over three clipped steps, and no gradient left
    after each step (the engine drops them through its parameter list, not DeepSpeed's walk of the module tree); the
    same with flat_optimizer, where the engine's AdamW and clipping run on one flat buffer of weights and gradients,
    and with its convolution weights channels-last inside that buffer (channels_last).
    The first DeepSpeed engine on a machine builds DeepSpeed's CPU communication op (~50 s, kept for later runs)."""
    import socket

    from dmd_ray.config import DistillConfig
    from dmd_ray.distributed import distill_worker
    from dmd_ray.method.optim import adamw
    from dmd_ray.sd.architectures import build_tiny_teacher
    from dmd_ray.sd.teacher import UNetDenoiser

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        monkeypatch.setenv(key, value)
    torch.distributed.init_process_group("gloo")  # as Ray Train sets it up for the worker (once per process: DeepSpeed keeps it)
    try:
        teacher = build_tiny_teacher()
        cfg = DistillConfig(zero_stage=0, precision="fp32", compile="false", fused_adamw="false", lr=1e-3, warmup_steps=2, grad_clip=0.05)
        settings = [(False, "false"), (True, "false"), (True, "true")]  # flat_optimizer, channels_last
        engines = [distill_worker.engine(dataclasses.replace(cfg, flat_optimizer=flat, channels_last=layout), teacher.unet, cfg.lr, 2, torch.device("cpu"))
                   for flat, layout in settings]
        plain = UNetDenoiser(copy.deepcopy(teacher.unet).float().train().requires_grad_(True))
        optimizer, schedule = adamw(plain.parameters(), cfg.lr, cfg.warmup_steps, weight_decay=cfg.weight_decay)
        updates = [(distill_worker.engine_update(e, cfg.grad_clip), e) for e in engines] + [(optimizer_update(optimizer, plain.parameters(), cfg.grad_clip, schedule), plain)]
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            x_t, t, cond = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 700]), torch.randn(2, 77, 32, generator=g)
            norms = [update(net(x_t, t, cond).square().mean()) for update, net in updates]
            for norm in norms[:-1]:
                torch.testing.assert_close(norm, norms[-1])
            assert norms[-1] > cfg.grad_clip and all(p.grad is None for e in engines for p in e.module.parameters())
        for engine in engines:
            for a, b in zip(engine.module.parameters(), plain.parameters(), strict=True):
                torch.testing.assert_close(a, b)
        # flat: the weights are views of the one buffer the optimizer steps, which holds one tensor per moment
        flat = engines[1].flat_parameters
        assert flat.flat.grad is None and engines[1].optimizer.param_groups[0]["params"] == [flat.flat]
        assert all(p.untyped_storage().data_ptr() == flat.flat.untyped_storage().data_ptr() for p in engines[1].module.parameters())
        assert all(p.storage_offset() % flat.ALIGN == 0 for p in engines[1].module.parameters())  # aligned for compiled kernels
        # channels-last: the convolution weights keep that layout as views of the buffer, the rest stay contiguous
        weights = [p for p in engines[2].module.parameters() if p.dim() == 4 and p.shape[-1] > 1]
        assert weights and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in weights)
        assert all(p.untyped_storage().data_ptr() == engines[2].flat_parameters.flat.untyped_storage().data_ptr() for p in engines[2].module.parameters())
    finally:
        torch.distributed.destroy_process_group()


def test_prompt_conditions_encode_the_set_at_the_start_up_to_the_cache_limit(monkeypatch):
    # the text encoder runs while the conditions are built, never in the training steps after; a set larger than
    # the cache keeps what fits and encodes the rest when drawn
    from dmd_ray.sd import conditioning
    from dmd_ray.sd.architectures import build_tiny_teacher
    from dmd_ray.sd.conditioning import PromptConditions

    teacher = build_tiny_teacher()
    prompts = [f"a {colour} {shape}" for colour in ("red", "blue", "green") for shape in ("circle", "square", "star")]
    monkeypatch.setattr(conditioning, "ENCODE_BATCH", 4)  # three encoder calls for nine prompts
    calls = []
    encode = teacher.encode_prompts
    monkeypatch.setattr(teacher, "encode_prompts", lambda batch: calls.append(list(batch)) or encode(batch))
    conditions = PromptConditions(teacher, prompts + prompts[:2], (4, 8, 8), "cpu")
    assert calls == [prompts[:4], prompts[4:8], prompts[8:]]
    noise, cond = conditions.draw(16, torch.Generator().manual_seed(0))
    assert len(calls) == 3 and noise.shape == (16, 4, 8, 8) and cond.shape[0] == 16
    torch.testing.assert_close(conditions.encode(prompts[::-1]), encode(prompts[::-1]))

    per_prompt = cond[0].numel() * cond.element_size()
    calls.clear()
    small = PromptConditions(teacher, prompts, (4, 8, 8), "cpu", max_cache_bytes=6 * per_prompt)  # the first batch fits, the second not
    assert calls == [prompts[:4], prompts[4:8]]
    calls.clear()
    torch.testing.assert_close(small.encode([prompts[0], prompts[5]]), encode([prompts[0], prompts[5]]))
    assert calls == [[prompts[5]]]


@pytest.mark.slow
def test_compiled_networks_give_the_eager_losses(tmp_path):
    """The fast path's compiled networks (torch.compile, as `--compile true` sets them up in the worker) compute the
    same DMD iterations as eager ones on CPU: five iterations of the tiny teacher with DMD2's GAN term on (so that
    the classifier's own graph is checked too), losses and gradient norms within float tolerance; the steps after
    the first COMPILE_STEPS run as the worker runs them with `skip_guards`, checking only the guards that tell the
    cached graphs apart (`step_guards`). (Minutes of compilation on 2 cores.)"""
    from dmd_ray.config import DistillConfig
    from dmd_ray import compile_cache
    from dmd_ray.distributed.distill_worker import COMPILE_STEPS, compile_network, step_guards
    from dmd_ray.sd.architectures import build_tiny_teacher
    from dmd_ray.sd.conditioning import PromptConditions
    from dmd_ray.sd.dmd import build_step, gan_classifier
    from dmd_ray.sd.teacher import UNetDenoiser

    cfg = DistillConfig(regression_space="latent", gan_weight=1e-2, skip_guards=True)

    def iterations(mode):
        teacher = build_tiny_teacher()
        nets = [UNetDenoiser(copy.deepcopy(teacher.unet).requires_grad_(True), head) for head in (None, gan_classifier(cfg, teacher.unet))]
        torch.manual_seed(0)
        nets[1].classifier.load_state_dict({k: torch.randn_like(v) * 0.1 for k, v in nets[1].classifier.state_dict().items()})  # the same head in both runs
        for module in (nets[0].unet, nets[1].unet, teacher.unet):
            compile_network(module, mode)
        nets[1].compile_classifier(mode)
        opts = [torch.optim.AdamW(n.parameters(), lr=1e-4) for n in nets]
        conditions = PromptConditions(teacher, ["a red circle", "a blue square"], (4, 8, 8), "cpu")
        step = build_step(cfg, teacher, conditions, nets[0], nets[1],
                          optimizer_update(opts[0], nets[0].parameters(), 10.0), optimizer_update(opts[1], nets[1].parameters(), 10.0),
                          torch.Generator().manual_seed(0), 2, "cpu")
        data = torch.Generator().manual_seed(1)
        logs = []
        for i in range(COMPILE_STEPS + 2):
            noise, cond, target = torch.randn(2, 4, 8, 8, generator=data), conditions.encode(["a red circle"] * 2), torch.randn(2, 4, 8, 8, generator=data)
            with step_guards(cfg, mode is not None and i >= COMPILE_STEPS):
                logs.append(read_logs(step(noise, cond, target)))
        return logs

    for eager, compiled in zip(iterations(None), iterations("default")):
        assert eager.keys() == compiled.keys() >= {"loss_gan_generator", "loss_gan_discriminator"}
        for key in eager:
            assert compiled[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-7), key
    # what a resumed run loads to skip most of the compilation (the worker's compile_cache)
    cache = str(tmp_path / "compile_cache.bin")
    assert compile_cache.save(cache) > 0
    assert compile_cache.load(cache) and not compile_cache.load(str(tmp_path / "missing.bin"))


def test_skip_guards_with_networks_of_one_class_under_and_outside_autocast():
    """Two compiled networks of one class, one always called under bf16 autocast (as the ZeRO-0 engines' networks
    are) and one never (the teacher): the steps after COMPILE_STEPS run with `skip_guards` and recompile nothing
    (compiled through their class's shared forward, the second network's call raised "Recompilation triggered with
    skip_guard_eval_unsafe stance"; compile_network)."""
    from dmd_ray.config import DistillConfig
    from dmd_ray.distributed.distill_worker import COMPILE_STEPS, compile_network, step_guards

    cfg = DistillConfig(zero_stage=0, skip_guards=True)
    torch.manual_seed(0)
    frozen = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    trained = copy.deepcopy(frozen)
    for net in (trained, frozen):
        compile_network(net, "default")
    x = torch.randn(4, 8)
    for step in range(COMPILE_STEPS + 2):
        with step_guards(cfg, step >= COMPILE_STEPS):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                a = trained(x)
            with torch.no_grad():
                b = frozen(x)
        assert a.dtype == torch.bfloat16 and b.dtype == torch.float32
    assert list(frozen.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]  # names unchanged


def test_log_window_reads_each_values_mean_over_the_steps_that_logged_it():
    window = LogWindow()
    window.add({"loss": torch.tensor(1.0), "norm": torch.tensor(2.0, dtype=torch.bfloat16), "host_norm": 4.0})
    window.add({"loss": torch.tensor(3.0), "norm": torch.tensor(4.0, dtype=torch.bfloat16)})
    window.add({"loss": torch.tensor(5.0), "norm": torch.tensor(6.0, dtype=torch.bfloat16), "host_norm": 8.0, "late": torch.tensor(7.0)})
    assert bool(window.finite(torch.device("cpu")))
    assert window.read() == {"loss": 3.0, "norm": 4.0, "host_norm": 6.0, "late": 7.0}
    window.add({"loss": torch.tensor(10.0)})
    assert window.read() == {"loss": 10.0}, "a read starts a new window"


@pytest.mark.parametrize("bad", [torch.tensor(float("nan")), torch.tensor(float("inf")), float("inf")])
def test_log_window_remembers_a_non_finite_step_until_it_is_read(bad):
    window = LogWindow()
    window.add({"loss": torch.tensor(1.0), "norm": 1.0})
    window.add({"loss": torch.tensor(2.0), "norm": 1.0, **({"loss": bad} if isinstance(bad, torch.Tensor) else {"norm": bad})})
    window.add({"loss": torch.tensor(3.0), "norm": 1.0})
    assert not bool(window.finite(torch.device("cpu")))
    window.read()
    window.add({"loss": torch.tensor(1.0)})
    assert bool(window.finite(torch.device("cpu")))


_COMPILE_ONE_GRAPH = """
import sys, types
if sys.argv[1] == "decoy":  # a module with a `torch` attribute imported before torch, as a Ray worker's imports can be
    decoy = types.ModuleType("a_module_loaded_first")
    sys.modules[decoy.__name__] = decoy
import torch
if sys.argv[1] == "decoy":
    decoy.torch = torch
from torch._dynamo.utils import counters
from dmd_ray import compile_cache
compile_cache.stable_keys()
torch.compile(lambda x: (x * 2).sin() + 1, dynamic=False)(torch.randn(4, 8))
print("HITS", counters["inductor"]["fxgraph_cache_hit"])
"""


def test_a_process_with_other_imports_finds_the_graphs_another_compiled(tmp_path):
    """compile_cache.stable_keys: the same graph gets the same Inductor cache key in a process whose modules were
    imported in another order (a Ray worker, a Serve replica): a memory format's pickle, part of the key, no longer
    depends on which loaded module pickle finds it through first. Without it the second process compiled again
    (torch 2.11 on the H200, 2.14 here)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
           "TORCHINDUCTOR_AUTOGRAD_CACHE": "0", "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}

    def hits(order: str) -> int:
        out = subprocess.run([sys.executable, "-c", _COMPILE_ONE_GRAPH, order], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split("HITS")[-1])

    assert hits("plain") == 0  # compiles, and writes the graph to the node's Inductor cache
    assert hits("decoy") == 1


def test_a_weight_average_follows_the_trained_weights_and_swaps_in_and_out():
    """The generator's weight average (ema_decay): after n updates each weight is the closed-form average, inside
    `swapped_in` the network computes with the average, after it with its own weights, bit for bit."""
    from dmd_ray.method.optim import WeightAverage

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    start = {k: v.clone() for k, v in net.state_dict().items()}
    average = WeightAverage(net, 0.9)
    assert "1.num_batches_tracked" not in average.shadow  # an integer buffer is not averaged
    expected = {k: v.clone() for k, v in average.shadow.items()}
    for _ in range(3):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))  # an optimizer step changes the weights in place
        average.update()
        for k, v in net.state_dict().items():
            if k in expected:
                expected[k] = 0.9 * expected[k] + 0.1 * v
    for k, v in expected.items():
        torch.testing.assert_close(average.shadow[k], v)
    assert not torch.equal(average.shadow["0.weight"], start["0.weight"])
    net.eval()
    x = torch.randn(5, 3)
    own = net(x)
    with average.swapped_in():
        torch.testing.assert_close(net[0].weight, average.shadow["0.weight"])
        swapped = net(x)
    assert not torch.equal(own, swapped)
    assert torch.equal(net(x), own)  # its own weights back, exactly
    with pytest.raises(ValueError, match="lacks 1 of the network's weights"):
        average.load({k: v for k, v in average.shadow.items() if k != "0.bias"})
    with pytest.raises(ValueError, match="decay must be in"):
        WeightAverage(net, 1.0)


def test_a_warmed_up_weight_average_is_the_mean_of_the_weights_until_its_decay_takes_over():
    """update(count): for the first 1/(1 - decay) updates the average is the plain mean of the weights after each
    update (the starting weights weigh nothing), then the exponential average at `decay` as without a count."""
    from dmd_ray.method.optim import WeightAverage

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    average = WeightAverage(net, 0.75)  # the mean for the first 4 updates, then decay 0.75
    iterates = []
    for count in range(1, 7):
        with torch.no_grad():
            net.weight.add_(torch.randn_like(net.weight))
        iterates.append(net.weight.detach().clone())
        average.update(count)
        if count <= 4:
            torch.testing.assert_close(average.shadow["weight"], torch.stack(iterates).mean(0))
    expected = torch.stack(iterates[:4]).mean(0)
    for w in iterates[4:]:
        expected = 0.75 * expected + 0.25 * w
    torch.testing.assert_close(average.shadow["weight"], expected)


@pytest.mark.parametrize("saved_channels_last, resumed_channels_last", [(True, False), (False, True), (True, True)])
def test_flat_optimizer_state_resumes_across_memory_formats(saved_channels_last, resumed_channels_last):
    """AdamW's moments over a flat buffer follow the buffer's memory order, which channels-last weights change; the
    optimizer's state dict holds them in the standard order, so that a run checkpointed under one layout continues
    under the other exactly as it would have continued under its own."""
    from dmd_ray.method.optim import FlatParameters

    def network_and_optimizer(channels_last: bool):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 5, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(5 * 36, 2))
        flat = FlatParameters(net.parameters())
        optimizer = torch.optim.AdamW([flat.flat], lr=1e-2)
        if channels_last:
            flat.relayout(torch.channels_last, optimizer)
        return net, flat, optimizer

    def step(net, flat, optimizer, seed):
        flat.drop_gradients()
        net(torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(seed))).square().mean().backward()
        flat.gather_gradients()
        optimizer.step()

    straight, saved = network_and_optimizer(saved_channels_last), network_and_optimizer(saved_channels_last)
    for seed in range(3):
        step(*straight, seed)
        step(*saved, seed)
    weights, state = copy.deepcopy(saved[0].state_dict()), copy.deepcopy(saved[2].state_dict())
    resumed = network_and_optimizer(resumed_channels_last)
    assert resumed[0][0].weight.is_contiguous(memory_format=torch.channels_last) == resumed_channels_last
    resumed[0].load_state_dict(weights)
    resumed[2].load_state_dict(state)
    for seed in range(3, 6):
        step(*straight, seed)
        step(*resumed, seed)
    for a, b in zip(straight[0].parameters(), resumed[0].parameters(), strict=True):
        torch.testing.assert_close(a, b)
