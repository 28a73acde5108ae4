"""The spec and input files: every bad input names the file and the key or line, and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from firetitan_track import Ledger
from runner.loop import RunError, run_spec
from runner.spec import Spec, SpecError, load_spec, parse_overrides
from runner.tasks import DataError, eval_examples, load_jsonl, train_batch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def write(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_examples_parse():
    for path in EXAMPLES.glob("*.toml"):
        assert isinstance(load_spec(path), Spec)


def test_unknown_key_is_named(tmp_path):
    p = write(tmp_path, "[optim]\nlearnin_rate = 1e-3\n")
    with pytest.raises(SpecError, match=r"spec\.toml: unknown key optim\.learnin_rate"):
        load_spec(p)


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(SpecError, match=r"unknown section \[optimizer\]"):
        load_spec(write(tmp_path, "[optimizer]\nlr = 1\n"))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(SpecError, match=r"optim\.learning_rate: expected a number, got a string"):
        load_spec(write(tmp_path, '[optim]\nlearning_rate = "fast"\n'))
    with pytest.raises(SpecError, match=r"run\.steps: expected an integer, got a boolean"):
        load_spec(write(tmp_path, "[run]\nsteps = true\n"))
    with pytest.raises(SpecError, match=r"backend\.kind: must be one of 'local', 'fireworks'"):
        load_spec(write(tmp_path, '[backend]\nkind = "cloud"\n'))


def test_cleanup_policies_read_as_actions_and_record_as_the_strings_they_were(tmp_path):
    from firetitan_track.blobs import canonical_json
    from firetitan_track.events import CleanupAction, CleanupOutcome

    spec = load_spec(write(tmp_path, '[cleanup]\ntrainer = "keep"\ndeployment = "delete"\n'))
    assert spec.cleanup.trainer is CleanupAction.KEEP and spec.cleanup.deployment is CleanupAction.DELETE
    assert (spec.cleanup.trainer.outcome, spec.cleanup.deployment.outcome) == (CleanupOutcome.KEPT,
                                                                                CleanupOutcome.DELETED)
    # the recorded spec (and so its digest) holds the words the file did: a rerun reads it back the same
    recorded = json.loads(canonical_json(spec.to_dict()))
    assert recorded["cleanup"] == {"trainer": "keep", "deployment": "delete"}
    assert Spec.from_dict(recorded) == spec
    assert Spec().cleanup.deployment is CleanupAction.SCALE_TO_ZERO
    with pytest.raises(SpecError, match=r"cleanup\.trainer: must be one of 'delete', 'keep', got 'scale_to_zero'"):
        load_spec(write(tmp_path, '[cleanup]\ntrainer = "scale_to_zero"\n'))
    with pytest.raises(SpecError, match=r"cleanup\.deployment: must be one of 'scale_to_zero', 'delete', 'keep'"):
        spec.with_overrides({"cleanup.deployment": "scaled_to_zero"})


def test_bad_values_are_named(tmp_path):
    with pytest.raises(SpecError, match=r"run\.steps: must be at least 1"):
        load_spec(write(tmp_path, "[run]\nsteps = 0\n"))
    with pytest.raises(SpecError, match=r"task\.name: unknown built-in task 'sort'"):
        load_spec(write(tmp_path, '[task]\nname = "sort"\n'))


def test_missing_prompt_file_is_named(tmp_path):
    with pytest.raises(SpecError, match=r"eval\.prompts: no such file: .*nope\.jsonl"):
        load_spec(write(tmp_path, '[eval]\nprompts = "nope.jsonl"\n'))


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(SpecError, match="not valid TOML"):
        load_spec(write(tmp_path, "[run\n"))
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "absent.toml")


def test_overrides_are_typed_and_validated():
    spec = load_spec(EXAMPLES / "reverse_sft.toml")
    changed = spec.with_overrides(parse_overrides(["optim.learning_rate=1e-3", "run.steps=5"]))
    assert changed.optim.learning_rate == 1e-3 and changed.run.steps == 5
    assert changed.digest() != spec.digest()
    with pytest.raises(SpecError, match="unknown key optim.lr"):
        spec.with_overrides({"optim.lr": 1.0})


def test_malformed_jsonl_names_the_line(tmp_path):
    p = write(tmp_path, '{"prompt": "a", "answer": "b"}\n{"prompt": "a", "answer": \n', "prompts.jsonl")
    with pytest.raises(DataError, match=r"prompts\.jsonl:2: not valid JSON"):
        load_jsonl(p, what="prompt file")
    p = write(tmp_path, '{"prompt": "a", "answer": "b"}\n\n{"prompt": "a"}\n', "prompts.jsonl")
    with pytest.raises(DataError, match=r"prompts\.jsonl:3: missing string field 'answer'"):
        load_jsonl(p, what="prompt file")


def test_builtin_data_is_a_pure_function_of_seed_and_step():
    a, ca = train_batch("reverse", None, seed=3, step=7, size=8, digits=4)
    b, cb = train_batch("reverse", None, seed=3, step=7, size=8, digits=4)
    c, _ = train_batch("reverse", None, seed=3, step=8, size=8, digits=4)
    assert a == b and ca == cb and a != c
    assert all(ex.answer == ex.messages[0][1].split()[-1][::-1] for ex in a)
    held_out = {e.messages for e in eval_examples("reverse", seed=3, count=32, digits=4)}
    assert not held_out & {e.messages for e in a}


def test_jsonl_data_walks_epochs_deterministically(tmp_path):
    p = write(tmp_path, "".join(json.dumps({"prompt": str(i), "answer": str(i)}) + "\n" for i in range(5)), "d.jsonl")
    data = load_jsonl(p)
    seen = [ex.answer for step in (1, 2, 3, 4, 5) for ex in train_batch("x", data, seed=0, step=step, size=2, digits=1)[0]]
    assert sorted(seen[:5]) == sorted(seen[5:10]) == [str(i) for i in range(5)]  # each epoch covers the set once
    assert train_batch("x", data, seed=0, step=3, size=2, digits=1) == train_batch("x", data, seed=0, step=3, size=2, digits=1)


def test_fireworks_backend_without_api_key_fails_before_anything(tmp_path, monkeypatch):
    monkeypatch.delenv("FIREWORKS_API_KEY", raising=False)
    spec = load_spec(write(tmp_path, '[backend]\nkind = "fireworks"\n'))
    url = f"sqlite:///{tmp_path}/ledger.db"
    with pytest.raises(RunError, match="needs FIREWORKS_API_KEY"):
        run_spec(spec, ledger_url=url, run_id="r1", progress=False)
    assert Ledger.open(url).runs() == []


def test_malformed_prompt_file_fails_before_anything(tmp_path):
    write(tmp_path, '{"prompt": "1", "answer": "1"}\nnot json\n', "prompts.jsonl")
    spec = load_spec(write(tmp_path, '[eval]\nprompts = "prompts.jsonl"\n'))
    url = f"sqlite:///{tmp_path}/ledger.db"
    with pytest.raises(RunError, match=r"prompts\.jsonl:2: not valid JSON"):
        run_spec(spec, ledger_url=url, run_id="r1", progress=False)
    assert Ledger.open(url).runs() == []


@pytest.mark.parametrize("line, key", [
    ("[optim]\nlearning_rate = nan\n", "optim.learning_rate: must be a finite number"),
    ("[optim]\nlearning_rate = inf\n", "optim.learning_rate: must be a finite number"),
    ("[optim]\neps = -1.0\n", "optim.eps: must be positive"),
    ("[optim]\neps = 0\n", "optim.eps: must be positive"),
    ("[optim]\nbeta1 = 1.0\n", r"optim.beta1: must be in \[0, 1\)"),
    ("[optim]\nbeta2 = -0.1\n", r"optim.beta2: must be in \[0, 1\)"),
    ("[optim]\ngrad_clip_norm = -1.0\n", "optim.grad_clip_norm: must not be negative"),
    ("[optim]\nweight_decay = -0.5\n", "optim.weight_decay: must not be negative"),
    ("[recipe]\nkl_coef = -inf\n", "recipe.kl_coef: must be a finite number"),
    ("[sampling]\ntemperature = nan\n", "sampling.temperature: must be a finite number"),
    ("[eval]\ncount = 100000000\n", "eval.count: must be 0 .* to 10000, got 100000000"),
    ("[eval]\ncount = -1\n", "eval.count: must be 0"),
])
def test_values_no_run_can_use_are_refused_naming_the_key(tmp_path, line, key):
    with pytest.raises(SpecError, match=rf"spec\.toml: {key}"):
        load_spec(write(tmp_path, line))


def test_a_spec_that_is_not_utf8_is_named(tmp_path):
    p = tmp_path / "spec.toml"
    p.write_bytes(b'[run]\nname = "caf\xe9"\n')  # Latin-1
    with pytest.raises(SpecError, match=r"spec\.toml:2: not UTF-8 text \(byte 0xe9"):
        load_spec(p)


def test_overrides_cannot_sneak_in_a_non_finite_value():
    spec = load_spec(EXAMPLES / "reverse_sft.toml")
    with pytest.raises(SpecError, match="optim.learning_rate: must be a finite number"):
        spec.with_overrides(parse_overrides(["optim.learning_rate=nan"]))


def test_an_oversized_jsonl_line_is_refused_at_read_time(tmp_path):
    import runner.tasks as tasks

    p = tmp_path / "data.jsonl"
    p.write_text('{"prompt": "ok", "answer": "1"}\n' + json.dumps({"prompt": "x" * 5000, "answer": "1"}) + "\n")
    with pytest.raises(DataError, match=r"data\.jsonl:2: line longer than 1000 bytes"):
        list(tasks.jsonl_objects(p, max_line_bytes=1000))
    exact = tmp_path / "exact.jsonl"  # a line of exactly the limit (plus its newline) is fine
    line = json.dumps({"prompt": "", "answer": "1"})
    exact.write_text(line + "\n")
    assert [o for _, o in tasks.jsonl_objects(exact, max_line_bytes=len(line))] == [json.loads(line)]
    big = tmp_path / "big.jsonl"  # what the runner reads: the default limit applies
    big.write_text('{"prompt": "ok", "answer": "1"}\n' + json.dumps({"prompt": "7" * (tasks.MAX_LINE_BYTES + 1),
                                                                     "answer": "1"}) + "\n")
    with pytest.raises(DataError, match=rf"big\.jsonl:2: line longer than {tasks.MAX_LINE_BYTES} bytes"):
        load_jsonl(big)


def test_jsonl_that_is_not_utf8_names_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"prompt": "a", "answer": "b"}\n{"prompt": "\xff", "answer": "b"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not UTF-8"):
        load_jsonl(p)


def test_eval_count_applies_to_prompt_files_and_bounds_builtin_sets(tmp_path):
    from runner.tasks import eval_prompts

    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps({"prompt": str(i), "answer": str(i)}) + "\n" for i in range(5)))
    assert [e.answer for e in eval_prompts("reverse", p, seed=0, count=3, digits=4)] == ["0", "1", "2"]
    assert len(eval_prompts("reverse", p, seed=0, count=0, digits=4)) == 5
    with pytest.raises(DataError, match=r"eval\.count = 6, but the prompt file holds 5 prompts"):
        eval_prompts("reverse", p, seed=0, count=6, digits=4)
    assert len(eval_prompts("reverse", None, seed=0, count=0, digits=4)) == 32
    assert len(eval_prompts("reverse", None, seed=0, count=7, digits=4)) == 7


ECHO_RECIPE = '''
from dataclasses import dataclass

from runner.recipes.base import PAIRS, Recipe, RecipeSettings


@dataclass(frozen=True)
class Settings(RecipeSettings):
    echoes: int = 2

    def check(self, bad):
        bad.at_least("recipe.echoes", self.echoes)

    def needs_reference(self):
        return self.echoes > 2


def train_step(ctx, batch):
    return {"pairs": float(len(batch))}


RECIPE = Recipe("echo", train_step, Settings, PAIRS)
'''


def test_a_recipe_is_one_module(tmp_path, monkeypatch):
    """A module of runner.recipes that defines RECIPE is a recipe, with no other edit: the spec
    takes its kind and its own [recipe] keys (typed, checked, recorded), and the others' keys
    still load beside them; a spec of another kind gets the new key at its default."""
    import sys

    import runner.recipes

    (tmp_path / "echo.py").write_text(ECHO_RECIPE)
    monkeypatch.setattr(runner.recipes, "__path__", [*runner.recipes.__path__, str(tmp_path)])
    try:
        found = runner.recipes.discover()
        monkeypatch.setattr(runner.recipes, "RECIPES", found)
        monkeypatch.setattr(runner.recipes, "SETTINGS_KEYS", runner.recipes.settings_keys(found))
        echo = sys.modules["runner.recipes.echo"]
        assert list(found)[-1] == "echo" and found["echo"] is echo.RECIPE

        spec = Spec.from_dict({"recipe": {"kind": "echo", "echoes": 3, "group_size": 8}}, source="s.toml")
        assert spec.recipe.settings == echo.Settings(echoes=3)
        assert spec.recipe.settings.needs_reference() and spec.recipe.settings.new_tokens() == 0
        assert spec.to_dict()["recipe"]["echoes"] == 3 and spec.to_dict()["recipe"]["group_size"] == 8
        assert Spec.from_dict(spec.to_dict()) == spec  # as a run records it and a resume reads it
        assert found["echo"].data is runner.recipes.base.PAIRS
        with pytest.raises(SpecError, match=r"s.toml: recipe.echoes: must be at least 1, got 0"):
            Spec.from_dict({"recipe": {"kind": "echo", "echoes": 0}}, source="s.toml")
        with pytest.raises(SpecError, match=r"recipe.kind: must be one of 'sft', .*'igpo', 'echo', got 'ppo'"):
            Spec.from_dict({"recipe": {"kind": "ppo"}})
        assert Spec.from_dict({"recipe": {"kind": "sft"}}).to_dict()["recipe"]["echoes"] == 2
    finally:  # the package as it was (monkeypatch restores its registry and path)
        sys.modules.pop("runner.recipes.echo", None)
        vars(runner.recipes).pop("echo", None)
