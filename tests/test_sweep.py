"""``modulora sweep``: real Ray Tune sweeps of the shared model at tiny settings, a killed worker, a
killed driver, racing trials, every recipe setting carried into the trials, and one-line errors for bad sweeps."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from cluster.sweep import pareto_front
from cluster.sweep.trial import KILL_FIRST_TRIAL
from conftest import GGUF_MODEL, TRAIN_TXT, VALID_TXT, modulora
from engine.model import read_manifest as load_manifest
from engine.options import as_plain

pytestmark = pytest.mark.slow  # Ray clusters and subprocesses

TINY: dict[str, Any] = {  # a recipe whose cluster.sweep grid is rtn x {3, 4} bits x ranks {2, 4}
    "model": {"path": str(GGUF_MODEL)},
    "quantize": {"method": "rtn", "group_size": 32},
    "finetune": {"data": {"file": str(TRAIN_TXT), "seq_len": 64, "limit": 16},
                 "train": {"steps": 3, "batch_size": 4, "warmup_steps": 0, "save_every": 0}},
    "evaluate": {"tasks": [{"file": str(VALID_TXT), "format": "text", "seq_len": 128, "limit": 8}]},
    "cluster": {"sweep": {"grid": {"method": ["rtn"], "bits": [3, 4], "group_size": [32], "rank": [2, 4],
                                   "lr": [3.0e-3]},
                          "cpus_per_trial": 1, "max_failures": 2}},
}


GRID = TINY["cluster"]["sweep"]["grid"]
DYNAMIC3 = {"dynamic": True, "rank_max": 3}


def write_config(path: Path, **changes: Any) -> Path:
    """TINY with ``section__key=value`` changes (``sweep__grid`` for ``cluster.sweep.grid``)."""
    recipe = copy.deepcopy(TINY)
    for dotted, value in changes.items():
        *parents, last = ["cluster", "sweep", *dotted.split("__")[1:]] if dotted.startswith("sweep__") else dotted.split("__")
        node = recipe
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path.write_text(yaml.safe_dump(recipe))
    return path


def sweep_spec(config: Path, out: Path) -> Any:
    from recipes.load import load_recipe
    from recipes.specs import sweep_spec as make

    return make(load_recipe(config), out)


def rows(out_dir: Path) -> list[dict[str, Any]]:
    return pq.read_table(out_dir / "results.parquet").to_pylist()


def attempts(out_dir: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in (out_dir / "attempts.jsonl").read_text().splitlines():
        point = json.loads(line)["point"]
        counts[point] = counts.get(point, 0) + 1
    return counts


def reuse_quantized(tiny_sweep: Path, out_dir: Path) -> None:
    """Start ``out_dir`` with the tiny sweep's cached quantized models (the cache is meant to be shared
    this way), so a test does not spend a quantizing process on them again."""
    shutil.copytree(tiny_sweep / "quantized", out_dir / "quantized")


def by_point(table: list[dict[str, Any]]) -> dict[tuple, dict[str, Any]]:
    return {(r["method"], r["bits"], r["group_size"], r["rank"], r["lr"]): r for r in table}


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory) -> Path:
    """rtn x {3, 4} bits x ranks {2, 4}: four trials, two at a time."""
    work = tmp_path_factory.mktemp("sweep")
    assert modulora("sweep", write_config(work / "tiny.yaml"), "--out", work / "out") == 0
    return work / "out"


def test_tiny_sweep_writes_results_and_plot(tiny_sweep):
    out = tiny_sweep
    table = rows(out)
    assert [(r["bits"], r["rank"]) for r in table] == [(3, 2), (3, 4), (4, 2), (4, 4)]
    assert all(r["status"] == "ok" and r["attempt"] == 1 for r in table)
    assert all(math.isfinite(r["metric"]) and r["metric"] > 1 for r in table)
    assert all(r["peak_rss_mib"] > 0 and r["wall_s"] > 0 for r in table)
    bits_per_weight = {bits: [r["bits_per_weight"] for r in table if r["bits"] == bits] for bits in (3, 4)}
    assert min(bits_per_weight[4]) > max(bits_per_weight[3])
    assert pq.read_schema(out / "results.parquet").metadata[b"metric"] == b"eval_ppl"
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cached = sorted(p.name for p in (out / "quantized").iterdir() if p.is_dir())
    assert cached == ["rtn-3bit-g32", "rtn-4bit-g32"]  # one per bit width, shared by both ranks
    assert set(attempts(out).values()) == {1}
    assert len([p for p in (out / "runs").iterdir() if p.is_dir()]) == 4  # one finetune run per point
    spec = sweep_spec(out.parent / "tiny.yaml", out)
    for point in spec.points():  # each trial trained with exactly the specs the driver made for it
        trial = spec.trial(point)
        report = json.loads((Path(trial.finetune.out) / "report.json").read_text())
        assert report["spec"] == as_plain(trial.finetune)
        assert load_manifest(trial.quantize.out)["quantizer"] == trial.quantize.quantizer().describe()


def test_killed_worker_is_retried_with_the_same_results(tmp_path, tiny_sweep, monkeypatch):
    """The first trial's worker SIGKILLs itself after finetuning, on its first attempt: FailureConfig runs
    the trial again, and every metric equals the undisturbed sweep's (everything is seeded)."""
    config = write_config(tmp_path / "kill.yaml", sweep__grid={**GRID, "rank": [2]})
    reuse_quantized(tiny_sweep, tmp_path / "out")
    monkeypatch.setenv(KILL_FIRST_TRIAL, "1")  # read by the trial, in the Ray workers this driver starts
    code = modulora("sweep", config, "--out", tmp_path / "out")
    assert code == 0
    assert attempts(tmp_path / "out") == {"rtn-3bit-g32-r2-lr0.003": 2, "rtn-4bit-g32-r2-lr0.003": 1}
    killed, undisturbed = by_point(rows(tmp_path / "out")), by_point(rows(tiny_sweep))
    assert [r["attempt"] for r in killed.values()] == [2, 1]
    for key, row in killed.items():
        assert row["status"] == "ok"
        assert row["metric"] == undisturbed[key]["metric"]
        assert row["bits_per_weight"] == undisturbed[key]["bits_per_weight"]


LISTENING = """
import json, psutil, ray
from cluster.runtime import ray_session
with ray_session():
    ray.get(ray.remote(lambda: 1).remote())
    me = psutil.Process()
    found = set()
    for process in [me, *me.children(recursive=True)]:
        try:
            found |= {c.laddr.ip for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            pass
print(json.dumps(sorted(found)))
"""


def test_local_ray_listens_on_loopback_only():
    """The embedded Ray (GCS, raylet, workers) started without an address: every listening socket of the
    driver and its descendants is on loopback.  A fresh interpreter, since ray reads its settings on import."""
    done = subprocess.run([sys.executable, "-c", LISTENING], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_ADDRESS": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    addresses = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert addresses and addresses <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}


def _recorded_points(out: Path) -> set[str]:
    """Points with a finished-trial record (cluster.sweep.records)."""
    return {path.stem for path in (out / "trial-results").glob("*.json")}


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(tmp_path, tiny_sweep):
    """The driver is SIGKILLed once a trial has recorded its result; ``--resume`` runs only the others."""
    # One trial at a time, so when the driver dies one trial is finished and the other is not.
    config = write_config(tmp_path / "resume.yaml", sweep__grid={**GRID, "rank": [2]},
                          sweep__cpus_per_trial=os.cpu_count())
    out = tmp_path / "out"
    reuse_quantized(tiny_sweep, out)
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "engine.cli", "sweep", str(config), "--out", str(out)],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (finished := _recorded_points(out)):
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray processes it started
        driver.wait()
    assert not (out / "results.parquet").exists()
    before = attempts(out)
    assert len(finished) == 1

    code = modulora("sweep", config, "--out", out, "--resume")
    assert code == 0
    table = rows(out)
    assert [r["bits"] for r in table] == [3, 4] and all(r["status"] == "ok" for r in table)
    after = attempts(out)
    assert set(after) == {f"rtn-{b}bit-g32-r2-lr0.003" for b in (3, 4)}
    for point in finished:
        assert before[point] == after[point] == 1


class _Planted:
    """Unpickling this makes the directory ``path``: proof that a planted pickle ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return os.mkdir, (str(self.path),)


def test_continued_sweep_never_unpickles_and_reruns_a_tampered_record(tmp_path, tiny_sweep, capsys):
    """Pickles planted where Ray Tune keeps its experiment (``tuner.pkl``, ``params.pkl``) are never loaded when
    the sweep is continued; a record whose metric was edited fails its checksum, and that point runs again
    (to the same metric: everything is seeded)."""
    import pickle

    config = write_config(tmp_path / "planted.yaml", sweep__grid={**GRID, "rank": [2], "bits": [3]})
    out = tmp_path / "out"
    reuse_quantized(tiny_sweep, out)
    assert modulora("sweep", config, "--out", out) == 0
    (original,) = rows(out)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Planted(marker))
    for place in [out / "trials" / "tuner.pkl", *(out / "trials").rglob("*.pkl"),
                  *[d / "params.pkl" for d in (out / "trials").rglob("*") if d.is_dir()]]:
        place.write_bytes(payload)
    (record,) = (out / "trial-results").glob("*.json")
    edited = json.loads(record.read_text())
    edited["metrics"]["eval_ppl"] = 1.0
    record.write_text(json.dumps(edited))
    shutil.rmtree(out / "runs")  # the point trains again from the start
    capsys.readouterr()

    assert modulora("sweep", config, "--out", out, "--resume") == 0
    assert "not a valid trial record" in capsys.readouterr().err
    assert not marker.exists()
    (again,) = rows(out)
    assert again["status"] == "ok" and again["attempt"] == 2 and again["metric"] == original["metric"]
    assert attempts(out) == {"rtn-3bit-g32-r2-lr0.003": 2}
    assert sorted(p.name for p in (out / "trials").iterdir() if p.is_dir()) == ["run-1", "run-2"]


def test_racing_trials_quantize_a_shared_model_once(tmp_path, monkeypatch):
    from cluster.sweep import Point, trial as trial_module
    from engine.model import load_model

    spec = sweep_spec(write_config(tmp_path / "race.yaml"), tmp_path)
    real_quantize, calls = trial_module.quantize, []

    def slow_quantize(*args: Any) -> Any:
        calls.append(args)
        time.sleep(0.5)  # a wide window for the other trial to look at a half-written cache entry
        return real_quantize(*args)

    monkeypatch.setattr(trial_module, "quantize", slow_quantize)
    quantize_spec = spec.trial(Point("rtn", 3, 32, 2, 3e-3)).quantize
    results: list[Path] = []

    def trial() -> None:
        trial_module.ensure_quantized(quantize_spec)
        results.append(Path(quantize_spec.out))

    threads = [threading.Thread(target=trial) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and results == [tmp_path / "quantized" / "rtn-3bit-g32"] * 2
    _, _, manifest = load_model(results[0])  # complete: its files match their checksums
    assert manifest["quantizer"]["bits"] == 3


def test_dynamic_sweep_points(tmp_path):
    """QDyLoRA: one point per rank 1..rank_max unless grid.rank picks some."""
    grid = {k: v for k, v in GRID.items() if k != "rank"}
    spec = sweep_spec(write_config(tmp_path / "dyn.yaml", sweep__grid=grid, finetune__lora=DYNAMIC3), tmp_path)
    assert spec.finetune.lora.rank_max == 3
    points = spec.points()
    assert sorted({p.rank for p in points}) == [1, 2, 3] and len(points) == 6


def test_dynamic_sweep_trains_once_and_evaluates_every_rank(tmp_path, tiny_sweep):
    grid = {**{k: v for k, v in GRID.items() if k != "rank"}, "bits": [3]}
    config = write_config(tmp_path / "dyn.yaml", sweep__grid=grid, finetune__lora={"dynamic": True, "rank_max": 2})
    reuse_quantized(tiny_sweep, tmp_path / "out")
    assert modulora("sweep", config, "--out", tmp_path / "out") == 0
    table = rows(tmp_path / "out")
    assert [r["rank"] for r in table] == [1, 2] and all(r["status"] == "ok" for r in table)
    assert table[0]["metric"] != table[1]["metric"]  # the same run, cut to different ranks
    runs = [p.name for p in (tmp_path / "out" / "dynamic").iterdir() if p.is_dir()]
    assert runs == ["rtn-3bit-g32-lr0.003-rmax2"]


def test_pareto_front():
    costs = [(3.0, 10.0), (4.0, 8.0), (4.0, 9.0), (5.0, 8.0), (2.0, 20.0)]
    assert pareto_front(costs) == [True, True, False, False, True]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"sweep__epochs": 3}, "cluster.sweep.epochs: unknown key; allowed: grid, metric"),
        ({"sweep__grid": {**GRID, "bitz": [3]}}, "cluster.sweep.grid.bitz: unknown key; did you mean 'bits'?"),
        ({"finetune__train": {"steps": 3, "stepz": 1}}, "finetune.train.stepz: unknown key; did you mean 'steps'?"),
        ({"sweep__grid": {**GRID, "bits": [3, 5]}}, "cluster.sweep.grid.bits[1]: expected one of 2, 3, 4, 8, got 5"),
        ({"sweep__grid": {**GRID, "rank": []}}, "cluster.sweep.grid.rank: empty list"),
        ({"sweep__grid": {**GRID, "method": ["optq"]}},
         "cluster.sweep.grid.method: 'optq' needs calibration data: add quantize.calib"),
        ({"sweep__grid": {**GRID, "method": ["quip"], "bits": [8]},
          "quantize": {"method": "rtn", "calib": None}}, "cluster.sweep.grid.method: 'quip' needs calibration data"),
        ({"finetune__lora": {"dynamic": True, "rank_max": 2}},
         "cluster.sweep.grid.rank: 4 is above finetune.lora.rank_max 2"),
        ({"quantize": {"method": "rtn", "act_order": True}}, "quantize.act_order: method 'rtn' does not take it"),
        ({"quantize": {"method": "optq", "act_order": False, "calib": {"file": str(TRAIN_TXT)}},
          "sweep__grid": {**GRID, "method": ["rtn"]}}, "quantize.act_order: no method of the sweep takes it (rtn)"),
        ({"offload": {"tier": "host"}}, "cluster.sweep: trials run without offload"),
    ],
)
def test_bad_sweep_is_one_line_and_exit_code_2(tmp_path, capsys, changes, message):
    code = modulora("sweep", write_config(tmp_path / "bad.yaml", **changes), "--out", tmp_path / "out")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert err.startswith("modulora: error: ") and message in err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_resume_needs_a_sweep(tmp_path, capsys):
    code = modulora("sweep", write_config(tmp_path / "c.yaml"), "--out", tmp_path / "none", "--resume")
    assert code == 2 and "no sweep to resume" in capsys.readouterr().err
