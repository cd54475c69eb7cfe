"""Console scripts: every option of every script has help text, and a user's mistake is one
`prog: error: ...` line with exit code 2 (the traceback only with --debug).

    pytest -q tests/test_cli.py
"""
import argparse
import importlib
import json
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _console_scripts():
    """(name, module, function) of every console script setup.py declares, plus `python -m drift.demo`."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        found = re.findall(r'"([\w-]+)=([\w.]+):(\w+)"', f.read())
    assert len(found) >= 5, found
    return found + [("drift-demo", "drift.demo", "main")]


class _Got(Exception):
    def __init__(self, parser):
        self.parser = parser


def _parser_of(module, func, argv, monkeypatch):
    """The argparse parser a script's main builds, caught when it starts parsing (nothing else runs)."""
    def catch(self, *a, **k):
        raise _Got(self)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", catch)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", catch)
    main = getattr(importlib.import_module(module), func)
    with pytest.raises(_Got) as got:
        main(argv)
    return got.value.parser


def _undocumented(parser, where):
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if not (choice.help or "").strip():
                    missing.append(f"{where} {choice.dest}")
            for name, sub in action.choices.items():
                missing += _undocumented(sub, f"{where} {name}")
            continue
        text = re.sub(r"\(default: [^)]*\)", "", action.help or "").strip()
        if not text or action.help == argparse.SUPPRESS:
            missing.append(f"{where} {'/'.join(action.option_strings) or action.dest}")
    return missing


@pytest.mark.parametrize("name, module, func", _console_scripts())
def test_every_option_has_help(name, module, func, monkeypatch):
    parsers = [(name, _parser_of(module, func, [], monkeypatch))]
    if name == "drift-prep":  # `drift-prep latents` has its own parser
        parsers.append((f"{name} latents", _parser_of(module, func, ["latents"], monkeypatch)))
    missing = [m for where, p in parsers for m in _undocumented(p, where)]
    assert not missing, f"options without help: {missing}"


def _one_line_error(capsys, prog, *words):
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)


def test_drift_train_user_errors(tmp_path, capsys):
    from drift.train import main
    assert main(["--preset", "tiny", "--config", str(tmp_path / "missing.json")]) == 2
    _one_line_error(capsys, "drift-train", "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"R_list": "12"}))
    assert main(["--preset", "tiny", "--config", str(bad)]) == 2
    _one_line_error(capsys, "drift-train", "R_list must be a list of numbers")
    bad.write_text(json.dumps({"ema_decay": None}))
    assert main(["--preset", "tiny", "--config", str(bad)]) == 2
    _one_line_error(capsys, "drift-train", "ema_decay is null")
    assert main(["--preset", "tiny", "--lr", "nan"]) == 2
    _one_line_error(capsys, "drift-train", "lr must be a finite number")
    assert main(["--preset", "tiny", "--data-path", str(tmp_path / "nothing"), "--out-dir", str(tmp_path / "r")]) == 2
    _one_line_error(capsys, "drift-train", "nothing")
    with pytest.raises(FileNotFoundError):  # --debug: the traceback instead
        main(["--preset", "tiny", "--config", str(tmp_path / "missing.json"), "--debug"])


def test_drift_train_without_preset_names_the_defaults_and_refuses_what_cannot_fit(tmp_path, capsys, monkeypatch):
    from drift import memory
    from drift.train import check_defaults_fit, main
    monkeypatch.setattr(memory, "available_memory", lambda device: (24.0 * memory.GIB, "available RAM"))
    out = tmp_path / "run"
    assert main(["--device", "cpu", "--out-dir", str(out)]) == 2
    _one_line_error(capsys, "drift-train", "estimated memory", "exceeds the available RAM (24.0 GiB)",
                    "132.7M generator parameters")
    assert not out.exists()  # refused before anything was written
    from drift.config import TrainConfig
    line = check_defaults_fit(TrainConfig(device="cpu", train_batch_size=2, gen_per_label=4, pos_per_sample=4,
                                          neg_per_sample=4))
    assert "no --preset given: running the built-in defaults (model DriftDiT-B/2" in line
    assert "estimated memory" in line and "available RAM 24.0 GiB" in line


def test_other_scripts_user_errors(tmp_path, capsys):
    from drift.demo import main as demo
    from drift.mae_train import main as mae
    from drift.toy import main as toy
    assert mae(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")]) == 2
    _one_line_error(capsys, "drift-mae", "nowhere")
    assert toy(["--lr-decay-frac", "2", "--jobs", "1", "--targets", "bimodal", "--inits", "far",
                "--out", str(tmp_path / "t")]) == 2
    _one_line_error(capsys, "drift-toy", "lr_decay_frac")
    assert demo(["--data", str(tmp_path / "no-idx"), "--no-apt", "--out", str(tmp_path / "d")]) == 2
    _one_line_error(capsys, "drift-demo", "no-idx")
