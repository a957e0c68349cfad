"""The CLI's error contract: vitlab's own errors (bad input) are one line and exit 2; anything else is a bug and
keeps its traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vitlab.cli import main
from vitlab.errors import InvalidValueError, UnknownNameError, VitlabError

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def _python(code: str) -> subprocess.CompletedProcess:
    """``python -c code`` with this checkout's vitlab, its output captured."""
    return subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)


def _run_with_failing_library(exc: str) -> subprocess.CompletedProcess:
    """`vitlab models` with the library function it calls replaced by one raising ``exc``."""
    code = ("import sys, vitlab.errors, vitlab.cli.models\n"
            "def broken(*args, **kwargs):\n"
            f"    raise {exc}\n"
            "vitlab.cli.models.list_models = broken\n"
            "from vitlab.cli import main\n"
            "sys.exit(main(['models']))\n")
    return _python(code)


@pytest.mark.parametrize("exc", ["RuntimeError('boom inside a command')", "ValueError('boom inside a command')",
                                 "KeyError('boom inside a command')"])
def test_an_unexpected_exception_inside_a_command_reaches_stderr_with_its_traceback(exc):
    res = _run_with_failing_library(exc)
    assert res.returncode == 1
    assert "Traceback (most recent call last)" in res.stderr
    assert "in broken" in res.stderr and "boom inside a command" in res.stderr
    assert "error:" not in res.stderr


def test_a_vitlab_error_inside_a_command_is_one_line():
    res = _run_with_failing_library("vitlab.errors.VitlabError('the file x.bin is not a checkpoint')")
    assert res.returncode == 2
    assert res.stderr == "vitlab models: error: the file x.bin is not a checkpoint\n"


def test_vitlab_s_own_warnings_are_one_line_and_other_libraries_keep_python_s_form():
    """A vitlab warning (here the one a zeroed ImageNet-21k head gives) was Python's two lines: the file and line of
    vitlab's source, the category, and the source line that called it."""
    code = ("import sys, warnings, vitlab.cli.models\n"
            "def warn_then_list(*args, **kwargs):\n"
            "    from vitlab.checkpoints import CheckpointWarning, loading\n"
            "    warnings.warn_explicit('x.npz: the classification head is all zeros', CheckpointWarning,\n"
            "                           loading.__file__, 744)  # where load() warns from\n"
            "    warnings.warn_explicit('from elsewhere', UserWarning, '/elsewhere/lib.py', 7)\n"
            "    return ['vit_ti16']\n"
            "vitlab.cli.models.list_models = warn_then_list\n"
            "from vitlab.cli import main\n"
            "sys.exit(main(['models', '--json']))\n")
    res = _python(code)
    lines = res.stderr.splitlines()
    assert lines[0] == "vitlab models: warning: x.npz: the classification head is all zeros", res.stderr
    assert lines[1] == "/elsewhere/lib.py:7: UserWarning: from elsewhere" and len(lines) == 2


def test_bad_input_is_one_line_with_exit_status_2(capsys, tmp_path):
    assert main(["train", "--recipe", "no-such-recipe", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitlab train: error: unknown recipe 'no-such-recipe'") and err.count("\n") == 1
    assert main(["train", "--config", str(tmp_path / "missing.json"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitlab train: error: --config ") and "missing.json" in err and err.count("\n") == 1
    assert main(["train", "--recipe", "fashion-mnist", "--set", "lr=fast", "--dry-run"]) == 2
    assert capsys.readouterr().err == "vitlab train: error: --set lr=fast: takes a number\n"
    assert main(["train", "--set", "weight_decy=0.1", "--set", "lr", "--dry-run"]) == 2  # apply_overrides' key
    assert capsys.readouterr().err == ("vitlab train: error: --set weight_decy: unknown training config key (did you "
                                       "mean weight_decay or ema_decay?)\n")


def test_user_error_types_are_also_the_builtin_types_python_callers_catch():
    assert issubclass(InvalidValueError, VitlabError) and issubclass(InvalidValueError, ValueError)
    assert issubclass(UnknownNameError, VitlabError) and issubclass(UnknownNameError, KeyError)
    assert str(UnknownNameError("unknown model 'x'")) == "unknown model 'x'"  # not quoted as KeyError's str() is


def test_a_reader_that_goes_away_ends_the_command_quietly():
    """``vitlab models | head -0``: the closed pipe ends the command with 141 (128 + SIGPIPE), no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "vitlab", "models"], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # before the command writes anything
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141
    assert err == ""


def test_importing_vitlab_does_not_load_torch():
    """The package's names load on first use, so the CLI's own start-up handles a Ctrl-C while torch loads."""
    code = ("import sys, vitlab, vitlab.cli; print('torch' in sys.modules); vitlab.ViTConfig; "
            "print('torch' in sys.modules)")
    out = _python(code)
    assert out.stdout.split() == ["False", "True"], out.stderr


def test_help_version_and_a_mistyped_command_do_not_load_torch():
    """``vitlab --help``, ``--version`` and an unknown command answer from the command table, importing no
    command module (they import torch: seconds on a busy machine)."""
    code = ("import sys\n"
            "from vitlab.cli import main\n"
            "for argv in (['--help'], ['--version'], ['nosuch'], []):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print('torch' in sys.modules, sorted(m for m in sys.modules if m.startswith('vitlab.cli.')))\n")
    res = _python(code)
    assert res.stdout.splitlines()[-1] == "False []", res.stdout + res.stderr
    assert "pretrain-mpp" in res.stdout and "vitlab 0.1.0" in res.stdout

def test_training_commands_build_their_flags_without_torch():
    """``vitlab train / finetune / pretrain-mpp --help`` and their argument errors answer from the config's fields
    (vitlab.train.config, vitlab.train.recipes: torch-free modules of lazily importing packages), without torch.
    ``from vitlab.train import X`` still gives each public name, ``predict`` the function even after the module."""
    code = ("import sys\n"
            "from vitlab.cli import main\n"
            "for argv in (['train', '--help'], ['finetune', '--help'], ['pretrain-mpp', '--help'],\n"
            "             ['train', '--steps', 'x'], ['finetune']):\n"
            "    try:\n"
            "        main(argv)\n"
            "    except SystemExit:\n"
            "        pass\n"
            "print('torch' in sys.modules)\n"
            "import vitlab.train.predict, vitlab.train, vitlab.models\n"
            "from vitlab.train import predict\n"
            "print(callable(predict) and predict.__module__, vitlab.train.predict is predict)\n"
            "print(all(getattr(p, n) is not None for p in (vitlab.train, vitlab.models) for n in p.__all__))\n"
            "print(vitlab.models.pretrained.__name__, vitlab.train.runfolder.__name__)\n")  # submodules as attributes
    res = _python(code)
    lines = res.stdout.splitlines()
    expected = ["False", "vitlab.train.predict True", "True", "vitlab.models.pretrained vitlab.train.runfolder"]
    assert lines[-4:] == expected, res.stdout + res.stderr
    assert res.stdout.count("--lora-rank R") >= 2 and "--mask-ratio" in res.stdout  # the helps were printed
    assert "argument --steps: invalid int value: 'x'" in res.stderr and "required: --from" in res.stderr


def test_the_command_table_lists_every_command_with_its_help():
    """COMMAND_HELP (what ``vitlab --help`` shows without importing the commands) matches the commands' own
    parsers, and building the parser for one command registers that command in full."""
    import argparse
    import importlib

    from vitlab.cli import COMMAND_HELP, build_parser, command_modules

    helps = {}
    for name in command_modules():
        subparsers = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(f"vitlab.cli.{name}").register(subparsers)
        helps.update({a.dest: a.help for a in subparsers._choices_actions})
    assert helps == COMMAND_HELP
    parser = build_parser(["--offline", "models", "--aliases"])
    assert parser.parse_args(["models", "--aliases"]).func is not None


def test_ctrl_c_while_torch_loads_is_one_line():
    """A KeyboardInterrupt raised inside ``import torch`` (where a Ctrl-C at start-up lands: seconds on a loaded
    machine) ends the command with one line and exit 130."""
    code = ("import sys\n"
            "class Interrupt:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'torch':\n"
            "            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Interrupt())\n"
            "from vitlab.cli import main\n"
            "sys.exit(main(['models']))\n")
    res = _python(code)
    assert (res.returncode, res.stderr) == (130, "vitlab: interrupted\n")


def test_train_flags_come_from_the_config_fields():
    """Each TrainConfig field marked ``flag=`` has one flag on train / finetune / pretrain-mpp, with the field's doc as
    its help and the field's choices (from its one-of rule) shown; bool fields are switches."""
    import argparse
    from dataclasses import fields

    from vitlab.cli import build_parser
    from vitlab.cli.train import FLAG_FIELDS
    from vitlab.train.config import TrainConfig, describe

    assert not [f.name for f in fields(TrainConfig) if not f.metadata.get("doc")]  # declared with setting(default, doc)
    flagged = {f.name for f in fields(TrainConfig) if f.metadata["flag"]}
    assert set(FLAG_FIELDS) == flagged and FLAG_FIELDS["num_workers"] == "--workers"
    assert FLAG_FIELDS["progress"] == "--no-progress" and FLAG_FIELDS["lora_rank"] == "--lora-rank"
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command in ("train", "finetune", "pretrain-mpp"):
        actions = {a.dest: a for a in commands[command]._actions if a.dest in flagged}
        assert set(actions) == flagged, command
        for name, action in actions.items():
            assert action.option_strings == [FLAG_FIELDS[name]]
            assert action.help in (describe(name), f"no {describe(name)}") and action.default is None
    train = {a.dest: a for a in commands["train"]._actions}
    assert train["loss"].metavar == "{auto,softmax,sigmoid}" and train["epochs"].type is float
    assert train["freeze"].nargs is None and isinstance(train["freeze"], argparse._AppendAction)


def test_a_choice_out_of_the_list_is_refused_by_the_config_naming_the_flag(capsys):
    assert main(["train", "--loss", "hinge", "--dry-run"]) == 2
    assert capsys.readouterr().err == "vitlab train: error: --loss hinge: takes one of auto, softmax, sigmoid\n"


def test_library_errors_name_fields_and_the_cli_spells_them_as_flags(tmp_path, capsys):
    from vitlab.cli.train import flag_message
    from vitlab.train import TrainConfig, train

    assert flag_message("steps=5: the run is already at step 10", ("steps", "epochs")) == \
        "--steps 5: the run is already at step 10"
    assert flag_message("lower lr, raise warmup_epochs, clip gradients (grad_clip=1) or use precision=fp32, then "
                        "resume from it", ("lr", "warmup_epochs", "grad_clip", "precision", "resume")) == \
        ("lower --lr, raise --warmup-epochs, clip gradients (--set grad_clip=1) or use --precision fp32, then "
         "--resume from it")
    # names inside paths, words and file names stay as they are
    assert flag_message("out_dir=/x/out_dir/run_name.json: no; another run_name", ("out_dir", "run_name")) == \
        "--out-dir /x/out_dir/run_name.json: no; another --run-name"
    assert flag_message("give init_from", ("init_from",), {"init_from": "--from"}) == "give --from"
    # a switch is its flag alone; a command without the training flags spells only its own (eval's --data-dir)
    assert flag_message("pass data_dir=DIR, or download=True", ("data_dir", "download")) == \
        "pass --data-dir DIR, or --download"
    assert flag_message("pass data_dir=DIR, or download=True; image_column", ("data_dir", "download", "image_column"),
                        {"data_dir": "--data-dir", "image_column": "--image-column"}, config_flags=False) == \
        "pass --data-dir DIR, or download=True; --image-column"
    assert flag_message("choose one with label_column (not val_data)", ("label_column", "val_data")) == \
        "choose one with --label-column (not --val-data)"
    # from Python the error names the field; the command names the flag
    with pytest.raises(VitlabError, match=r"^lora_rank: LoRA adapts a trained model; give init_from") as info:
        train(TrainConfig(lora_rank=4, out_dir=str(tmp_path / "runs"), data="digits", progress=False))
    assert info.value.options == ("lora_rank", "init_from")
    assert main(["train", "--lora-rank", "4", "--data", "digits", "--out-dir", str(tmp_path / "runs"),
                 "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("vitlab train: error: --lora-rank: LoRA adapts a trained model; give "
                                              "--set init_from=...")
    # a data-layer error raised inside the run: the arguments of vitlab.data, as the command's flags
    assert main(["train", "--data", "fashion-mnist", "--data-dir", str(tmp_path / "nothing"), "--out-dir",
                 str(tmp_path / "runs"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vitlab train: error: fashion-mnist train files not found") and \
        err.endswith("pass --data-dir DIR holding {train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz], or --download "
                     "(needs internet)\n"), err
