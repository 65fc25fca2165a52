"""The command line as a user runs it: real subprocesses, one-line errors, exit codes."""

import subprocess
import sys

import pytest

import captioner


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "captioner", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_version_and_help():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"captioner {captioner.__version__}"
    result = run("--help")
    assert result.returncode == 0 and "prepare" in result.stdout
    result = run("prepare", "--help")
    assert result.returncode == 0 and "--min-word-freq" in result.stdout and "examples:" in result.stdout


def test_no_command_prints_help():
    result = run()
    assert result.returncode == 2 and "usage:" in result.stdout


@pytest.mark.parametrize("format", ["karpathy", "coco", "flickr8k", "csv", "jsonl"])
def test_shapes_then_prepare_in_every_format(tmp_path, format):
    result = run("shapes", str(tmp_path / "shapes"), "--num-images", "30", "--format", format)
    assert result.returncode == 0, result.stderr
    sources = result.stdout.split(" and ")[-1].split()  # the caption files to prepare, as printed
    result = run("prepare", *sources, "--out", str(tmp_path / "prepared"), "--min-word-freq", "1", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "train:" in result.stdout and "vocabulary:" in result.stdout
    assert (tmp_path / "prepared" / "train.npz").is_file()
    # re-running over the output refuses with one line, then --overwrite replaces it
    again = run("prepare", *sources, "--out", str(tmp_path / "prepared"), "--quiet")
    assert_one_line_error(again, "already exists", "--overwrite")
    again = run("prepare", *sources, "--out", str(tmp_path / "prepared"), "--quiet", "--overwrite")
    assert again.returncode == 0, again.stderr


def test_shapes_replaces_its_own_set_whole_and_nothing_else(tmp_path):
    # run again, a shapes set is replaced as a whole (no files of the first run left over); a folder
    # of other files, or an empty name (it used to mean the current folder), is refused in one line
    out = tmp_path / "shapes"
    assert run("shapes", str(out), "--num-images", "12").returncode == 0
    assert run("shapes", str(out), "--num-images", "3", "--seed", "1").returncode == 0
    assert len(list((out / "images").iterdir())) == 3 and sorted(p.name for p in out.iterdir()) == ["dataset_shapes.json", "images", "shapes.json"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    assert_one_line_error(run("shapes", str(mine), "--num-images", "3"), f"{mine} is not a shapes set", "refusing to replace it")
    assert sorted(p.name for p in mine.iterdir()) == ["keep.txt"]
    assert_one_line_error(run("shapes", "", "--num-images", "3", cwd=mine), "captioner shapes: error: argument out: an empty name (an unset variable?)")
    assert sorted(p.name for p in mine.iterdir()) == ["keep.txt"]


def test_sigterm_is_an_interrupt_that_leaves_no_half_built_folder(tmp_path):
    # kill, timeout and a stopping service send SIGTERM: the command ends as on Ctrl-C (exit 130,
    # one line) and the folder it was building beside OUT is removed (it used to stay, GBs of it)
    import signal
    import time

    out = tmp_path / "shapes"
    process = subprocess.Popen([sys.executable, "-m", "captioner", "shapes", str(out), "--num-images", "100000"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".building") and any(p.rglob("*.png")) for p in tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)  # until it is drawing images into the folder it builds
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and stderr.strip() == "captioner shapes: interrupted", (process.returncode, stderr)
    assert list(tmp_path.iterdir()) == []  # no .shapes.*.building folder, no shapes/


def test_usage_errors_are_one_line_saying_where_the_help_is():
    # argparse printed its whole usage block (15 lines for caption) before the error; an empty file or
    # folder name (an unset variable) is refused by every command, as it would mean the current folder
    for args, fragment in [
        (["evaluate", "default", "--out", ""], "captioner evaluate: error: argument --out: an empty name (an unset variable?) names no file or folder"),
        (["prepare", "c.jsonl", "--out", ""], "captioner prepare: error: argument --out: an empty name"),
        (["train", "--out", ""], "captioner train: error: argument --out: an empty name"),
        (["ensemble", "default", "", "--out", "x"], "captioner ensemble: error: argument MODEL: an empty name"),
        (["serve", ""], "captioner serve: error: argument MODEL: an empty name"),
        (["caption", "x.jpg", "--n-best", "abc"], "captioner caption: error: argument --n-best: invalid int value: 'abc' (see 'captioner caption --help')"),
        (["prepare"], "captioner prepare: error: the following arguments are required: captions, --out (see 'captioner prepare --help')"),
        (["caption", "x.jpg", "--no-such-flag"], "captioner caption: error: unrecognized arguments: --no-such-flag"),
        (["bogus"], "captioner: error: argument COMMAND: invalid choice: 'bogus'"),
    ]:
        result = run(*args)
        assert result.returncode == 2
        assert_one_line_error(result, fragment)


def test_prepare_bad_inputs_give_one_line(tmp_path):
    assert_one_line_error(run("prepare", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")), "does not exist")
    bad = tmp_path / "dataset_bad.json"
    bad.write_text('{"images": [')
    assert_one_line_error(run("prepare", str(bad), "--out", str(tmp_path / "o")), "not valid JSON")
    csv = tmp_path / "c.csv"
    csv.write_text("image,caption\nmissing.jpg,a cat\n")
    assert_one_line_error(run("prepare", str(csv), "--out", str(tmp_path / "o"), "--quiet"), "no training captions")
    assert_one_line_error(run("prepare", str(csv), "--out", str(tmp_path / "o"), "--split-fractions", "0.5", "0.5", "0.5"), "split fractions")
    assert_one_line_error(run("prepare", str(csv), "--out", str(tmp_path / "o"), "--min-word-freq", "0"), "--min-word-freq")
    assert_one_line_error(run("prepare", str(csv), "--images", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")), "does not exist")
    assert_one_line_error(run("prepare", str(csv), "--images", str(csv), "--out", str(tmp_path / "o")), f"image folder {csv} is not a folder")
    assert not (tmp_path / "o").exists()


def test_every_command_has_examples_and_every_option_says_what_it_does():
    from captioner.cli.main import build_parser, command_names

    parser = build_parser()
    commands = next(action for action in parser._actions if action.dest == "command").choices
    assert set(commands) == set(command_names())
    for name, command in commands.items():
        assert "examples:" in (command.epilog or ""), name
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"captioner {name} {action.option_strings[0]} has no help"
