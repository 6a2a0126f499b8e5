"""What an install probe found (session 34), running tokenwire from a wheel outside its checkout and its unit:
onnxruntime's telemetry files in $HOME, a raw traceback from `testbed kv` without the ml extras, and `config
check` without the daemon's default path."""

from __future__ import annotations

import pytest


def test_loading_a_model_leaves_no_telemetry_files_in_home(tmp_path) -> None:
    """onnxruntime keeps a device id and an event cache under $HOME/.cache/Microsoft unless ORT_DISABLE_TELEMETRY
    is set, and only the systemd unit set it: any `tokenwire` run by hand left them."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    env["HOME"] = str(tmp_path)
    code = ("import time\nfrom tokenwire.predictor.runtime import load_forecaster\n"
            "f = load_forecaster()\nprint(f.predict_batch([time.monotonic()]) is None)\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == []


def test_testbed_kv_without_the_ml_extras_is_one_line(monkeypatch, capsys) -> None:
    """`kv eval` and `kv bench` said so in a line; `testbed kv` ended in ModelUnavailable's traceback."""
    from tokenwire.daemon.cli import main
    from tokenwire.testbed import kv_vsim
    from tokenwire.transport.cachegen.smollm import ModelUnavailable

    def unavailable(*args: object, **kwargs: object) -> None:
        raise ModelUnavailable("transformers/torch missing (No module named 'transformers'); install the ml and "
                               "kv-eval extras")

    monkeypatch.setattr(kv_vsim, "run_kv_virtual", unavailable)
    assert main(["testbed", "kv", "--virtual", "--down-trace", "8mbps"]) == 2
    err = capsys.readouterr().err
    assert "install the ml and kv-eval extras" in err and "Traceback" not in err, err


def test_config_check_without_a_path_checks_the_daemons_file(tmp_path, monkeypatch, capsys) -> None:
    """`tokenwire daemon` reads $TOKENWIRE_CONFIG, else /etc/tokenwire/tokenwire.toml; `config check` required a
    path. Now it checks the same file, and says so when there is none."""
    from tokenwire.daemon import config
    from tokenwire.daemon.cli import main

    good = tmp_path / "tokenwire.toml"
    good.write_text('[limits]\nmax_sessions = 100\n')
    monkeypatch.setenv("TOKENWIRE_CONFIG", str(good))
    assert main(["config", "check"]) == 0
    assert f"{good}: ok" in capsys.readouterr().out
    monkeypatch.delenv("TOKENWIRE_CONFIG")
    monkeypatch.setattr(config, "DEFAULT_PATH", tmp_path / "absent.toml")
    assert main(["config", "check"]) == 2
    err = capsys.readouterr().err
    assert "absent.toml: no such file (the daemon would run with the built-in defaults)" in err, err


def test_bandwidth_train_without_traces_stops_before_any_work(tmp_path, capsys) -> None:
    """An installed copy's default --traces (../shared/traces beside the package) does not exist: it went on into
    torch and failed with a traceback; --out's default would have written into site-packages."""
    from tokenwire.predictor import bandwidth_train

    with pytest.raises(SystemExit) as done:
        bandwidth_train.main(["--traces", str(tmp_path / "absent"), "--out", str(tmp_path / "out")])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "--traces:" in err and "is not a folder of traces" in err, err
    assert not (tmp_path / "out").exists()
