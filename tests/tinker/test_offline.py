"""A Tinker program loads its tokenizer by the model's name; with no hub access (HF_HUB_OFFLINE=1)
and the service's cache (HF_HUB_CACHE, what `local env` exports) that name is the served model's
tokenizer."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

from click.testing import CliRunner

from runner.cli import main as cli
from tests.tinker.conftest import TINKER_NAME

LOAD = """
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
print(json.dumps({"ids": tok.encode("12 + 30 = 42<|im_end|>", add_special_tokens=False),
                  "eos": tok.eos_token}))
"""


def test_local_env_exports_what_a_program_needs(tinker_env, local_info):
    result = CliRunner().invoke(cli, ["local", "env", "--state-dir", local_info.state_dir])
    assert result.exit_code == 0, result.output
    exported = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in result.output.splitlines())
    assert exported == {key: tinker_env[key] for key in exported}
    assert set(exported) == {"TINKER_BASE_URL", "TINKER_API_KEY", "HF_HUB_OFFLINE", "HF_HUB_CACHE"}


def test_local_env_without_a_service_says_so(tmp_path):
    result = CliRunner().invoke(cli, ["local", "env", "--state-dir", str(tmp_path)])
    assert result.exit_code == 1 and "no local service is running" in result.output


def test_the_tinker_name_resolves_offline_to_the_served_tokenizer(tinker_env, local_info):
    run = subprocess.run([sys.executable, "-c", LOAD, TINKER_NAME], env=tinker_env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    offline = json.loads(run.stdout)
    served = subprocess.run([sys.executable, "-c", LOAD, local_info.tokenizer_path], env=tinker_env,
                            capture_output=True, text=True, timeout=300)
    assert offline == json.loads(served.stdout)
    assert offline["ids"][-1] == 258 and offline["eos"] == "<|im_end|>"  # the byte tokenizer's special token
    # Without the service's cache the same name is not found offline (nothing else supplied it).
    bare = {key: value for key, value in tinker_env.items() if key != "HF_HUB_CACHE"}
    bare["HF_HOME"] = str(local_info.state_dir) + "/no-such-hf-home"
    missing = subprocess.run([sys.executable, "-c", LOAD, TINKER_NAME], env=bare, capture_output=True, text=True,
                             timeout=300)
    assert missing.returncode != 0
