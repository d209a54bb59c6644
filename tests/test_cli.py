import subprocess
import sys

import sae_fast
from sae_fast.cli import build_parser, main, train_config_from_args


def test_info_function_reports_backends(capsys):
    d = sae_fast.info()
    text = capsys.readouterr().out
    assert d["torch"] in text and "backends on cpu" in text
    names = [row[0] for row in d["backends"]["cpu"]]
    assert names == ["torch", "triton", "cuda", "cpu"]
    # every unavailable backend says why
    assert all(ok or why for _, ok, why in d["backends"]["cpu"])
    assert "SAE_FAST_BACKEND" in text


def test_cli_info(capsys):
    assert main(["info"]) == 0
    assert "sae_fast" in capsys.readouterr().out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "sae_fast", "info"], capture_output=True, text=True, check=True)
    assert "backends on cpu" in out.stdout


def test_cli_parses_transcoder_flags(tmp_path):
    args = build_parser().parse_args(["train", "--model", "m", "--transcoder", "--affine-skip", "--out", str(tmp_path)])
    cfg = train_config_from_args(args).validate()
    assert cfg.transcoder and cfg.affine_skip and cfg.site == "resid"
    plain = train_config_from_args(build_parser().parse_args(["train", "--model", "m"]))
    assert not plain.transcoder and not plain.affine_skip
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--transcoder" in help_text and "--affine-skip" in help_text
