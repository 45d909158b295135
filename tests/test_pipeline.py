"""The whole retrain flow on the tiny profile, checked as a user would check it in MLflow."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from components.data.datasets import read_data_manifest

pytestmark = pytest.mark.slow
STAGES = ["sources", "data", "foundation", "experts", "decompose", "federated", "routing", "fusion", "evaluate",
          "promote"]
# the default tasks and RetinaMNIST (shipped; in the full profile): a new image task runs end to end from a clone
TASKS = ["pneumoniamnist", "breastmnist", "retinamnist", "pubmedqa", "medical_abstracts"]


def test_retrain_end_to_end(isolated_project: Path, tiny_bert: Path, prefect_server: str) -> None:
    from flows.retrain import retrain

    overrides = {"foundation.text.source": str(tiny_bert), "registry.floor": 0.0, "data.active": TASKS}
    results = retrain(profile="tiny", overrides=overrides)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("medexperts")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id], max_results=100)}
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # MLflow 3's UI: the model-training view

    parent = runs["retrain:tiny"]
    assert parent.data.tags["profile"] == "tiny"
    assert "git.commit" in parent.data.tags and "params_hash" in parent.data.tags
    for stage in STAGES:
        run = runs[f"stage:{stage}"]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags["skipped"] == "false"
    for task in TASKS:
        expert = runs[f"expert:{task}"]
        assert expert.data.tags["mlflow.parentRunId"] == runs["stage:experts"].info.run_id
        assert "val.macro_f1" in expert.data.metrics and "probe_val.macro_f1" in expert.data.metrics
        assert expert.data.metrics["train_peak_memory_mb"] >= 0

    # datasets: one input per task split, digest = content hash from the data manifest
    manifest = read_data_manifest(isolated_project / "artifacts" / "data")
    inputs = runs["stage:data"].inputs.dataset_inputs
    digests = {i.dataset.name: i.dataset.digest for i in inputs}
    assert digests["pubmedqa/test"] == manifest["tasks"]["pubmedqa"]["splits"]["test"]["sha256"][:36]
    assert len(digests) == 3 * len(TASKS)

    # plots and tables
    evaluate_files = {a.path for a in client.list_artifacts(runs["stage:evaluate"].info.run_id, "plots")}
    assert "plots/confusion_pubmedqa_fused.png" in evaluate_files
    assert "fusion_curve.png" in {a.path for a in client.list_artifacts(runs["stage:fusion"].info.run_id)}
    metrics = runs["stage:evaluate"].data.metrics
    assert 0.0 <= metrics["pubmedqa.metrics.expert.macro_f1"] <= 1.0
    assert metrics["pubmedqa.merge_max_abs_diff"] < 1e-4
    for task in TASKS:  # LoRKD: teacher, fused expert and single-task student scored on test, sizes recorded
        assert {f"{task}.metrics.{m}.macro_f1" for m in ("teacher", "lorkd", "single_student")} <= set(metrics)
        assert metrics[f"{task}.params.lorkd_deployed"] < metrics[f"{task}.params.teacher"]
    for task in ("pubmedqa", "medical_abstracts"):  # the text teacher is the deployed expert (decompose.teacher)
        assert metrics[f"{task}.metrics.teacher.macro_f1"] == metrics[f"{task}.metrics.expert.macro_f1"]
        assert metrics[f"{task}.params.teacher"] == metrics[f"{task}.params.deployed"]
    assert runs["stage:decompose"].data.tags["decompose.text.student_sha256"]

    # registry: every expert and the fused model, with aliases; the champion loads and predicts
    decisions = results["promote"]["decisions"]
    assert {d["model"] for d in decisions} == ({f"medexperts-{t}" for t in TASKS} | {"medexperts-fused-text"}
                                               | {f"medexperts-{t}-lorkd" for t in TASKS} | {"medexperts-routed-text"}
                                               | {"medexperts-fedkim"})
    for d in decisions:
        mv = client.get_model_version_by_alias(d["model"], "challenger")
        assert str(mv.version) == d["version"]
        assert mv.tags["fingerprint.data"] == runs["stage:data"].data.tags["fingerprint"]  # lineage chain
        assert "git.commit" in mv.tags
        assert d["promoted"]  # first version, floor 0
    model = mlflow.pyfunc.load_model("models:/medexperts-pubmedqa@champion")
    frame = model.predict(["Does aspirin reduce the risk of stroke?", "Is smoking protective?"])
    assert len(frame) == 2 and set(frame["label"]) <= {"yes", "no", "maybe"}
    mv = client.get_model_version_by_alias("medexperts-medical_abstracts-lorkd", "champion")
    assert 0 < int(mv.tags["parameters"]) < metrics["medical_abstracts.params.teacher"]  # size on the version
    lorkd = mlflow.pyfunc.load_model("models:/medexperts-medical_abstracts-lorkd@champion")
    assert len(lorkd.predict(["Colon adenocarcinoma with lymph node metastasis."])) == 1
    assert {"pubmedqa.metrics.routed.macro_f1", "medical_abstracts.metrics.routed.macro_f1"} <= set(metrics)
    assert {f"{t}.metrics.fedkim.macro_f1" for t in TASKS} <= set(metrics)  # FedKIM scored on test
    rounds = client.get_metric_history(runs["stage:federated"].info.run_id, "round.train_loss")
    assert [m.step for m in rounds] == [1]  # one step per federated round (the tiny profile runs one)
    routed = mlflow.pyfunc.load_model("models:/medexperts-routed-text@champion")
    frame = routed.predict(["Is smoking protective?"], params={"task": "pubmedqa"})
    assert frame["label"].iloc[0] in {"yes", "no", "maybe"}
    mv = client.get_model_version_by_alias("medexperts-fedkim", "champion")  # FedKIM lineage: rounds, clients, shards
    assert mv.tags["federated.rounds"] == "1" and mv.tags["federated.clients"].startswith("client_0")
    assert mv.tags["federated.shards.pubmedqa"] == manifest["files"]["pubmedqa/shards.json"]
    took_part = mv.tags["federated.clients"].split(",")  # and the rows each of them trained on
    assert all(len(mv.tags[f"federated.shard.{c}"]) == 64 for c in took_part)
    fedkim = mlflow.pyfunc.load_model("models:/medexperts-fedkim@champion")
    frame = fedkim.predict(["Is smoking protective?"], params={"task": "pubmedqa"})
    assert frame["label"].iloc[0] in {"yes", "no", "maybe"}
    import numpy as np

    images = np.random.default_rng(0).integers(0, 256, size=(2, 28, 28), dtype=np.uint8)
    assert len(fedkim.predict(images, params={"task": "breastmnist"})) == 2
    # the request may carry the modality (FedKIM's gate reads task and modality): its kind or its description
    named = fedkim.predict(images, params={"task": "breastmnist", "modality": "Breast ultrasound image"})
    assert named["label"].tolist() == fedkim.predict(images, params={"task": "breastmnist"})["label"].tolist()
    assert len(fedkim.predict(images, params={"task": "breastmnist", "modality": "image"})) == 2
    from components.core.errors import DataError

    with pytest.raises(DataError, match="modality 'chest X-ray image' is not the one task 'breastmnist'"):
        fedkim.predict(images, params={"task": "breastmnist", "modality": "chest X-ray image"})
    with pytest.raises(DataError, match="modality 'image' is not the one task 'pubmedqa'"):
        model.predict(["Is smoking protective?"], params={"modality": "image"})

    with pytest.raises(DataError, match="takes 28x28 grayscale"):  # the recorded training size, no silent nonsense
        fedkim.predict(np.zeros((2, 64, 64), np.uint8), params={"task": "breastmnist"})
    fused = mlflow.pyfunc.load_model("models:/medexperts-fused-text@champion")
    frame = fused.predict(["Colon adenocarcinoma with lymph node metastasis."], params={"task": "medical_abstracts"})
    assert frame["task"].iloc[0] == "medical_abstracts"

    # nothing changed -> every stage is skipped and nothing new is registered
    again = retrain(profile="tiny", overrides=overrides)
    runs2 = client.search_runs([exp.experiment_id], filter_string="tags.skipped = 'true'", max_results=100)
    assert len(runs2) == len(STAGES)
    assert again["promote"] == {**results["promote"], "cached": True} and results["promote"]["cached"] is False
    # the registry table of a skipped promote says so, and shows the champions as the registry holds them now
    from rich.console import Console

    from flows.report import registry_table

    mlflow.MlflowClient().set_registered_model_alias("medexperts-pubmedqa", "champion", "1")
    console = Console(record=True, width=400)
    console.print(registry_table(again["promote"]))
    text = console.export_text()
    assert "nothing registered by this run" in " ".join(text.split()) and "champion now" in text
    assert len(client.search_model_versions("name='medexperts-pubmedqa'")) == 1

    # both runs are on the project's Prefect server (not a temporary one): completed flow runs of `retrain`
    import asyncio

    from prefect.client.orchestration import get_client

    async def flow_runs() -> list[str]:
        async with get_client() as pc:
            assert str(pc.api_url).rstrip("/") == prefect_server.rstrip("/")
            return [r.state.type.value for r in await pc.read_flow_runs() if r.name and r.state]

    states = asyncio.run(flow_runs())
    assert states.count("COMPLETED") >= 2, states

    # a schedule that fires and shows up: `medexperts serve --interval` against the project's server; one scheduled
    # run (every stage skipped: same params) completes, in Prefect and in MLflow
    _one_scheduled_run(tiny_bert, prefect_server, TASKS)


def _one_scheduled_run(tiny_bert: Path, api: str, tasks: list[str]) -> None:
    import asyncio
    import os
    import signal
    import subprocess
    import sys
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    medexperts = str(Path(sys.executable).parent / "medexperts")
    cmd = [medexperts, "serve", "--interval", "5", "--name", "every5s", "--profile", "tiny",
           "--set", f"foundation.text.source={tiny_bert}", "--set", "registry.floor=0.0",
           "--set", f"data.active=[{', '.join(tasks)}]"]  # the retrain's own overrides: every stage is skipped
    serve = subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)

    async def completed() -> list:
        async with get_client() as pc:
            flt = DeploymentFilter(name=DeploymentFilterName(any_=["every5s"]))
            return [r for r in await pc.read_flow_runs(deployment_filter=flt)
                    if r.state is not None and r.state.type.value in ("COMPLETED", "FAILED", "CRASHED")]

    try:
        finished: list = []
        deadline = time.monotonic() + 900  # generous: a slow machine must not fail this, only a broken schedule
        while not finished and serve.poll() is None and time.monotonic() < deadline:
            time.sleep(3)
            finished = asyncio.run(completed())
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        try:
            out, _ = serve.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
            out, _ = serve.communicate()
    assert finished, f"no scheduled run finished; serve said:\n{out[-3000:]}"
    run = finished[0]
    assert run.state.type.value == "COMPLETED", f"{run.name}: {run.state}\n{out[-3000:]}"
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name("medexperts")
    scheduled = client.search_runs([exp.experiment_id], filter_string=f"tags.`prefect.flow_run_id` = '{run.id}'")
    assert len(scheduled) == 1 and scheduled[0].info.status == "FINISHED"
    assert scheduled[0].data.tags["prefect.deployment"] == "retrain/every5s"
    stages = client.search_runs([exp.experiment_id],
                                filter_string=f"tags.mlflow.parentRunId = '{scheduled[0].info.run_id}'")
    assert len(stages) == len(STAGES) and {r.data.tags["skipped"] for r in stages} == {"true"}
