"""Several training processes at one site (``data_parallel``): real worker processes, gloo on CPU, 2 ranks,
the tiny base model. Two ranks train exactly what one process trains; workers never outlive their parent."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hospital_fedlora.config import ConfigError, LoraSettings, TrainingRecipe, load_site_config
from hospital_fedlora.site.data_parallel import DataParallelGroup, training_processes
from hospital_fedlora.site.lora_variants import truncate_rank
from hospital_fedlora.site.model_loading import Placement
from hospital_fedlora.site.trainer import get_adapter_state, set_adapter_state, subtract
from hospital_fedlora.site.trainer_setup import build_trainer, site_placement

# No dropout: ranks draw other dropout masks than one process would, so only then can the runs agree.
# batch 8, micro-batch 2: each rank takes 4 examples (2 micro-batches) of every step.
RECIPE = TrainingRecipe(lora=LoraSettings(dropout=0.0), batch_size=8, max_seq_length=128, learning_rate=1e-3)
STEPS = 3
# Float sums in another order (two ranks' partial gradients, then the all-reduce): measured max |difference|
# 3.6e-8 on differences up to 3e-3 after 3 steps.
ATOL = 1e-6
# Adam hardly sees a gradient's scale (a mean instead of a sum would pass the check above), so the gradients
# that reach the optimizer are compared too, relative to their own size.
GRAD_RTOL = 1e-4


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def site_config(tmp_path: Path, base_model_dir: Path, data_dir: Path, data_parallel="2") -> Path:
    path = tmp_path / "hospital-a.yaml"
    path.write_text(textwrap.dedent(f"""\
        site: hospital-a
        base_model_path: {base_model_dir}
        data:
          train: {data_dir / 'hospital-a' / 'train.jsonl'}
          validation: {data_dir / 'hospital-a' / 'validation.jsonl'}
        device: cpu
        micro_batch_size: 2
        num_threads: 1
        data_parallel: {data_parallel}
        """))
    return path


def _recording(sync=None):
    """A gradient_sync that records the gradients the optimizer will step with (after ``sync``, if any)."""
    seen = []

    def record(params, loss_sum, tokens):
        if sync is not None:
            loss_sum, tokens = sync(params, loss_sum, tokens)
        seen.append([p.grad.detach().clone() for p in params])
        return loss_sum, tokens

    return record, seen


def _moved(state: dict) -> dict:
    # A global adapter other than the seeded initial one (B != 0): the workers hold the initial one, so the
    # runs agree only if rank 0 broadcasts its adapter at the start of the round.
    rng = np.random.default_rng(1)
    return {k: v + rng.normal(0, 0.01, v.shape).astype(np.float32) for k, v in state.items()}


def test_two_ranks_train_the_same_difference_as_one_process(tmp_path, base_model_dir, data_dir):
    path = site_config(tmp_path, base_model_dir, data_dir)
    site = load_site_config(path, expected_site="hospital-a")
    placement = site_placement(site, str(path))
    assert training_processes(site.data_parallel, placement, str(path)) == 2

    group = DataParallelGroup(site, RECIPE, str(path), 2, placement)
    try:
        ranked = build_trainer(site, RECIPE, str(path), site_placement(site, str(path), rank=0))
        group.attach(ranked)
        ranked.gradient_sync, two_grads = _recording(ranked.gradient_sync)
        start = _moved(get_adapter_state(ranked.model))
        set_adapter_state(ranked.model, start)
        reports = []
        two = group.train(STEPS, reports.append, round=1)
        two_diff = subtract(get_adapter_state(ranked.model), start)
        workers = list(group.workers)
    finally:
        group.stop()
    assert all(not w.is_alive() and w.exitcode == 0 for w in workers)  # normal stop: every worker exited

    single = build_trainer(site, RECIPE, str(path), placement)
    set_adapter_state(single.model, start)
    single.gradient_sync, one_grads = _recording()
    one = single.train(STEPS, round=1)
    one_diff = subtract(get_adapter_state(single.model), start)

    assert max(float(np.abs(v).max()) for v in one_diff.values()) > 1e-4  # it trained
    assert len(two_grads) == len(one_grads) == STEPS
    for two_step, one_step in zip(two_grads, one_grads):
        for g2, g1 in zip(two_step, one_step):
            assert torch.allclose(g2, g1, rtol=0, atol=GRAD_RTOL * float(g1.abs().max()))
    for k in one_diff:
        assert torch.allclose(torch.from_numpy(two_diff[k]), torch.from_numpy(one_diff[k]), rtol=0, atol=ATOL), k
    # Tokens and loss count both ranks' examples.
    assert two.tokens == one.tokens
    assert two.mean_loss == pytest.approx(one.mean_loss, rel=1e-5)
    assert [r.step for r in reports] == [1, 2, 3]


def test_frozen_and_truncated_lora_tensors_reach_the_workers(tmp_path, base_model_dir, data_dir):
    """FFA-LoRA's frozen A, with rows zeroed by a site's lower rank on rank 0 only: the workers must train
    with rank 0's A, or their gradients would move B's padded columns."""
    recipe = RECIPE.model_copy(update={"lora": LoraSettings(dropout=0.0, variant="ffa")})
    path = site_config(tmp_path, base_model_dir, data_dir)
    site = load_site_config(path, expected_site="hospital-a")
    placement = site_placement(site, str(path))
    group = DataParallelGroup(site, recipe, str(path), 2, placement)
    try:
        ranked = build_trainer(site, recipe, str(path), site_placement(site, str(path), rank=0))
        group.attach(ranked)
        start = truncate_rank(_moved(get_adapter_state(ranked.model)), 3)
        set_adapter_state(ranked.model, start)
        group.train(STEPS, None, round=1)
        after = get_adapter_state(ranked.model)
    finally:
        group.stop()
    for k, v in after.items():
        assert not (v[3:] if ".lora_A." in k else v[:, 3:]).any(), k
        if ".lora_A." in k:
            np.testing.assert_array_equal(v, start[k])
    assert any(not np.array_equal(v, start[k]) for k, v in after.items())  # B trained


PARENT = """
import sys, time, torch
from hospital_fedlora.config import load_site_config, TrainingRecipe
from hospital_fedlora.site.data_parallel import DataParallelGroup
from hospital_fedlora.site.trainer_setup import build_trainer, site_placement
torch.set_num_threads(1)
path = sys.argv[1]
site = load_site_config(path)
recipe = TrainingRecipe(batch_size=8, max_seq_length=128)
placement = site_placement(site, path)
group = DataParallelGroup(site, recipe, path, 2, placement)
group.attach(build_trainer(site, recipe, path, placement))
print("worker", group.workers[0].pid, flush=True)
group.train(10_000, None, round=0)  # killed long before this ends: the worker is inside a round
"""


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie has exited; only its parent's reaping is left


def test_workers_exit_when_the_parent_is_killed(tmp_path, base_model_dir, data_dir):
    path = site_config(tmp_path, base_model_dir, data_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = parent.stdout.readline()
        assert line.startswith("worker "), line
        worker = int(line.split()[1])
        time.sleep(1.0)  # inside the round now
        assert not _gone(worker)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 15
        while not _gone(worker) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _gone(worker), f"worker {worker} outlived its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


@pytest.mark.parametrize("value", ["0", "-1", "two", "true", "1.5"])
def test_a_bad_data_parallel_value_names_the_file_and_the_field(tmp_path, base_model_dir, data_dir, value):
    path = site_config(tmp_path, base_model_dir, data_dir, data_parallel=value)
    with pytest.raises(ConfigError) as err:
        load_site_config(path)
    message = str(err.value)
    assert str(path) in message and "field 'data_parallel'" in message and "or 'all'" in message


def test_more_processes_than_visible_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cuda = Placement(torch.device("cuda"), torch.bfloat16, False)
    assert training_processes("all", cuda, "site.yaml") == 2
    assert training_processes(2, cuda, "site.yaml") == 2
    with pytest.raises(ConfigError, match=r"site\.yaml: field 'data_parallel' is 3 but only 2 CUDA GPU"):
        training_processes(3, cuda, "site.yaml")
    cpu = Placement(torch.device("cpu"), torch.float32, False)
    assert training_processes("all", cpu, "site.yaml") == 1  # no GPU: 'all' is this one process
    assert training_processes(2, cpu, "site.yaml") == 2  # gloo processes
