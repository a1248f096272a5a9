"""The `eegkd` command: dispatch, config lookup, the train command's flags, and a package that
holds the library and the command (and neither configs/ nor tests/)."""
import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from eegkd_jax import cli
from eegkd_jax.cli import common
from test_edf import REAL_HYPNOGRAM

ROOT = pathlib.Path(__file__).parent.parent


@contextlib.contextmanager
def absl_command(name: str = "train"):
    """Runs the absl command ``name`` inside; afterwards the flags it defined are gone again and
    its module forgets it defined them, so the next test defines them afresh (the commands define
    some of the same names)."""
    from absl import app, flags  # noqa: F401 - absl.app defines its own flags when imported

    before = set(flags.FLAGS)
    try:
        yield
    finally:
        for flag in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, flag)
        flags.FLAGS.unparse_flags()
        cli.command(name).define_flags.cache_clear()


def test_usage_and_unknown_commands(capsys):
    assert cli.main([]) == 2 and "commands:" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()[3:]] == list(cli.COMMANDS)
    assert cli.main(["frobnicate"]) == 2
    assert capsys.readouterr().err == ("error: unknown command 'frobnicate'; choose one of train, "
                                       "eval, predict, study, inspect, export, hypnogram-stats\n")


def test_every_command_is_a_module_with_its_own_help(monkeypatch, capsys):
    """Each command lives in eegkd_jax/cli/<name>.py; --help lists that command's flags only."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    for name in cli.COMMANDS:
        with absl_command(name):
            with pytest.raises(SystemExit) as done:
                cli.main([name, "--help"])
        out = capsys.readouterr().out
        assert done.value.code == 0 and out.startswith(f"usage: eegkd {name} ")
        flags = [line.split(":")[0].strip() for line in out.splitlines() if line.startswith("  --")]
        assert "--verbose" in flags and len(flags) >= 2, out
    assert "--sleep_edf" in out and "--workdir" not in out  # hypnogram-stats, the last one


def test_inspect_and_export_through_eegkd(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with absl_command("inspect"):
        with pytest.raises(SystemExit) as done:
            cli.main(["inspect", str(REAL_HYPNOGRAM)])
    assert done.value.code in (0, None)
    assert json.loads(capsys.readouterr().out)["epochs"] == 852
    missing = str(tmp_path / "nothing")
    with absl_command("export"):
        with pytest.raises(SystemExit) as done:
            cli.main(["export", "--checkpoint", missing, "--format", "litert"])
    err = capsys.readouterr().err
    assert done.value.code == 1
    assert err.startswith("error: ") and err.count("\n") == 1 and "nothing" in err


def test_config_names_resolve_to_packaged_configs(tmp_path, monkeypatch):
    packaged = tmp_path / "configs"
    packaged.mkdir()
    (packaged / "online_kd.py").write_text("")
    monkeypatch.setattr(common, "PACKAGED_CONFIGS", packaged)
    monkeypatch.chdir(tmp_path / "configs")  # no ./online_kd here: "online_kd.py" is the file
    assert common.resolve_config(["--config=online_kd:tiny", "--config.seed=1", "--workdir=x"]) == [
        f"--config={packaged / 'online_kd.py'}:tiny", "--config.seed=1", "--workdir=x"]
    monkeypatch.chdir(tmp_path)
    as_file = ["--config=configs/online_kd.py"]
    assert common.resolve_config(as_file) == as_file
    assert common.resolve_config(["--config=supervised:scalp"]) == ["--config=supervised:scalp"]


def test_train_command_reads_the_config_file_and_overrides(tmp_path, monkeypatch, capsys):
    from eegkd_jax.train import loop

    seen = {}

    def fake_train(config, workdir, *, announce):
        seen.update(config=config, workdir=workdir)
        announce("resumed from step 2 of 4: checkpoint runs/x/checkpoints/2")
        return {"step": 4, "kappa": 0.25, "teacher_kappa": 0.5, "accuracy": 0.123456}

    def fake_train_with_card(config, workdir, *, announce):
        # The run's card records the best checkpoint, step 2, as the training loop writes it.
        from eegkd_jax import model_card
        from test_model_card import SPLITS, fake_cohort

        card = model_card.build(config, fake_cohort(), SPLITS,
                                {"kappa": 0.3, "teacher_kappa": 0.45, "accuracy": 0.5}, step=2)
        model_card.save(workdir, card)
        return fake_train(config, workdir, announce=announce)

    monkeypatch.setattr(loop, "train_and_evaluate", fake_train)
    from eegkd_jax import baseline, compilation_cache

    monkeypatch.setattr(compilation_cache, "enable", lambda: None)  # no cache for later tests
    monkeypatch.setattr(baseline, "validation_floors", lambda data: {"ear": 0.1, "scalp": 0.2})
    monkeypatch.setattr(common, "_in_cli", False)  # parse_flags sets it for the process
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with absl_command():
        with pytest.raises(SystemExit) as done:
            cli.main(["train", f"--config={ROOT / 'configs' / 'online_kd.py'}:tiny",
                      "--config.seed=3", f"--workdir={tmp_path / 'run'}"])
        assert done.value.code in (0, None)
    assert seen["config"].mode == "online_kd" and seen["config"].seed == 3
    assert seen["config"].max_steps == 4 and seen["workdir"] == str(tmp_path / "run")
    out = capsys.readouterr().out.splitlines()
    # The run's one line of its own: where it resumed from (or that it starts fresh).
    assert out[-3] == "resumed from step 2 of 4: checkpoint runs/x/checkpoints/2"
    assert out[-2] == (f"validation at the last step ({tmp_path / 'run'}): "
                       '{"step": 4, "kappa": 0.25, "teacher_kappa": 0.5, "accuracy": 0.1235}')
    assert out[-1] == ("validation kappa: student (ear) 0.250 (floor 0.100), teacher (scalp) 0.500 "
                       "(floor 0.200) at the last step, 4; floor = band powers + logistic "
                       "regression on the same split")

    # With the run's card (every real run has one): the final line is the best checkpoint's.
    monkeypatch.setattr(loop, "train_and_evaluate", fake_train_with_card)
    with absl_command():
        with pytest.raises(SystemExit) as done:
            cli.main(["train", f"--config={ROOT / 'configs' / 'online_kd.py'}:tiny",
                      f"--workdir={tmp_path / 'run2'}"])
        assert done.value.code in (0, None)
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == ("validation kappa: student (ear) 0.300 (floor 0.100), teacher (scalp) 0.450 "
                       "(floor 0.200) at step 2, the best checkpoint (eval, predict and export use "
                       "it); floor = band powers + logistic regression on the same split")


def test_a_mistake_in_the_flags_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(common, "_in_cli", False)
    with absl_command():
        with pytest.raises(SystemExit) as done:
            cli.main(["train", f"--config={ROOT / 'configs' / 'online_kd.py'}:tiny",
                      "--config.optimiser.learning_rate=1"])
    err = capsys.readouterr().err
    assert done.value.code == 1 and err.count("\n") == 1
    assert err.startswith("error: --config.optimiser") and "optimizer" in err


def test_a_setting_that_cannot_be_meant_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(common, "_in_cli", False)
    with absl_command():
        with pytest.raises(SystemExit) as done:
            cli.main(["train", f"--config={ROOT / 'configs' / 'supervised.py'}:tiny",
                      "--config.optimizer.learning_rate=-0.004", f"--workdir={tmp_path / 'run'}"])
    captured = capsys.readouterr()
    assert done.value.code == 1 and captured.out == ""
    assert captured.err == ("error: config.optimizer.learning_rate=-0.004 cannot be meant: it must "
                            "be > 0\n")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_setup_installs_the_eegkd_command_once(tmp_path):
    """.ci/setup installs the package (editable) into .venv beside the requirements, says so in
    one line, and does nothing the second time. The copy's .venv sees this interpreter's packages
    and carries their stamp, so only the package is installed here."""
    import site

    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("pyproject.toml", "requirements.txt", "README.md"):
        shutil.copyfile(ROOT / name, repo / name)
    shutil.copytree(ROOT / ".ci", repo / ".ci")
    shutil.copytree(ROOT / "eegkd_jax", repo / "eegkd_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "venv", str(repo / ".venv")], check=True)
    packages = next(pathlib.Path(p) for p in site.getsitepackages() if "site-packages" in p)
    venv_packages = next((repo / ".venv" / "lib").glob("python*/site-packages"))
    (venv_packages / "these_packages.pth").write_text(f"{packages}\n")
    digest = hashlib.sha256((ROOT / "requirements.txt").read_bytes()).hexdigest()
    (repo / ".venv" / ".requirements.sha256").write_text(digest + "\n")
    first = subprocess.run(["bash", ".ci/setup"], cwd=repo, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert first.stdout == ".ci/setup: installing eegkd-jax into .venv (editable)\n"
    done = subprocess.run([str(repo / ".venv" / "bin" / "eegkd"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("usage: eegkd <command>")
    where = subprocess.run([str(repo / ".venv" / "bin" / "python"), "-c",
                            "import eegkd_jax; print(eegkd_jax.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True)
    assert where.stdout.strip() == str(repo / "eegkd_jax" / "__init__.py")  # editable
    again = subprocess.run(["bash", ".ci/setup"], cwd=repo, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout == ""


def test_the_command_works_from_any_directory(tmp_path):
    # The module behind the console script, started outside the repository.
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    shutil.copyfile(REAL_HYPNOGRAM, tmp_path / "night.edf")
    done = subprocess.run([sys.executable, "-m", "eegkd_jax.cli", "inspect", "night.edf"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["format"] == "edf-hypnogram"


def test_the_package_holds_the_library_and_the_command(tmp_path):
    # Built from a copy, so that the build leaves nothing in the repository.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(ROOT / name, source / name)
    shutil.copytree(ROOT / "eegkd_jax", source / "eegkd_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "--quiet", "-w", str(tmp_path / "dist"),
                           str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    wheel, = (tmp_path / "dist").glob("eegkd_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("eegkd_jax/cli/__init__.py", "eegkd_jax/cli/train.py", "eegkd_jax/export.py", "eegkd_jax/model_card.py",
                   "eegkd_jax/data/montage.py", "eegkd_jax/models/usleep.py",
                   "eegkd_jax/train/loop.py"):
        assert module in names
    assert not [n for n in names if n.startswith(("configs/", "tests/", "benchmarks/"))]
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "eegkd = eegkd_jax.cli:main" in entry_points
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA")))
    assert b"Provides-Extra: export" in metadata and b"Requires-Dist: pytest" in metadata


def test_train_is_quiet_unless_verbose(tmp_path):
    """Log records go to <workdir>/train.log; the screen keeps warnings but not TFDS's notices."""
    import logging

    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    filters = list(handler.filters)
    root = logging.getLogger()
    handlers = list(root.handlers)
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.INFO)  # as under app.run
    try:
        path = common.log_to_file(tmp_path / "run", "train")
        assert path == tmp_path / "run" / "train.log"
        absl_logging.info("the config dump")
        absl_logging.warning("Using custom data configuration: CohortConfig(...)")
        record = logging.LogRecord("absl", logging.WARNING, __file__, 1, "a checkpoint was torn",
                                   None, None)
        assert handler.filter(record)
        notice = logging.LogRecord("absl", logging.WARNING, __file__, 1,
                                   "Using custom data configuration: x", None, None)
        assert not handler.filter(notice)
        info = logging.LogRecord("absl", logging.INFO, __file__, 1, "config", None, None)
        assert not handler.filter(info)
        for h in root.handlers:
            h.flush()
        text = path.read_text()
        assert "the config dump" in text and "Using custom data configuration" in text
    finally:
        absl_logging.set_verbosity(verbosity)
        handler.filters[:] = filters
        for h in set(root.handlers) - set(handlers):
            root.removeHandler(h)
            h.close()
