"""The three console scripts share one subcommand pattern (common/cli.py): shared options are accepted before or after
the subcommand, and every documented invocation still parses to the command it names."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from client import cli as client_cli
from server import cli as server_cli
from simulations import cli as simulate_cli

SCRIPTS = {"client": client_cli, "server": server_cli, "simulate": simulate_cli}


def parse(script: str, line: str):
    return SCRIPTS[script].command_line().parse(shlex.split(line))


@pytest.mark.parametrize(
    ("script", "before", "after"),
    [
        ("client", "--config site.yaml prepare --quiet", "prepare --config site.yaml --quiet"),
        ("client", "--config site.yaml review 7", "review 7 --config site.yaml"),
        (
            "client",
            "--config s.yaml predict --model m.pt --patient P1",
            "predict --model m.pt --patient P1 --config s.yaml",
        ),
        ("server", "--config c.yaml status", "status --config c.yaml"),
        ("server", "--config c.yaml run exp.yaml --resume", "run exp.yaml --resume --config c.yaml"),
        ("simulate", "-v data --out d --small", "data --out d --small -v"),
    ],
)
def test_shared_options_mean_the_same_before_or_after_the_subcommand(script, before, after):
    assert vars(parse(script, before)) == vars(parse(script, after))


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("client", ["--config", "{missing}", "keygen"], "error: {missing}: file not found"),
        ("client", ["keygen", "--config", "{missing}"], "error: {missing}: file not found"),
        ("server", ["--config", "{missing}", "status"], "error: {missing}: file not found"),
        ("server", ["status", "--config", "{missing}"], "error: {missing}: file not found"),
    ],
)
def test_either_order_reaches_the_command(tmp_path, capsys, script, args, message):
    missing = str(tmp_path / "absent.yaml")
    assert SCRIPTS[script].main([a.format(missing=missing) for a in args]) == 2
    assert capsys.readouterr().err.strip() == message.format(missing=missing)


def test_a_subcommand_without_a_config_it_needs_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        client_cli.main(["prepare"])
    assert exit_.value.code == 2
    assert "client prepare: error: the following arguments are required: --config" in capsys.readouterr().err


def test_client_without_subcommand_or_site_prints_help_and_exits_2(capsys):
    assert client_cli.main([]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: client") and "prepare" in err and "--site" in err


def test_client_site_still_starts_the_supernode_path(tmp_path, capsys):
    # The card's `client --site NAME --config site.yaml`: no subcommand, so the SuperNode command runs (here it stops
    # at the missing config, with the same message as before).
    assert client_cli.main(["--site", "hospital-a"]) == 2
    assert capsys.readouterr().err.strip() == "error: --site needs --config site.yaml"
    args = parse("client", "--site hospital-a --config site.yaml")
    assert args.command is None and args.site == "hospital-a" and args.config == Path("site.yaml")


# The invocations README.md, deploy/*.md, deploy/systemd, deploy/compose.yaml, quickstart.sh and .ci/ document.
DOCUMENTED = [
    ("client", "--site hospital-a --config site.yaml", None),
    ("client", "prepare --config site.yaml", "prepare"),
    ("client", "keygen --config site.yaml", "keygen"),
    ("client", "keygen --force --config site.yaml", "keygen"),
    ("client", "check --config site.yaml", "check"),
    ("client", "check --dry-run --fab app.fab --config site.yaml", "check"),
    ("client", "review --fab app.fab --experiment experiment.yaml --config site.yaml", "review"),
    ("client", "review 12 --config site.yaml", "review"),
    ("client", "predict --model final.pt --config site.yaml --patient ID --gradcam overlay.png", "predict"),
    ("server", "--config coordinator.yaml", None),
    ("server", "register-site hospital-a hospital-a.pub --config c.yaml", "register-site"),
    ("server", "revoke-site hospital-a --config c.yaml", "revoke-site"),
    ("server", "run experiment.yaml --dry-run --deadline 120 --config c.yaml", "run"),
    ("server", "run experiment.yaml --resume --config c.yaml", "run"),
    ("server", "status --config c.yaml", "status"),
    ("server", "cancel --config c.yaml", "cancel"),
    ("simulate", "run --quick --out results/quick", "run"),
    ("simulate", "data --out data/sites", "data"),
    ("simulate", "data --public --out data/public", "data"),
    ("simulate", "pretrain --data data/public --out data/standin_r50_64.pt --size 64 --epochs 12", "pretrain"),
    (
        "simulate",
        "centralized --data data/sites --pretrained data/standin_r50_64.pt --size 64 --epochs 6",
        "centralized",
    ),
    ("simulate", "run --data data/sites --experiment simulations/experiments/all-64px.yaml --no-centralized", "run"),
]


@pytest.mark.parametrize(("script", "line", "command"), DOCUMENTED)
def test_documented_invocations_parse_to_their_command(script, line, command):
    assert parse(script, line).command == command


def test_both_runners_show_each_finished_round_once_in_one_format(tmp_path, capsys):
    from server.flwrctl import show_rounds

    csv = tmp_path / "rounds.csv"
    assert show_rounds(csv, 0) == 0  # no file yet
    csv.write_text("round,sites_sent,sites_ok,train_loss,eval_pooled_auc,seconds\n1,3,3,0.61,,12.0\n")
    shown = show_rounds(csv, 0)
    csv.write_text(csv.read_text() + "2,3,2,0.52,0.81,11.5\n")
    shown = show_rounds(csv, shown)
    assert shown == 2 and show_rounds(csv, shown) == 2
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "  round 1: 3/3 sites ok, loss 0.61, 12.0 s",
        "  round 2: 2/3 sites ok, loss 0.52, pooled AUC 0.81, 11.5 s",
    ]
