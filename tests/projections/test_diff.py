"""diff A B on real runs: a two-trial learning-rate sweep, a rerun, and a run on another
prompt set, all trained by the runner on the session's local service."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner

from firetitan_track import Ledger
from runner.cli import main
from tests.helpers import small_spec

LRS = (1e-3, 3e-3)


@pytest.fixture(scope="module")
def runs(local_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """lr-t0 / lr-t1: the trials of an LR sweep; again: a rerun of lr-t0; other-prompts:
    lr-t0's spec on an eval set with two answers changed."""
    tmp = tmp_path_factory.mktemp("diff")
    url = f"sqlite:///{tmp / 'ledger.db'}"
    spec = small_spec(tmp, local_url, name="diff", run={"steps": 2})
    _run(url, "sweep", str(spec), "--grid", f"optim.learning_rate={LRS[0]},{LRS[1]}", "--sweep-id", "lr",
         "--no-mlflow", "--quiet")
    _run(url, "rerun", "lr-t0", "--run-id", "again", "--quiet")

    with Ledger.open(url) as ledger:
        started = ledger.read("lr-t0")[0].data
        eval_digest = started["prompt_sets"]["eval"]
        examples = ledger.get_json(eval_digest)
    for i in (1, 4):  # two examples with another answer
        examples[i] = {**examples[i], "answer": examples[i]["answer"] + "0"}
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(e) + "\n" for e in examples))
    other = small_spec(tmp, local_url, name="diff", run={"steps": 2}, eval={"prompts": str(prompts), "count": 0})
    # lr-t0's spec in all but its eval set
    _run(url, "run", str(other), "--run-id", "other-prompts", "--quiet",
         "--set", f"model.deployment_id={started['spec']['model']['deployment_id']}",
         "--set", f"optim.learning_rate={LRS[0]}")
    return {"url": url, "eval_digest": eval_digest, "examples": len(examples)}


def _run(url: str, *args: str) -> None:
    result = CliRunner().invoke(main, ["--ledger", url, *args])
    assert result.exit_code == 0, result.output


def _diff(url: str, *args: str) -> Any:
    return CliRunner().invoke(main, ["--ledger", url, "diff", *args])


def _json(url: str, a: str, b: str) -> dict[str, Any]:
    result = _diff(url, a, b, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_a_run_and_its_rerun_diff_to_nothing(runs: dict[str, Any]) -> None:
    d = _json(runs["url"], "lr-t0", "again")
    assert d["identical"] is True
    assert d["spec"] == {} and d["first_divergent_step"] is None and d["divergence"] == {}
    assert d["code"]["same"] is True and d["code"]["differences"] == {}
    assert d["code"]["a"]["recorded"] and d["code"]["a"]["commit"] == d["code"]["b"]["commit"]
    assert d["prompt_sets"]["eval"]["same"] is True and d["prompt_sets"]["eval"]["differing_examples"] == 0
    assert [s["step"] for s in d["scores"]] == [0, 2]
    assert all(s["gap"] == 0 for s in d["scores"])
    text = _diff(runs["url"], "lr-t0", "again").output
    assert "do not differ" in text and len(text.splitlines()) == 1


def test_two_trials_of_an_lr_sweep_name_the_learning_rate_and_step_1(runs: dict[str, Any]) -> None:
    d = _json(runs["url"], "lr-t0", "lr-t1")
    assert d["identical"] is False
    assert d["spec"]["optim.learning_rate"] == {"a": LRS[0], "b": LRS[1]}
    assert d["first_divergent_step"] == 1
    # the first step trains the same data from the same weights: only the optimizer differs
    assert d["divergence"] == {"optimizer.learning_rate": {"a": LRS[0], "b": LRS[1]}}
    assert d["prompt_sets"]["eval"]["same"] is True
    ledger = Ledger.open(runs["url"])
    scores = {rid: {ev.data["step"]: ev.data["score"] for ev in ledger.read(rid) if ev.type == "EvalScored"}
              for rid in ("lr-t0", "lr-t1")}
    ledger.close()
    assert d["scores"] == [{"step": s, "a": scores["lr-t0"][s], "b": scores["lr-t1"][s],
                            "gap": scores["lr-t1"][s] - scores["lr-t0"][s]} for s in sorted(scores["lr-t0"])]


def test_the_report_without_json_is_a_few_lines_naming_what_differs(runs: dict[str, Any]) -> None:
    result = _diff(runs["url"], "lr-t0", "lr-t1")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) <= 10, result.output
    assert any("optim.learning_rate" in line and "0.001 -> 0.003" in line for line in lines), result.output
    assert any(line.startswith("training") and "step 1" in line for line in lines), result.output


def test_another_eval_set_shows_its_digests_and_the_examples_that_differ(runs: dict[str, Any]) -> None:
    d = _json(runs["url"], "lr-t0", "other-prompts")
    ps = d["prompt_sets"]["eval"]
    assert ps["same"] is False and ps["a"] == runs["eval_digest"] and ps["b"] != runs["eval_digest"]
    assert (ps["examples_a"], ps["examples_b"], ps["differing_examples"]) == (runs["examples"], runs["examples"], 2)
    assert set(d["spec"]) == {"eval.count", "eval.prompts"}
    assert d["first_divergent_step"] is None  # same training data and settings: only the evals differ


def test_an_unknown_run_is_an_error_naming_it(runs: dict[str, Any]) -> None:
    result = _diff(runs["url"], "lr-t0", "no-such-run")
    assert result.exit_code == 1
    assert "no-such-run" in result.output
    result = _diff(runs["url"], "sweep:lr", "lr-t0")
    assert result.exit_code == 1 and "not a training run" in result.output
