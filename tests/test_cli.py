"""The command line: help, info, and errors in words (no training here; see test_end_to_end.py)."""

import pytest

from alignseg.cli import main


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "predict", "offsets", "info"):
        assert command in out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--resume" in capsys.readouterr().out


def test_info_prints_versions_and_model_size(capsys):
    assert main(["info", "alignseg_tiny", "--size", "64", "64"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "alignseg_tiny" in out and "params" in out
    assert main(["info", "ade20k", "--size", "64", "64"]) == 0  # a config preset: its model and classes
    out = capsys.readouterr().out
    assert "alignseg_r101" in out and "64x64" in out and "150 classes" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "train.iters=5"], "unknown config key 'train.iters' (did you mean 'train.iterations'?)"),
        (["train", "--config", "nope"], "unknown config 'nope'"),
        (["train", "--config", "synthetic", "--resume", "x.pt"], "give either --config or --resume"),
        (["eval", "--checkpoint", "missing.pt"], "checkpoint missing.pt does not exist"),
        (["info", "nope"], "unknown config 'nope'"),
    ],
)
def test_errors_are_reported_in_words(argv, message, caplog):
    assert main(argv) == 2
    assert message in caplog.text


def test_corrupt_checkpoint_is_named(tmp_path, caplog):
    bad = tmp_path / "broken.pt"
    bad.write_bytes(b"\x00" * 64)
    assert main(["train", "--resume", str(bad)]) == 2
    assert f"cannot read checkpoint {bad}" in caplog.text
