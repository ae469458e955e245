"""The user-facing exception family: every project error is a SpineFedError, and joining it changed no message that
leaves a site."""

from __future__ import annotations

import pytest

from client.approval import NotApproved
from client.tasks import SiteRefusal, refusal
from common.errors import ConfigError, SpineFedError, run_command
from server.protocols import ProtocolError


@pytest.mark.parametrize("cls", [SiteRefusal, ProtocolError, NotApproved, ConfigError])
def test_project_errors_share_one_root(cls):
    assert issubclass(cls, SpineFedError)


def test_site_refusal_keeps_its_wire_name_and_text():
    # Flower's Error reply reason is "<class 'client.tasks.SiteRefusal'>:<'message'>"; the coordinator and the
    # site's audit log (client/audit.py SAFE_REFUSALS) recognise refusals by that name.
    exc = SiteRefusal("the site has no usable patients (nothing prepared)")
    assert f"{type(exc).__module__}.{type(exc).__qualname__}" == "client.tasks.SiteRefusal"
    assert refusal(exc, "training") is exc


def test_other_project_errors_still_leave_the_site_as_a_generic_line():
    # A SpineFedError that is not a SiteRefusal may name paths (a config error does): it must not reach the reply.
    out = refusal(ConfigError("/secret/site.yaml: key data.root missing"), "training")
    assert isinstance(out, SiteRefusal)
    assert str(out) == "training failed at the site (ConfigError); details are in the site's log"


def test_cli_prints_a_project_error_as_one_line_with_its_exit_code(capsys):
    def command(args):
        raise ProtocolError("out/protocol/progress.json: a protocol run exists here")

    assert run_command(command, None, prefix="simulate run") == 2
    assert capsys.readouterr().err == "simulate run: out/protocol/progress.json: a protocol run exists here\n"


def test_a_run_config_experiment_that_is_not_yaml_is_simply_not_a_readiness_request(tmp_path):
    # is_request catches only what reading a file can raise: the experiment loader then names the problem.
    from server.readiness import is_request

    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00garbage")
    (tmp_path / "broken.yaml").write_text("a: [unclosed\n")
    for name in ("binary.yaml", "broken.yaml", "missing.yaml"):
        assert is_request(tmp_path / name) is False
