"""infra/: the worker images' pins agree with pyproject.toml and the launcher's Beam; the Flink
compose file and Kubernetes example hold together (a YAML structure check: no Docker daemon
here, `docker compose config` runs where there is one); the Dataflow submit script and flex
template name flags the recipes have."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DOCKERFILES = [INFRA / "docker" / "Dockerfile", INFRA / "docker" / "Dockerfile.gpu"]
COMPOSE = INFRA / "flink" / "docker-compose.yml"
K8S = INFRA / "flink" / "k8s"
RECIPES = ("rs5m", "local", "remoteclip")


def pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {Requirement(d).name.lower(): Requirement(d) for d in project["dependencies"]}


def constraints() -> dict[str, str]:
    pins = {}
    for line in (INFRA / "docker" / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def dockerfile_args(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)", path.read_text(), re.MULTILINE))


def test_constraints_pin_every_dependency_within_pyproject():
    reqs, pins = pyproject_requirements(), constraints()
    assert sorted(pins) == sorted(reqs), "run .venv/bin/python infra/docker/pin.py"
    for name, req in reqs.items():
        assert req.specifier.contains(pins[name], prereleases=True), (name, pins[name], req)


def test_constraints_are_the_versions_the_tests_run_with():
    pins = constraints()
    stale = {n: (v, metadata.version(n)) for n, v in pins.items() if metadata.version(n) != v}
    assert not stale, f"pins differ from this virtualenv (run infra/docker/pin.py): {stale}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_pins_match_pyproject_and_the_launcher(dockerfile):
    import apache_beam

    text = dockerfile.read_text()
    args, pins, reqs = dockerfile_args(dockerfile), constraints(), pyproject_requirements()
    # the SDK harness in the image must be the launcher's Beam, and pyproject's
    beam = args["BEAM_VERSION"]
    assert beam == pins["apache-beam"] == apache_beam.__version__
    assert reqs["apache-beam"].specifier.contains(beam)
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert re.search(rf"^FROM apache/beam_python{re.escape(py)}_sdk:\$\{{BEAM_VERSION\}}\s*$",
                     text, re.MULTILINE), "the base image is Beam's SDK image for our python"
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires).contains(Version(py))
    for arg, dist in (("TORCH_VERSION", "torch"), ("TORCHVISION_VERSION", "torchvision")):
        assert args[arg] == pins[dist], (arg, args[arg], pins[dist])
        assert reqs[dist].specifier.contains(args[arg])
    # the project is installed under the pins, the tiny demo models are not copied in
    assert "-c constraints.txt ." in text
    assert "COPY infra/docker/constraints.txt" in text
    assert not re.search(r"^COPY\s+(data|out)\b", text, re.MULTILINE)
    ignore = [x for x in Path(f"{dockerfile}.dockerignore").read_text().splitlines()
              if x and not x.startswith("#")]
    assert ignore[0] == "*" and "!infra/docker/constraints.txt" in ignore  # only what it needs


def test_gpu_image_gets_cuda_torch_and_cpu_image_cpu_torch():
    cpu, gpu = (p.read_text() for p in DOCKERFILES)
    assert "download.pytorch.org/whl/cpu" in cpu
    assert "download.pytorch.org/whl/cpu" not in gpu and "torch.version.cuda" in gpu


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_structure():
    doc = compose()
    services = doc["services"]
    assert set(services) == {"jobmanager", "taskmanager", "jobserver", "worker-pool"}
    flink = services["jobmanager"]["image"]
    assert flink.startswith("flink:") and services["taskmanager"]["image"] == flink
    flink_minor = flink.split(":", 1)[1]
    beam = dockerfile_args(DOCKERFILES[0])["BEAM_VERSION"]
    # Beam's Flink job server: the launcher's Beam, built for the cluster's Flink
    assert services["jobserver"]["image"] == f"apache/beam_flink{flink_minor}_job_server:{beam}"
    assert "--flink-master=jobmanager:8081" in services["jobserver"]["command"]
    assert {"8099:8099", "8098:8098"} <= set(services["jobserver"]["ports"])
    for name in ("jobmanager", "taskmanager"):
        props = services[name]["environment"]["FLINK_PROPERTIES"]
        assert "jobmanager.rpc.address: jobmanager" in props
    assert services["jobmanager"]["command"] == "jobmanager"
    assert services["taskmanager"]["command"] == "taskmanager"
    # the SDK worker pool: our image in pool mode, in the taskmanager's network namespace, so
    # --environment_config=localhost:50000 reaches it from the taskmanager; no docker socket
    pool = services["worker-pool"]
    assert "rs-corpus" in pool["image"]
    assert pool["command"] == ["--worker_pool"]
    assert pool["network_mode"] == "service:taskmanager"
    assert "50000:50000" in services["taskmanager"]["ports"]
    assert not any("docker.sock" in v for s in services.values() for v in s.get("volumes", []))
    # every service that reads or writes build data sees the same /data
    for name in ("taskmanager", "worker-pool", "jobserver"):
        assert any(v.endswith(":/data") for v in services[name]["volumes"]), name


def _has_compose() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30,
                          check=False).returncode == 0


@pytest.mark.skipif(not _has_compose(), reason="no `docker compose` here (the YAML checks run)")
def test_docker_compose_config_accepts_the_file():
    proc = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr


def k8s_documents() -> list[dict]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def test_kubernetes_example_structure():
    docs = {d["kind"]: d for d in k8s_documents()}
    assert {"FlinkDeployment", "Deployment", "Service"} <= set(docs)
    fd = docs["FlinkDeployment"]
    assert fd["apiVersion"] == "flink.apache.org/v1beta1"
    flink_minor = fd["spec"]["image"].split(":", 1)[1]
    assert fd["spec"]["flinkVersion"] == "v" + flink_minor.replace(".", "_")
    containers = {c["name"]: c for c in
                  fd["spec"]["taskManager"]["podTemplate"]["spec"]["containers"]}
    assert "flink-main-container" in containers
    pool = containers["beam-worker-pool"]
    assert pool["args"] == ["--worker_pool"] and "rs-corpus" in pool["image"]
    assert [p["containerPort"] for p in pool["ports"]] == [50000]
    beam = dockerfile_args(DOCKERFILES[0])["BEAM_VERSION"]
    job = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert job["image"] == f"apache/beam_flink{flink_minor}_job_server:{beam}"
    assert f"--flink-master={fd['metadata']['name']}-rest:8081" in job["args"]
    svc_ports = {p["port"] for p in docs["Service"]["spec"]["ports"]}
    assert {8099, 8098} <= svc_ports
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"][
        "matchLabels"]


def _recipe_flags() -> set[str]:
    flags: set[str] = set()
    for name in RECIPES:
        parser = importlib.import_module(f"pipelines.recipes.{name}").RECIPE.parser()
        flags |= {o.lstrip("-") for a in parser._actions for o in a.option_strings}
    return flags


def test_flex_template_parameters_are_recipe_flags():
    spec = json.loads((INFRA / "dataflow" / "flex-template" / "metadata.json").read_text())
    names = [p["name"] for p in spec["parameters"]]
    assert len(names) == len(set(names)) and "recipe" in names and "output" in names
    unknown = set(names) - {"recipe"} - _recipe_flags()
    assert not unknown
    text = (INFRA / "dataflow" / "flex-template" / "Dockerfile").read_text()
    assert "FLEX_TEMPLATE_PYTHON_PY_FILE" in text and "python_template_launcher" in text


def test_flex_template_entry_point_picks_the_recipe(capsys):
    sys.path.insert(0, str(INFRA / "dataflow" / "flex-template"))
    try:
        main = importlib.import_module("main")
        with pytest.raises(SystemExit) as e:
            main.main(["--recipe", "local", "--help"])
        assert e.value.code == 0
        assert "--local" in capsys.readouterr().out
        with pytest.raises(SystemExit, match="no recipe"):
            main.main(["--recipe", "kit"])
    finally:
        sys.path.remove(str(INFRA / "dataflow" / "flex-template"))
        sys.modules.pop("main", None)


def test_submit_script_flags_exist():
    text = (INFRA / "dataflow" / "submit.sh").read_text()
    flags = set(re.findall(r"--([a-z_]+)=", text))
    beam_flags = {"runner", "project", "region", "job_name", "temp_location",
                  "staging_location", "sdk_container_image", "sdk_location", "machine_type",
                  "max_num_workers", "autoscaling_algorithm",
                  "number_of_worker_harness_threads", "dry_run"}
    assert not flags - beam_flags - _recipe_flags()
    subprocess.run(["bash", "-n", str(INFRA / "dataflow" / "submit.sh")], check=True,
                   timeout=30)


@pytest.mark.slow
def test_submit_script_translates_for_dataflow_with_gs_weights(tmp_path):
    """The launcher accepts gs:// weights and does not read them (only the workers do)."""
    from PIL import Image

    folder = tmp_path / "mine"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (96, 96), (40 * i, 90, 120)).save(folder / f"{i}.jpg")
    (folder / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{i}.jpg", "caption": f"scene {i}"}) + "\n" for i in range(2)))
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PROJECT": "rs-corpus-test",
           "REGION": "us-central1", "BUCKET": "rs-corpus-test", "IMAGE": "example/rs-corpus:1",
           "RECIPE": "local", "INPUT": str(folder), "PY": sys.executable,
           "ACCELERATOR": "type:nvidia-l4;count:1;install-nvidia-driver"}
    proc = subprocess.run(["bash", str(INFRA / "dataflow" / "submit.sh"), "--dry_run=True"],
                          env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the pipeline translated; nothing was submitted" in proc.stderr


# --- every recipe translates for Dataflow with gs:// everything, no bucket access ---------

BUCKET = "gs://rs-corpus-test"
ACCELERATOR = "type:nvidia-l4;count:1;install-nvidia-driver"
DATAFLOW_DRY = ["--runner=DataflowRunner", "--dry_run=True", "--project=rs-corpus-test",
                "--region=us-central1", f"--temp_location={BUCKET}/tmp",
                f"--accelerator={ACCELERATOR}", "--clip_model=ViT-B-32",
                f"--clip_pretrained={BUCKET}/models/vit-b-32.pt"]
#: recipe → (its gs:// inputs, the model stages its job must hold)
GS_BUILDS = {
    "rs5m": ([f"--input={BUCKET}/laion/*.parquet", "--rs_model=ViT-B-32",
              f"--rs_pretrained={BUCKET}/models/vit-b-32.pt",
              # the probe's threshold is read on the workers: no --rs_threshold needed
              f"--rs_probe={BUCKET}/models/rs_probe.json",
              f"--decontam=aid={BUCKET}/bench/AID",
              f"--fmow={BUCKET}/fmow", f"--bigearthnet={BUCKET}/bigearthnet",
              f"--millionaid={BUCKET}/millionaid", f"--local={BUCKET}/mine",
              f"--captioner={BUCKET}/models/blip2"],
             {"Caption", "RotationPick", "RSFilter", "Embed"}),
    "local": ([f"--local={BUCKET}/mine"], {"Embed"}),
    # every dataset's format named: nothing to detect; caption sets' decontamination below
    "remoteclip": ([f"--annotations=dota=dota:{BUCKET}/dota",
                    f"--annotations=loveda=mask_index:{BUCKET}/loveda",
                    f"--annotations=rsicd=karpathy:{BUCKET}/rsicd",
                    f"--holdout={BUCKET}/remotecount/manifest.json",
                    "--decontam_caption_sets=false"], {"Embed"}),
    "skyscript": ([f"--osm={BUCKET}/osm/*.osm.pbf", f"--imagery={BUCKET}/imagery/*/*.tif"],
                  {"Embed"}),
}


def _refuse_the_bucket(monkeypatch) -> None:
    from apache_beam.io.gcp import gcsfilesystem

    def refuse(*a, **k):
        raise AssertionError(f"the launcher touched the bucket: {a[1:]}")

    for name in ("match", "open", "create", "exists", "delete", "size", "checksum",
                 "last_updated", "metadata", "rename", "copy"):
        monkeypatch.setattr(gcsfilesystem.GCSFileSystem, name, refuse)


def _dry_run(monkeypatch, recipe: str, args: list[str]):
    """``recipe``'s DataflowRunner dry run: (transform names, the pipeline proto)."""
    from pipelines.recipes import kit

    built = {}
    compose = kit.compose

    def keep(p, *a, **k):
        built["p"] = p
        return compose(p, *a, **k)

    monkeypatch.setattr(kit, "compose", keep)
    module = importlib.import_module(f"pipelines.recipes.{recipe}")
    names = module.run([*DATAFLOW_DRY, f"--output={BUCKET}/out/{recipe}", *args])
    return names, built["p"].to_runner_api()


def _check_accelerator_on_model_stages(proto, models: set[str]) -> None:
    """The ``--accelerator`` hint on exactly the model stages (kit.MODEL_STAGES): every
    hinted transform lies inside one, each model stage's RunInference carries it, and no
    other transform does."""
    from local_builds import accelerator_split

    from pipelines.recipes import kit

    hinted, plain = accelerator_split(proto, ACCELERATOR)

    def stage_of(name: str) -> str | None:
        return next((m for m in kit.MODEL_STAGES
                     if re.search(rf"(^|/){re.escape(m)}\[", name)), None)

    assert {stage_of(n) for n in hinted} == models, sorted(hinted)
    for m in models:
        assert any(stage_of(n) == m and "RunInference" in n for n in hinted), m
    assert not any(stage_of(n) for n in plain), sorted(n for n in plain if stage_of(n))
    assert any("Read[" in n for n in plain) and any("Tail/Write" in n for n in plain)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(GS_BUILDS))
def test_every_recipe_translates_for_dataflow_without_touching_the_bucket(monkeypatch,
                                                                          recipe):
    """gs:// inputs (every source of the recipe), weights, manifest and output: the launcher
    builds the job without listing or reading the bucket (the workers do), and only the
    model stages ask for the accelerator."""
    _refuse_the_bucket(monkeypatch)
    args, models = GS_BUILDS[recipe]
    names, proto = _dry_run(monkeypatch, recipe, args)
    _check_accelerator_on_model_stages(proto, models)
    if recipe == "rs5m":  # every source is in the job, matched or listed inside it
        for read in ("Read[pub11]/Match", "Read[rs3]/Fmow/", "Read[rs3]/BigEarthNet/",
                     "Read[rs3]/MillionAID/", "Read[local]/Rows"):
            assert any(read in n for n in names), read


@pytest.mark.slow
def test_remoteclip_caption_set_decontamination_lists_nothing_on_the_launcher(monkeypatch):
    """A caption set whose JSON is named (``rsicd=karpathy:ROOT/file.json``) is handed to
    decontamination as that JSON's test and val splits without listing the set, and the
    decontamination stage lists its benchmarks on the workers."""
    _refuse_the_bucket(monkeypatch)
    names, proto = _dry_run(monkeypatch, "remoteclip", [
        f"--annotations=dota=dota:{BUCKET}/dota",
        f"--annotations=rsicd=karpathy:{BUCKET}/rsicd/dataset_rsicd.json"])
    assert any("BenchmarkImages" in n for n in names)
    _check_accelerator_on_model_stages(proto, {"Embed"})
