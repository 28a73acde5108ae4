"""Where a run's service is, and which tokenizer it uses: a local service named by its
base_url is asked (GET /local/v1/info) which tokenizer it serves, as `local info` prints it,
not looked up in this installation's catalogue."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from runner.provision import Endpoint, endpoint
from runner.spec import Spec, SpecError, load_spec
from tests.helpers import small_spec


def _endpoint(spec: Spec) -> Endpoint:
    return endpoint(spec.backend, spec.model.tokenizer, spec.bad)


def test_a_base_url_of_another_local_service_gives_that_services_tokenizer(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from runner.local import catalogue
    from runner.local.supervisor import local_service
    from tests.local.test_model_dir import _write_checkpoint

    checkpoint = _write_checkpoint(tmp_path / "ckpt")  # served with its own tokenizer, saved beside it
    token = "local-token-7c1e"
    with local_service(state_dir=tmp_path / "other", model_dirs={"accounts/local/models/ckpt": str(checkpoint)},
                       token=token) as info:
        spec = load_spec(small_spec(tmp_path, info.base_url, name="other"))
        monkeypatch.setenv("FIREWORKS_API_KEY", token)  # the run's key is the service's token
        where = _endpoint(spec)
        assert (where.base_url, where.tokenizer_path) == (info.base_url, str(checkpoint.resolve()))
        assert where.tokenizer_path != catalogue.tokenizer_path()  # what this installation would have said
        named = load_spec(small_spec(tmp_path, info.base_url, name="named", model={"tokenizer": "/my/tokenizer"}))
        assert _endpoint(named).tokenizer_path == "/my/tokenizer"  # the spec's own choice is not asked about
        monkeypatch.setenv("FIREWORKS_API_KEY", "not-the-token")
        with pytest.raises(SpecError, match=r"backend\.base_url: the service at .* does not say which tokenizer it "
                                            r"serves \(GET /local/v1/info: HTTP 401\)"):
            _endpoint(spec)


def test_a_base_url_where_nothing_answers_names_the_key(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spec = load_spec(small_spec(tmp_path, f"http://127.0.0.1:{port}", name="nobody"))
    with pytest.raises(SpecError, match=rf"nobody\.toml: backend\.base_url: no service answers at "
                                        rf"http://127\.0\.0\.1:{port} \("):
        _endpoint(spec)
