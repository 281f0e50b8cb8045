"""Pair generation: prompts, deterministic noise, the Parquet contract, the Ray Data job, reruns, errors, S3."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dmd_ray.data import pairs, storage
from dmd_ray.method.denoiser import GuidedDenoiser
from dmd_ray.sd.architectures import build_tiny_teacher
from dmd_ray.method.sampling import ode_sample
from dmd_ray.sd.teacher_sampler import make_scheduler

from dmd_ray.config import PairsConfig, cli_main
from dmd_ray.data.prompts import read_prompts
from dmd_ray.distributed.pair_job import PairShardActor, PairStream, generate_pairs, ray_dataset, read_with_pyarrow
from dmd_ray.method.sampling import seeded_noise

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROMPTS = ["a small red circle on a blue background", "a large green square", "the yellow triangle at the top"]


def small_config(out, prompts, **overrides):
    values = dict(teacher="tiny", prompts=prompts, num_pairs=20, shard_size=8, steps=4, sampler="ddim", guidance_scale=3.0, out=out, batch_size=4)
    values.update(overrides)
    return PairsConfig(**values)


# ------------------------------------------------------------------------------------------------ prompts
@pytest.mark.parametrize("fmt", ["txt", "csv", "jsonl", "parquet"])
def test_read_prompts_formats(tmp_path, fmt):
    path = tmp_path / f"p.{fmt}"
    if fmt == "txt":
        path.write_text("\n".join(PROMPTS) + "\n\n")
    elif fmt == "csv":
        path.write_text("id,prompt\n" + "".join(f'{i},"{p}"\n' for i, p in enumerate(PROMPTS)))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    else:
        pq.write_table(pa.table({"prompt": PROMPTS}), path)
    assert read_prompts(str(path)) == PROMPTS


def test_read_prompts_from_s3(s3_bucket):
    storage.write_bytes(s3_bucket + "/prompts.jsonl", "".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS).encode())
    assert read_prompts(s3_bucket + "/prompts.jsonl") == PROMPTS


def test_bad_prompt_files(tmp_path):
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts(str(tmp_path / "empty.txt"))
    (tmp_path / "nocol.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="no 'prompt' column"):
        read_prompts(str(tmp_path / "nocol.csv"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_prompts(str(tmp_path / "missing.txt"))


# ------------------------------------------------------------------------------------------------ noise and shards
def test_noise_depends_only_on_seed_and_index():
    assert pairs.pair_seed(0, 5) == pairs.pair_seed(0, 5)
    seeds = {pairs.pair_seed(s, i) for s in range(3) for i in range(1000)}
    assert len(seeds) == 3000 and all(0 <= s < 2**63 for s in seeds)
    a = seeded_noise(pairs.pair_seed(7, 3), (4, 8, 8))
    torch.manual_seed(123)  # global RNG state does not matter
    assert torch.equal(a, seeded_noise(pairs.pair_seed(7, 3), (4, 8, 8)))


def test_shard_rows_match_the_teacher_sampler(tmp_path):
    cfg = small_config(str(tmp_path / "out"), "unused")
    table = PairShardActor(cfg, PROMPTS, device="cpu").writer.make_shard(1)
    assert table.column("index").to_pylist() == list(range(8, 16))
    assert table.column("prompt").to_pylist() == [PROMPTS[i % 3] for i in range(8, 16)]
    assert str(table.schema.field("noise").type).startswith("extension<arrow.fixed_shape_tensor[value_type=halffloat, shape=[4,8,8]")
    noise = table.column("noise").combine_chunks().to_numpy_ndarray()
    target = table.column("target").combine_chunks().to_numpy_ndarray()
    # pair 9, recomputed alone with the same teacher, sampler and guidance
    teacher = build_tiny_teacher()
    seed = pairs.pair_seed(0, 9)
    z = seeded_noise(seed, (4, 8, 8))[None]
    assert np.array_equal(noise[1], z[0].numpy().astype(np.float16))
    denoiser = GuidedDenoiser(teacher.denoiser(), 3.0, teacher.uncond_embedding())
    alone = ode_sample(denoiser, make_scheduler("ddim", teacher.scheduler), z, teacher.encode_prompts([PROMPTS[0]]), 4)
    np.testing.assert_allclose(target[1], alone[0].numpy(), rtol=1e-3, atol=1e-3)  # float16 storage


# ------------------------------------------------------------------------------------------------ the Ray job
def _rows(uri):
    batches = list(pairs.iter_pairs(uri, batch_size=7))
    return torch.cat([b["index"] for b in batches]), torch.cat([b["noise"] for b in batches]), torch.cat([b["target"] for b in batches])


def test_job_writes_resumes_and_never_duplicates(ray_cluster, prompts_file, tmp_path):
    out = str(tmp_path / "pairs")
    cfg = small_config(out, prompts_file)
    summary = generate_pairs(cfg)
    assert summary["pairs_made"] == 20 and summary["pairs_per_second"] > 0
    assert storage.list_files(out) == ["manifest.json", "shard-000000.parquet", "shard-000001.parquet", "shard-000002.parquet"]
    manifest = pairs.load_manifest(out)
    assert manifest["status"] == "complete" and manifest["completed_shards"] == [0, 1, 2]
    index, noise, target = _rows(out)
    assert index.tolist() == list(range(20)) and noise.shape == (20, 4, 8, 8) and noise.dtype == torch.float16

    # rerun: nothing to do, nothing rewritten
    mtimes = {f: os.path.getmtime(os.path.join(out, f)) for f in storage.list_files(out) if f.startswith("shard")}
    assert generate_pairs(cfg)["pairs_made"] == 0
    assert mtimes == {f: os.path.getmtime(os.path.join(out, f)) for f in mtimes}

    # a lost shard is remade, identical
    os.remove(os.path.join(out, "shard-000001.parquet"))
    assert generate_pairs(cfg)["pairs_made"] == 8
    index2, noise2, target2 = _rows(out)
    assert torch.equal(index, index2) and torch.equal(noise, noise2) and torch.equal(target, target2)

    # the Ray Data reader sees the same pairs
    ds = ray_dataset(out, columns=["index", "noise"])
    got = sorted((int(r["index"]), r["noise"].tobytes()) for r in ds.iter_rows())
    assert [g[0] for g in got] == list(range(20)) and got[3][1] == noise[3].numpy().tobytes()


def test_job_refuses_pairs_of_another_config(ray_cluster, prompts_file, tmp_path):
    out = str(tmp_path / "pairs")
    generate_pairs(small_config(out, prompts_file, num_pairs=8))
    before = sorted(storage.list_files(out))
    for change in ({"guidance_scale": 8.0}, {"steps": 5}, {"seed": 1}, {"sampler": "pndm"}):
        with pytest.raises(ValueError, match="another teacher or config"):
            generate_pairs(small_config(out, prompts_file, num_pairs=8, **change))
    assert sorted(storage.list_files(out)) == before


def test_job_bad_input_fails_before_sampling(ray_cluster, prompts_file, tmp_path, s3_server):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match="no prompts"):
        generate_pairs(small_config(out, str(empty)))
    from dmd_ray.sd.resolve import TeacherNotFoundError

    with pytest.raises(TeacherNotFoundError):
        generate_pairs(small_config(out, prompts_file, teacher=str(tmp_path / "no-teacher")))
    with pytest.raises(storage.StorageError, match="does not exist"):
        generate_pairs(small_config("s3://no-such-bucket-dmd/pairs", prompts_file))
    with pytest.raises(ValueError, match="sampler"):
        generate_pairs(small_config(out, prompts_file, sampler="heun2"))
    assert not os.path.exists(os.path.join(out, "manifest.json"))


def test_cli_errors_are_clear(prompts_file, tmp_path, capsys):
    
    def never(cfg):
        raise AssertionError("the job must not start")

    with pytest.raises(SystemExit) as e:
        cli_main("generate_pairs", PairsConfig, never, ["--prompts", prompts_file, "--num-pairs", "ten"])
    assert e.value.code == 2 and "num_pairs" in capsys.readouterr().err
    assert cli_main("generate_pairs", PairsConfig, never, ["--prompts", prompts_file, "--num-pairs", "0", "--out", str(tmp_path)]) == 2
    assert "num_pairs must be positive" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the pair stream
def write_pairs(out: str, num_pairs: int, shard_size: int) -> None:
    """A pairs dataset without a teacher: each pair's index as its target, so batches trace back to rows."""
    layout = pairs.ShardLayout(num_pairs, shard_size)
    index_of = {pairs.pair_seed(0, i): float(i) for i in range(num_pairs)}
    make = lambda prompts, seeds: (torch.zeros(len(seeds), 1, 2, 2), torch.tensor([index_of[s] for s in seeds]).reshape(-1, 1, 1, 1).expand(-1, 1, 2, 2))  # noqa: E731
    writer = pairs.ShardWriter(out, layout, PROMPTS, 0, make, 4, {"teacher": "none", "sampler": "ddim", "steps": 1, "guidance_scale": 1.0})
    for k in range(layout.num_shards):
        writer.write_shard(k)
    config = pairs.manifest_config(teacher="none", sampler="ddim", steps=1, guidance_scale=1.0, resolution=2, latent_shape=(1, 2, 2),
                                   dtype=torch.float32, seed=0, layout=layout, prompts=PROMPTS)
    pairs.write_manifest(out, config, list(range(layout.num_shards)))


def test_pair_stream_resumes_exactly_and_splits_shards_over_workers(tmp_path):
    """Resume arithmetic on local Parquet, without Ray: a stream rebuilt from state() continues with exactly the
    next batch, also mid-shard and across epochs; workers own disjoint shards."""
    out = str(tmp_path / "pairs")
    write_pairs(out, num_pairs=20, shard_size=6)  # shards of 6, 6, 6, 2

    def targets(stream, n):
        return [tuple(next(stream)["target"][:, 0, 0, 0].tolist()) for _ in range(n)]

    straight = PairStream(out, 3, rank=0, world=1, seed=5, read=read_with_pyarrow)
    expected = targets(straight, 14)  # 20 // 3 = 6 batches per epoch: more than two epochs
    for split in (1, 4, 6, 7, 13):
        first = PairStream(out, 3, rank=0, world=1, seed=5, read=read_with_pyarrow)
        head = targets(first, split)
        resumed = PairStream(out, 3, rank=0, world=1, seed=5, state=first.state(), read=read_with_pyarrow)
        assert head + targets(resumed, 14 - split) == expected, split
    epoch = [v for batch in expected[:6] for v in batch]
    assert len(set(epoch)) == 18 and expected[:6] != expected[6:12]  # each epoch without repeats, epochs in new orders

    reads = []

    def counting_read(files, chunk_size):
        reads.append(list(files))
        return read_with_pyarrow(files, chunk_size)

    # shards kept in memory after the first pass: later passes read nothing and give the very same batches
    assert targets(PairStream(out, 3, rank=0, world=1, seed=5, read=counting_read), 14) == expected and len(reads) == 1
    reads.clear()
    assert targets(PairStream(out, 3, rank=0, world=1, seed=5, read=counting_read, memory_bytes=0), 14) == expected and len(reads) == 3
    rank0 = {v for batch in targets(PairStream(out, 2, 0, 2, 5, read=read_with_pyarrow), 4) for v in batch}
    rank1 = {v for batch in targets(PairStream(out, 2, 1, 2, 5, read=read_with_pyarrow), 4) for v in batch}
    assert not rank0 & rank1
    with pytest.raises(ValueError, match="fewer than its batch"):
        PairStream(out, 9, rank=1, world=2, seed=0, read=read_with_pyarrow)  # shards 1 and 3: 8 pairs


@pytest.mark.slow
def test_killed_run_resumes_to_exactly_n_unique_pairs_on_s3(s3_bucket, prompts_file, tmp_path):
    """A real job process is killed mid-way (SIGKILL, whole process group); a rerun completes the dataset on the
    local S3 server with exactly N unique pairs, and no shard of the killed run is ever seen half-written."""
    out = f"{s3_bucket}/pairs"
    args = [sys.executable, os.path.join(REPO, "jobs", "generate_pairs.py"), "--teacher", "tiny", "--prompts", prompts_file,
            "--num-pairs", "96", "--shard-size", "8", "--steps", "25", "--sampler", "ddim", "--batch-size", "4", "--out", out]
    env = dict(os.environ, RAY_ADDRESS="")
    env.pop("RAY_ADDRESS")
    proc = subprocess.Popen(args, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(pairs.completed_shards(out)) < 2:
            assert proc.poll() is None, "the job ended before it could be killed"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # Ray's worker processes live in their own sessions: one may finish the upload it had in flight before the
    # cluster notices that its driver died. Count once the listing is stable.
    partial, stable_since = pairs.completed_shards(out), time.time()
    while time.time() - stable_since < 3:
        time.sleep(0.5)
        now = pairs.completed_shards(out)
        if now != partial:
            partial, stable_since = now, time.time()
    assert 2 <= len(partial) < 12, "the kill must land mid-way"
    for k in partial:  # every visible shard is whole
        assert pq.read_table(storage.resolve(f"{out}/{pairs.shard_name(k)}")[1], filesystem=storage.s3_filesystem()).num_rows == 8

    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{12 - len(partial)} to make" in rerun.stdout
    index, noise, _ = _rows(out)
    assert sorted(index.tolist()) == list(range(96))
    assert len({n.numpy().tobytes() for n in noise}) == 96
    assert pairs.load_manifest(out)["status"] == "complete"


@pytest.mark.slow
def test_compiled_pair_sampler_gives_the_eager_pairs():
    """`compile` (auto: CUDA graphs on a GPU; the default mode here) only changes speed: a short batch, padded to the
    compiled batch size, gives the eager pairs."""
    import torch

    from dmd_ray.sd.architectures import build_tiny_teacher
    from dmd_ray.sd.teacher_sampler import PairSampler

    settings = dict(sampler="ddim", steps=4, guidance_scale=3.0, resolution=32, device=torch.device("cpu"), dtype=torch.float32)
    eager = PairSampler(build_tiny_teacher(), **settings)
    compiled = PairSampler(build_tiny_teacher(), **settings, compile_mode="default", batch_size=4)
    prompts, seeds = ["a red circle", "a blue square", "a green star"], [1, 2, 3]
    (noise_a, target_a), (noise_b, target_b) = eager(prompts, seeds), compiled(prompts, seeds)
    assert target_b.shape == target_a.shape and target_a.shape[0] == 3
    torch.testing.assert_close(noise_b, noise_a)
    torch.testing.assert_close(target_b, target_a, rtol=1e-4, atol=1e-4)
