"""The committed jobs are what an operator submits as-is: they must parse, name importable and allowed
classes, carry a valid recipe, and agree with each other on it. The recipe's defaults are the shipped
recipe (``config.TrainingRecipe``), so a job carries only what it changes."""

import importlib
import json
from pathlib import Path

import pytest
from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

from hospital_fedlora.config import TrainingRecipe, parse_recipe
from hospital_fedlora.deploy.kits import PACKAGE_ALLOW_PREFIX

REPO = Path(__file__).resolve().parents[1]
JOBS = sorted(p.parent for p in (REPO / "jobs").glob("*/meta.json"))


def class_paths(node):
    if isinstance(node, dict):
        if isinstance(node.get("path"), str):
            yield node["path"]
        for v in node.values():
            yield from class_paths(v)
    elif isinstance(node, list):
        for v in node:
            yield from class_paths(v)


def configs(job: Path):
    return [json.loads(p.read_text()) for p in sorted((job / "app" / "config").glob("config_fed_*.json"))]


def recipe_of(job: Path) -> dict:
    client = json.loads((job / "app/config/config_fed_client.json").read_text())
    return client["executors"][0]["executor"]["args"]["recipe"]


def test_there_are_jobs():
    assert REPO / "jobs" / "fedlora_plain" in JOBS


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_job_classes_import_and_are_allow_listed(job):
    meta = json.loads((job / "meta.json").read_text())
    assert meta["name"] == job.name
    for path in {p for cfg in configs(job) for p in class_paths(cfg)}:
        module, _, cls = path.rpartition(".")
        assert hasattr(importlib.import_module(module), cls), path
        assert path.startswith(PACKAGE_ALLOW_PREFIX) or path in DEFAULT_CLASS_ALLOW_LIST, path


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_job_recipe_is_valid(job):
    parse_recipe(recipe_of(job))


def test_all_jobs_train_with_the_same_recipe():
    """Plaintext and encrypted runs are compared side by side; they must differ only in privacy."""
    recipes = {job.name: recipe_of(job) for job in JOBS}
    first = next(iter(recipes.values()))
    assert all(r == first for r in recipes.values()), recipes


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_a_job_recipe_names_only_what_differs_from_the_shipped_recipe(job):
    defaults = TrainingRecipe().model_dump(mode="json")
    for key, value in recipe_of(job).items():
        assert defaults.get(key) != value, f"{job.name}: recipe field {key!r} repeats the default"


def workflow_args(job: Path, path: str) -> dict:
    server = json.loads((job / "app/config/config_fed_server.json").read_text())
    return next(w["args"] for w in server["workflows"] if w["path"] == path)


@pytest.mark.parametrize("job", [REPO / "jobs" / "fedlora_he", REPO / "jobs" / "fedlora_plain"], ids=lambda p: p.name)
def test_a_job_has_one_minimum_and_bounded_waits(job):
    """One absent hospital must neither stall the federation nor end it: the round's minimum is set once."""
    args = workflow_args(job, "hospital_fedlora.server.rounds_workflow.RoundsWorkflow")
    meta = json.loads((job / "meta.json").read_text())
    assert meta["min_clients"] == args["min_clients"] >= 2  # FLARE ends a job whose live sites fall below meta's
    assert args["train_timeout"] > 0 and args["wait_time_after_min_received"] > 0
    assert args["ignore_result_error"] is None  # a failed site is dropped from the round while the minimum holds
    assert 0 < workflow_args(job, "nvflare.app_common.workflows.global_model_eval.GlobalModelEval")["validation_timeout"] <= 3600
    server = json.loads((job / "app/config/config_fed_server.json").read_text())
    aggregator = next(c for c in server["components"] if c["id"] == "aggregator")
    assert "min_contributions" not in aggregator["args"]  # the workflow gives the aggregator its minimum


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.name)
def test_a_job_fits_any_consortium_of_two_or_more_hospitals(job):
    """No job names or counts the hospitals: adding or removing one needs no job edit (docs/admin.md)."""
    server = json.loads((job / "app/config/config_fed_server.json").read_text())
    args = next(w["args"] for w in server["workflows"] if "min_clients" in w["args"])
    meta = json.loads((job / "meta.json").read_text())
    assert meta["min_clients"] == args["min_clients"] == 2 and meta["deploy_map"] == {"app": ["@ALL"]}
    assert args["wait_time_after_min_received"] > 0 and args["train_timeout"] > 0  # the rest are waited for, boundedly
    text = "".join(p.read_text() for p in (job / "app" / "config").glob("*.json"))
    assert "hospital-" not in text
