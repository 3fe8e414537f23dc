"""The cluster configs in cluster/, checked by what will read them: Ray's cluster-launcher schema
and defaults, botocore's EC2 model, Kubernetes' JSON schemas (kubernetes-validate), Ray's KubeRay
autoscaler, Ray Serve's config schema, Ray's runtime_env packaging, rsync, this project's CLIs and
diffusion.platform.serve.build_app. No cluster, cloud or network is needed.

KubeRay's CRD schemas are in no PyPI, npm or Debian package, so RayCluster, RayJob and RayService
are checked through their pod templates (Kubernetes' PodTemplateSpec schema), through Ray's KubeRay
autoscaler (which derives its config from them as the autoscaler sidecar does) and field by field here.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import ray
import yaml
from test_documented_commands import markdown_commands, parse_command, shell_commands, starts_a_command

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER = CLUSTER / "aws-gpu.yaml"
RUNTIME_ENV = CLUSTER / "runtime_env.yaml"
IMAGE = "registry.example.com/ray-diffusion:0.1.0"  # the placeholder every manifest and the README use
GPUS_PER_INSTANCE = {"p5.48xlarge": 8, "p5.4xlarge": 1, "g6.xlarge": 1, "g6.2xlarge": 1, "g5.2xlarge": 1}
K8S_VERSION = "1.30"  # the oldest Kubernetes the manifests are checked against
CREDENTIAL_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL", re.I)
AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


def load(path: Path):
    return yaml.safe_load(path.read_text())


def manifests(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((KUBERAY / name).read_text()) if doc]


def one(name: str, kind: str) -> dict:
    (doc,) = [d for d in manifests(name) if d["kind"] == kind]
    return doc


def ray_cluster_specs() -> dict[str, dict]:
    """Each RayClusterSpec: the RayCluster's own, the RayJob's and the RayService's."""
    return {
        "raycluster.yaml": one("raycluster.yaml", "RayCluster")["spec"],
        "rayjob-train.yaml": one("rayjob-train.yaml", "RayJob")["spec"]["rayClusterSpec"],
        "rayservice.yaml": one("rayservice.yaml", "RayService")["spec"]["rayClusterConfig"],
    }


def pod_templates() -> dict[str, dict]:
    templates = {}
    for name, spec in ray_cluster_specs().items():
        templates[f"{name}:head"] = spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            templates[f"{name}:{group['groupName']}"] = group["template"]
    templates["rayjob-train.yaml:submitter"] = one("rayjob-train.yaml", "RayJob")["spec"]["submitterPodTemplate"]
    return templates


def gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


def derived_autoscaling_config(name: str, spec: dict) -> dict:
    """The autoscaler config Ray's KubeRay autoscaler derives from a RayClusterSpec."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    return _derive_autoscaling_config_from_ray_cr({"metadata": {"name": name, "namespace": "default"}, "spec": spec})


# --- Ray cluster launcher (cluster/aws-gpu.yaml) --------------------------------------------------


@pytest.fixture(scope="module")
def launcher():
    """The config as `ray up` sees it: merged with Ray's AWS defaults, then checked against ray-schema.json."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(load(LAUNCHER)))
    validate_config(config)
    return config


def test_launcher_config_passes_rays_own_schema(launcher):
    assert launcher["provider"]["type"] == "aws" and launcher["provider"]["region"]
    assert launcher["head_node_type"] in launcher["available_node_types"]


def test_launcher_node_configs_are_valid_ec2_run_instances_requests(launcher):
    """Ray passes node_config to EC2 RunInstances: botocore's EC2 model must accept it."""
    import botocore.session
    from botocore.validate import ParamValidator

    ec2 = botocore.session.get_session().get_service_model("ec2")
    request = ec2.operation_model("RunInstances").input_shape
    instance_types = set(ec2.shape_for("InstanceType").enum)
    for name, node_type in launcher["available_node_types"].items():
        node_config = node_type["node_config"]
        report = ParamValidator().validate({**node_config, "MinCount": 1, "MaxCount": 1}, request)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"
        assert node_config["InstanceType"] in instance_types, f"{name}: unknown instance type"
        assert node_config["ImageId"].startswith(("ami-", "resolve:ssm:")), name
        assert {"Name", "Arn"} & set(node_config.get("IamInstanceProfile", {})), f"{name}: S3 access needs a profile"


def test_launcher_head_does_no_work_and_workers_are_autoscaling_gpu_nodes(launcher):
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    workers = {name: t for name, t in types.items() if name != launcher["head_node_type"]}
    assert len(workers) >= 2
    for name, worker in workers.items():
        instance_type = worker["node_config"]["InstanceType"]
        assert worker["min_workers"] == 0, f"{name}: idle GPU nodes cost money"
        assert 1 <= worker["max_workers"] <= launcher["max_workers"], name
        expected = GPUS_PER_INSTANCE.get(instance_type)
        assert worker["resources"]["GPU"] == expected, (
            f"{name}: {instance_type} has {expected} GPUs (GPUS_PER_INSTANCE)"
        )
        assert worker["resources"]["CPU"] >= worker["resources"]["GPU"], name
    assert any(GPUS_PER_INSTANCE[w["node_config"]["InstanceType"]] == 8 for w in workers.values())


def test_launcher_installs_the_synced_project_with_rays_version(launcher):
    assert launcher["file_mounts"] == {"~/ray-diffusion": "."}
    for commands in (launcher["head_setup_commands"], launcher["worker_setup_commands"]):
        install = [c for c in commands if "pip install" in c and "-e ~/ray-diffusion" in c]
        assert install and f"=={ray.__version__}" in install[0], commands
    image = launcher["docker"]["image"]
    assert re.fullmatch(rf"rayproject/ray:{re.escape(ray.__version__)}-py3\d+-gpu", image), image


def test_launcher_dashboard_listens_on_loopback_only(launcher):
    head_start = " ".join(launcher["head_start_ray_commands"])
    assert "ray start --head" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start


def test_every_launcher_node_starts_ray_with_token_auth_from_ssm(launcher):
    """Head and workers fetch the secrets (cluster/node_secrets.py) and start Ray with them."""
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        commands = launcher[key]
        fetch = commands.index("python ~/ray-diffusion/cluster/node_secrets.py")
        (start,) = [c for c in commands if "ray start" in c]
        assert commands.index(start) > fetch and start.startswith("set -a && . ~/.ray-diffusion.env && set +a && ")


def test_node_secrets_writes_0600_files_from_ssm(s3_server, tmp_path, capsys):
    """Against a real SSM API (moto's server): the token and the env file, owner-only, no value printed."""
    import os
    import stat

    import boto3

    spec = importlib.util.spec_from_file_location("node_secrets", CLUSTER / "node_secrets.py")
    node_secrets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(node_secrets)
    files = ["--token-file", str(tmp_path / "token"), "--env-file", str(tmp_path / "env"), "--prefix", "/rd-test"]
    with pytest.raises(SystemExit, match="no /rd-test/ray-token in SSM Parameter Store: create it"):
        node_secrets.main(files)
    ssm = boto3.client("ssm")
    values = {"ray-token": "t0k3n" * 8, "MLFLOW_TRACKING_PASSWORD": "pa ss'word", "RAY_DIFFUSION_API_KEY": "k3y"}
    for name, value in values.items():
        ssm.put_parameter(Name=f"/rd-test/{name}", Value=value, Type="SecureString")
    assert node_secrets.main(files) == 0
    assert not any(v in capsys.readouterr().out for v in values.values())
    for name in ("token", "env"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600
    assert (tmp_path / "token").read_text() == values["ray-token"]
    shell = f". {tmp_path / 'env'} && env"
    seen = dict(
        line.split("=", 1)
        for line in subprocess.run(["sh", "-c", shell], capture_output=True, text=True, env={}).stdout.splitlines()
    )
    assert seen["RAY_AUTH_MODE"] == "token" and seen["RAY_AUTH_TOKEN_PATH"] == str(tmp_path / "token")
    assert seen["MLFLOW_TRACKING_PASSWORD"] == "pa ss'word" and seen["RAY_DIFFUSION_API_KEY"] == "k3y"


def test_the_stacks_s3_endpoint_answers_403_to_every_request_not_signed_with_its_key():
    """cluster/s3_server.py on 127.0.0.1: the stack's key pair works; an unsigned request, malformed
    or forged signatures, presigned URLs and moto's API are 403, none a 500."""
    import os
    import sys
    import urllib.error
    import urllib.request

    import boto3
    from botocore.exceptions import ClientError

    from diffusion.platform.net import free_port, wait_for_http

    key_id, secret = "AKIASTACKKEY00000000", "stack-secret"
    url = f"http://127.0.0.1:{free_port()}"
    env = dict(os.environ, AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret)
    cmd = [sys.executable, CLUSTER / "s3_server.py", "--port", url.rsplit(":", 1)[1]]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_http(url, 60, server)

        def client(key=key_id, secret=secret):
            return boto3.client(
                "s3", endpoint_url=url, aws_access_key_id=key, aws_secret_access_key=secret, region_name="us-east-1"
            )

        client().create_bucket(Bucket="stack")
        client().put_object(Bucket="stack", Key="k", Body=b"x")

        def status(path: str, headers: dict) -> int:
            try:
                return urllib.request.urlopen(urllib.request.Request(url + path, headers=headers), timeout=30).status
            except urllib.error.HTTPError as e:
                return e.code

        scope = f"{key_id}/20261205/us-east-1/s3/aws4_request"
        forged_v4 = f"AWS4-HMAC-SHA256 Credential={scope}, SignedHeaders=host;x-amz-date, Signature={'0' * 64}"
        presigned = client().generate_presigned_url("get_object", Params={"Bucket": "stack", "Key": "k"})
        query = f"X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={scope}&X-Amz-Date=20261205T000000Z"
        seen = {
            "unsigned": status("/stack/k", {}),
            "garbage": status("/stack/k", {"Authorization": "garbage"}),
            "signature v2": status("/stack/k", {"Authorization": f"AWS {key_id}:abc"}),
            "forged v4": status("/stack/k", {"Authorization": forged_v4, "X-Amz-Date": "20261205T000000Z"}),
            "presigned": status(presigned.removeprefix(url), {}),
            "forged presigned": status(f"/stack/k?{query}&X-Amz-SignedHeaders=host&X-Amz-Signature=abc", {}),
            "moto api": status("/moto-api/data.json", {"Authorization": forged_v4}),
        }
        assert seen == dict.fromkeys(seen, 403), seen
        assert client().get_object(Bucket="stack", Key="k")["Body"].read() == b"x"
        with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
            client(secret="wrong").get_object(Bucket="stack", Key="k")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_launcher_rsync_keeps_code_and_leaves_local_state(launcher, tmp_path):
    """The rsync options Ray's command runner builds from the config, run for real on a small tree."""
    rsync = shutil.which("rsync")
    if rsync is None:
        pytest.skip("rsync is not installed (apt-get install rsync): it is what `ray up` syncs file_mounts with")
    tree = _working_tree(tmp_path / "src")
    shutil.copy(ROOT / ".gitignore", tree / ".gitignore")
    options = [opt for e in launcher["rsync_exclude"] for opt in ("--exclude", e)]
    options += [opt for f in launcher["rsync_filter"] for opt in ("--filter", f"dir-merge,- {f}")]
    out = subprocess.run(
        [rsync, "-a", "--dry-run", "--out-format=%n", *options, f"{tree}/", f"{tmp_path / 'dst'}/"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    _assert_code_without_local_state({p.rstrip("/") for p in out})


# --- runtime_env (cluster/runtime_env.yaml) --------------------------------------------------------


def test_runtime_env_is_what_ray_job_submit_accepts():
    from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**parse_runtime_env_args(runtime_env=str(RUNTIME_ENV)))
    assert env["working_dir"] == "."
    variables = env["env_vars"]
    assert {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"} <= set(variables)
    assert all(isinstance(v, str) for v in variables.values())
    assert not [k for k in variables if CREDENTIAL_NAME.search(k)], "credentials never go in a runtime_env"


def test_runtime_env_uploads_code_and_leaves_local_state(tmp_path):
    """Ray's own packaging of working_dir, with the file's excludes and without .gitignore's help."""
    from ray._private.runtime_env.packaging import create_package

    tree = _working_tree(tmp_path / "src")
    package = tmp_path / "package.zip"
    create_package(str(tree), package, include_gitignore=False, excludes=load(RUNTIME_ENV)["excludes"])
    with zipfile.ZipFile(package) as z:
        files = set(z.namelist())
    _assert_code_without_local_state({str(Path(p).parent) for p in files} | files)


def _working_tree(root: Path) -> Path:
    for path in [
        "diffusion/platform/storage.py",
        "diffusion/platform/serve.py",
        "jobs/train.py",
        "data/cifar10/manifest.json",
        "runs/cifar10-linear/checkpoint.pt",
        ".venv/bin/python",
        "mlruns/0/meta.yaml",
        "mlflow.db",
    ]:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("x")
    return root


def _assert_code_without_local_state(paths: set[str]) -> None:
    assert {"diffusion/platform/storage.py", "diffusion/platform/serve.py", "jobs/train.py"} <= paths, sorted(paths)
    for local in ["data", "runs", ".venv", "mlruns", "mlflow.db"]:
        assert not [p for p in paths if p == local or p.startswith(local + "/")], f"{local} is synced"


# --- KubeRay (cluster/kuberay/) -------------------------------------------------------------------


def test_kuberay_manifests_are_the_expected_kinds():
    kinds = {name.name: [(d["apiVersion"], d["kind"]) for d in manifests(name.name)] for name in KUBERAY.glob("*")}
    assert kinds == {
        "common.yaml": [("v1", "ServiceAccount"), ("v1", "ConfigMap")],
        "raycluster.yaml": [("ray.io/v1", "RayCluster")],
        "rayjob-train.yaml": [("ray.io/v1", "RayJob")],
        "rayservice.yaml": [("ray.io/v1", "RayService")],
    }
    names = [(d["kind"], d["metadata"]["name"]) for f in KUBERAY.glob("*") for d in manifests(f.name)]
    assert len(names) == len(set(names))


@pytest.fixture(scope="module")
def k8s_validate():
    kv = pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed (pip install 'kubernetes-validate>=1.30'): "
        "it ships the Kubernetes JSON schemas these checks use",
    )
    return lambda obj: kv.validate(obj, K8S_VERSION, strict=True)  # strict: unknown fields are errors


def test_core_objects_match_kubernetes_schemas(k8s_validate):
    for doc in manifests("common.yaml"):
        k8s_validate(doc)


@pytest.mark.parametrize("where", sorted(pod_templates()))
def test_pod_templates_match_kubernetes_schemas(k8s_validate, where):
    template = pod_templates()[where]
    k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template})


def test_validation_rejects_a_wrong_pod_field(k8s_validate):
    """The schema check can fail: a misspelled field and a wrong type are both errors."""
    import kubernetes_validate

    template = copy.deepcopy(pod_templates()["raycluster.yaml:head"])
    template["spec"]["containers"][0]["envfrom"] = template["spec"]["containers"][0].pop("envFrom")
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template})
    template = copy.deepcopy(pod_templates()["raycluster.yaml:head"])
    template["spec"]["containers"][0]["ports"][0]["containerPort"] = "6379"
    with pytest.raises(kubernetes_validate.ValidationError):
        k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template})


@pytest.mark.parametrize("name", sorted(ray_cluster_specs()))
def test_kuberay_autoscaler_sees_a_cpu_head_and_gpu_workers(name):
    from ray.autoscaler._private.util import validate_config

    spec = ray_cluster_specs()[name]
    assert spec["rayVersion"] == ray.__version__
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:  # KubeRay's rayStartParams is a map of strings
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group["rayStartParams"]
    config = derived_autoscaling_config(name.split(".")[0], spec)
    validate_config(config)
    types = config["available_node_types"]
    head = types.pop(config["head_node_type"])
    assert head["resources"]["CPU"] == 0 and "GPU" not in head["resources"], "work would land on the head"
    assert gpus(spec["headGroupSpec"]["template"]["spec"]["containers"][0]) == 0
    for group in spec["workerGroupSpecs"]:
        container = group["template"]["spec"]["containers"][0]
        assert gpus(container) >= 1 and types[group["groupName"]]["resources"]["GPU"] == gpus(container)
        assert container["resources"]["requests"] == container["resources"]["limits"], "guaranteed QoS"
        assert any(
            v.get("emptyDir", {}).get("medium") == "Memory" for v in group["template"]["spec"].get("volumes", [])
        )
    if spec.get("enableInTreeAutoscaling"):
        assert config["idle_timeout_minutes"] * 60 == spec["autoscalerOptions"]["idleTimeoutSeconds"]


@pytest.mark.parametrize("name", sorted(ray_cluster_specs()))
def test_every_kuberay_cluster_has_token_auth_and_the_service_credentials(name):
    spec = ray_cluster_specs()[name]
    assert spec["authOptions"] == {"mode": "token"}
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        (container,) = group["template"]["spec"]["containers"]
        refs = {v["name"]: v["valueFrom"]["secretKeyRef"]["name"] for v in container["env"]}
        for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "RAY_DIFFUSION_API_KEY"):
            assert refs[var] == "ray-diffusion-auth", (name, var)


def test_raycluster_grows_gpu_workers_from_zero():
    spec = ray_cluster_specs()["raycluster.yaml"]
    assert spec["enableInTreeAutoscaling"] is True and spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    assert [g["minReplicas"] for g in spec["workerGroupSpecs"]] == [0] * len(spec["workerGroupSpecs"])
    assert all(g["maxReplicas"] >= 1 for g in spec["workerGroupSpecs"])
    assert {gpus(g["template"]["spec"]["containers"][0]) for g in spec["workerGroupSpecs"]} == {1, 8}


def test_pods_take_settings_from_the_configmap_and_credentials_only_from_secrets():
    common = {d["kind"]: d for d in manifests("common.yaml")}
    configmap, account = common["ConfigMap"], common["ServiceAccount"]
    assert "MLFLOW_TRACKING_URI" in configmap["data"]
    assert not [k for k in configmap["data"] if CREDENTIAL_NAME.search(k)], "credentials go in a Secret"
    for where, template in pod_templates().items():
        for container in template["spec"]["containers"]:
            for var in container.get("env", []):
                if CREDENTIAL_NAME.search(var["name"]):
                    assert "value" not in var and "secretKeyRef" in var["valueFrom"], f"{where}: {var['name']}"
        if where.endswith("submitter"):
            continue
        assert template["spec"]["serviceAccountName"] == account["metadata"]["name"], where
        (ray_container,) = template["spec"]["containers"]
        refs = [e["configMapRef"]["name"] for e in ray_container["envFrom"]]
        assert refs == [configmap["metadata"]["name"]], where
        secret_vars = {v["name"] for v in ray_container["env"] if "secretKeyRef" in v.get("valueFrom", {})}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= secret_vars, where


def test_every_pod_runs_the_project_image_built_from_the_dockerfile():
    images = {c["image"] for t in pod_templates().values() for c in t["spec"]["containers"]}
    assert images == {IMAGE}
    readme = (CLUSTER / "README.md").read_text()
    assert f"-f cluster/Dockerfile --build-arg GIT_COMMIT=$(git rev-parse HEAD) -t {IMAGE} ." in readme
    assert f"docker push {IMAGE}" in readme
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"ARG RAY_VERSION={ray.__version__}\n" in dockerfile
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    launcher_image = load(LAUNCHER)["docker"]["image"]
    assert base.replace("${RAY_VERSION}", ray.__version__) == launcher_image  # one Ray and Python everywhere
    assert re.search(r'RUN pip install .*"ray\[[a-z,]+\]==\$\{RAY_VERSION\}" \.$', dockerfile, re.M)
    copied = re.findall(r"^COPY \S+ (.+) \S+$", dockerfile, re.M)
    assert {"diffusion/", "jobs/", "tune/"} <= {p for line in copied for p in line.split()}


def test_rayjob_runs_training_on_a_cluster_it_creates_and_deletes():
    job = one("rayjob-train.yaml", "RayJob")["spec"]
    assert job["shutdownAfterJobFinishes"] is True and job["submissionMode"] == "K8sJobMode"
    assert job["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"
    (command,) = shell_commands(job["entrypoint"])
    script, args = command.script
    assert script == "jobs/train.py"
    parsed = parse_command(script, args)
    config, recipe = parsed.settings, parsed.recipe
    assert config.data.startswith("s3://") and config.storage.startswith("s3://") and "--name" in args
    # Explicit, as the cluster's GPUs may not have joined when the job starts; and they must fit.
    assert {"--num-workers", "--gpus-per-worker"} <= set(args), command
    cluster_gpus = sum(
        g["replicas"] * gpus(g["template"]["spec"]["containers"][0]) for g in job["rayClusterSpec"]["workerGroupSpecs"]
    )
    assert config.num_workers * config.gpus_per_worker <= cluster_gpus
    assert recipe.batch_size % config.num_workers == 0


def test_rayservice_serves_build_app_with_the_serve_config_arguments():
    from ray.serve.schema import HTTPOptionsSchema, ServeApplicationSchema, ServeDeploySchema

    from diffusion.platform.serve import serve_args

    service = one("rayservice.yaml", "RayService")["spec"]
    serve_config = yaml.safe_load(service["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_config)
    assert set(serve_config) <= set(ServeDeploySchema.model_fields)  # Serve ignores unknown keys: a typo is silent
    assert set(serve_config.get("http_options", {})) <= set(HTTPOptionsSchema.model_fields)
    (app,) = serve_config["applications"]
    assert set(app) <= set(ServeApplicationSchema.model_fields)
    assert app["import_path"] == "diffusion.platform.serve:build_app"
    args = app["args"]
    serve_args(args)  # a missing, unknown or out-of-range argument raises
    (local_app,) = load(ROOT / "jobs" / "serve_config.yaml")["applications"]
    assert set(args) == set(local_app["args"]) and local_app["import_path"] == app["import_path"]
    assert args["checkpoint"].startswith("s3://") and args["gpus"] >= 1
    (group,) = service["rayClusterConfig"]["workerGroupSpecs"]
    per_pod = gpus(group["template"]["spec"]["containers"][0])
    assert args["replicas"] * args["gpus"] <= group["minReplicas"] * per_pod
    assert max(args["max_replicas"], args["replicas"]) * args["gpus"] <= group["maxReplicas"] * per_pod


def test_no_credentials_in_any_config():
    for path in [*CLUSTER.glob("*.yaml"), *KUBERAY.glob("*.yaml"), CLUSTER / "Dockerfile", CLUSTER / "README.md"]:
        text = path.read_text()
        assert not AWS_KEY_ID.search(text), path
        assert not re.search(r"(?i)aws_secret_access_key\s*[:=]\s*[\"']?[A-Za-z0-9/+]{20,}", text), path
    launcher = LAUNCHER.read_text()
    assert not re.search(r"(?i)aws_(access_key_id|secret_access_key|session_token)", launcher)


# --- the commands in these files ----------------------------------------------------------------


def config_commands() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Every `python SCRIPT` command in cluster/: its YAML files' comments and string values (each
    line that is a command) and its README (as tests/test_documented_commands.py reads the docs)."""
    found = {}
    for path in sorted([*CLUSTER.glob("*.yaml"), *KUBERAY.glob("*.yaml"), CLUSTER / "README.md"]):
        text = path.read_text()
        if path.suffix == ".yaml":
            strings = [line.split("#", 1)[1] for line in text.splitlines() if "#" in line]
            docs = list(yaml.safe_load_all(text))
            while docs:
                item = docs.pop()
                if isinstance(item, dict):
                    docs.extend(item.values())
                elif isinstance(item, list):
                    docs.extend(item)
                elif isinstance(item, str):
                    strings.append(item)
            lines = [line for string in strings for line in string.splitlines() if starts_a_command(line)]
            commands = shell_commands("\n".join(lines))
        else:
            commands = markdown_commands(text)
        scripts = [c.script for c in commands if c.script and c.script[0].endswith(".py")]
        for i, script in enumerate(scripts):
            found[f"{path.name}:{Path(script[0]).name}:{i}"] = script
    return found


def test_config_commands_cover_every_entry_point():
    scripts = {script for script, _ in config_commands().values()}
    assert {"jobs/train.py", "jobs/sample.py", "jobs/serve.py", "jobs/prepare_data.py", "tune/sweep.py"} <= scripts


@pytest.mark.parametrize("where", sorted(config_commands()))
def test_config_commands_use_flags_the_cli_accepts(where):
    parse_command(*config_commands()[where])
