"""``captioner caption`` as a user runs it: a real subprocess over a folder of generated images."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_model
from PIL import Image

from captioner.cli.caption_command import attention_names
from captioner.visualize.attention import PANEL_INCHES, TITLE_INCHES, figure_grid


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "captioner", "caption", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def write_image(path: Path, seed: int, size=(64, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption_models")
    return {
        "attention": make_model("attention", pretrained=True).save(root / "attention"),
        "show_tell": make_model("show_tell", pretrained=True).save(root / "show_tell"),
    }


@pytest.fixture
def photos(tmp_path):
    """A folder of three good images (PNG and JPEG) and two bad ones."""
    folder = tmp_path / "photos"
    good = [write_image(folder / "one.png", 1), write_image(folder / "two.jpg", 2, (80, 48)), write_image(folder / "three.jpeg", 3)]
    (folder / "notes.jpg").write_text("this is text, not a JPEG")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "readme.txt").write_text("not an image suffix: ignored")
    return folder, good


def main_lines(stdout):
    return [line for line in stdout.splitlines() if not line.startswith("\t")]


def test_folder_with_bad_images(models, photos, tmp_path):
    folder, good = photos
    out = tmp_path / "out" / "captions.jsonl"
    result = run(folder, "--model", models["attention"], "--beam", 3, "--n-best", 3, "--max-length", 4, "--json", out, "--quiet")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr

    # stderr: one line per bad image, naming it and why
    errors = result.stderr.strip().splitlines()
    assert len([line for line in errors if "notes.jpg" in line]) == 1
    assert len([line for line in errors if "empty.jpg" in line]) == 1
    assert any("notes.jpg" in line and "not an image" in line for line in errors)
    assert any("empty.jpg" in line and "empty" in line for line in errors)
    assert all(line.startswith("captioner caption: ") for line in errors)

    # stdout: PATH<TAB>CAPTION per good image, alternatives below as <TAB>RANK. CAPTION
    lines = result.stdout.splitlines()
    captions = dict(line.split("\t") for line in main_lines(result.stdout))
    assert sorted(captions) == sorted(str(path) for path in good)
    assert all(re.fullmatch(r"\t[23]\. \S.*", line) for line in lines if line.startswith("\t")), lines
    assert not lines[0].startswith("\t")

    # --json: one valid object per good image, also though some failed
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["source"] for r in records] == [line.split("\t")[0] for line in main_lines(result.stdout)]
    for record in records:
        assert record["caption"] == captions[record["source"]]
        assert record["words"] == record["caption"].split() and 1 <= len(record["words"]) <= 4
        assert record["log_prob"] <= 0 and isinstance(record["score"], float)
        assert len(record["n_best"]) == 3 and record["n_best"][0]["caption"] == record["caption"]
        assert "attention_figure" not in record
    assert [p.name for p in out.parent.iterdir()] == ["captions.jsonl"]  # no temporary file left


def test_all_good_exits_0(models, photos, tmp_path):
    folder, good = photos
    pattern = str(folder / "*.png")
    result = run(pattern, good[1], "--model", models["attention"], "--beam", 1, "--max-length", 3)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(good[0]), str(good[1])]  # n-best 1: no alternative lines
    assert all(len(line.split("\t")) == 2 and line.split("\t")[1] for line in lines)


def test_no_inputs_is_one_line_error(models, tmp_path):
    (tmp_path / "empty_folder").mkdir()
    result = run(tmp_path / "empty_folder", tmp_path / "nothing*.jpg", tmp_path / "missing.png", "--model", models["attention"])
    assert_one_line_error(result, "no images", "empty_folder", "nothing*.jpg", "missing.png")


def test_the_default_model_is_used_without_model(photos):
    folder, good = photos
    result = run(good[0], "--beam", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{good[0]}\t") and len(result.stdout.split("\t")[1].split()) >= 2


def test_attention_pictures(models, tmp_path):
    # two 'a.jpg' from different folders must not overwrite each other
    images = [write_image(tmp_path / "x" / "a.jpg", 1), write_image(tmp_path / "y" / "a.jpg", 2), write_image(tmp_path / "z.png", 3)]
    out, pictures = tmp_path / "captions.jsonl", tmp_path / "attention"
    result = run(*images, "--model", models["attention"], "--beam", 2, "--max-length", 7, "--attention", pictures, "--json", out)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in pictures.iterdir()) == ["a-2.png", "a.png", "z.png"]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [Path(r["attention_figure"]).name for r in records] == ["a.png", "a-2.png", "z.png"]
    for record in records:
        with Image.open(record["attention_figure"]) as png:
            assert png.format == "PNG"
            width, height = png.size
        # one panel for the image, one per word, 5 to a row (square images: square panels)
        rows, columns = figure_grid(len(record["words"]) + 1, 5)
        assert width == pytest.approx(columns * PANEL_INCHES * 100, abs=2)
        assert height == pytest.approx(rows * (PANEL_INCHES + TITLE_INCHES) * 100, abs=2)


def test_show_tell_attention_is_a_note(models, photos, tmp_path):
    folder, good = photos
    pictures = tmp_path / "attention"
    result = run(good[0], good[2], "--model", models["show_tell"], "--attention", pictures, "--max-length", 3)
    assert result.returncode == 0, result.stderr
    notes = result.stderr.strip().splitlines()
    assert len(notes) == 1 and "no attention" in notes[0]
    assert len(main_lines(result.stdout)) == 2
    assert not pictures.exists() or not any(pictures.iterdir())


def test_bad_options_are_one_line_errors(models, photos):
    folder, good = photos
    assert_one_line_error(run(good[0], "--model", models["attention"], "--beam", 0), "--beam")
    assert_one_line_error(run(good[0], "--model", folder / "no_such_checkpoint"), "no_such_checkpoint")
    assert_one_line_error(run(good[0], "--model", models["attention"], "--no-repeat-ngram", -1), "--no-repeat-ngram")


def test_no_repeat_ngram_from_the_command_line(models, photos):
    _, good = photos
    result = run(good[0], "--model", models["attention"], "--beam", 3, "--max-length", 12, "--no-repeat-ngram", 1)
    assert result.returncode == 0, result.stderr
    words = result.stdout.split("\t")[1].split()
    assert words and len(set(words)) == len(words)


def test_attention_names_are_distinct_and_stable():
    paths = [Path("x/a.jpg"), Path("y/a.jpg"), Path("a.png"), Path("A.JPG"), Path("a-2.jpg"), Path("dog.jpeg")]
    names = attention_names(paths)
    assert [names[p] for p in paths] == ["a.png", "a-2.png", "a-3.png", "A-4.png", "a-2-2.png", "dog.png"]
    assert len({n.lower() for n in names.values()}) == len(paths)


def test_an_unwritable_json_path_is_refused_before_any_captioning(models, photos, tmp_path):
    folder, _ = photos
    (tmp_path / "afile").write_text("a file, not a folder")
    result = run(folder, "--model", models["attention"], "--json", tmp_path / "afile" / "out.jsonl")
    assert_one_line_error(result, "cannot write --json", "out.jsonl")
    assert result.stdout == ""  # nothing was captioned


def test_an_interrupted_run_keeps_the_captions_made_so_far(models, tmp_path):
    import signal

    images = [write_image(tmp_path / "many" / f"{n:03d}.png", n) for n in range(40)]
    out = tmp_path / "captions.jsonl"
    out.write_text('{"earlier": "run"}\n')
    command = [sys.executable, "-m", "captioner", "caption", str(images[0].parent), "--model", str(models["attention"]), "--batch-size", "1", "--json", str(out), "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [process.stdout.readline(), process.stdout.readline()]  # the second batch has begun: the first is written
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and all(lines), (lines, stderr)
    assert out.read_text() == '{"earlier": "run"}\n'  # the earlier output is untouched
    records = [json.loads(line) for line in (tmp_path / "captions.jsonl.partial").read_text().splitlines()]
    assert 1 <= len(records) < 40 and records[0]["source"] == str(images[0])
    assert "captions made before the run stopped are in" in stderr and "Traceback" not in stderr


def test_a_file_name_that_is_not_utf8_is_captioned_and_recorded(models, tmp_path):
    # a name with a byte no UTF-8 text holds (Python keeps it as a surrogate escape): the caption line
    # prints (even where standard output is strict UTF-8, as in a UTF-8 locale other than C), the
    # --json record holds the name losslessly (a \\udcff escape), and --resume finds it done
    import os

    folder = tmp_path / "odd"
    write_image(folder / "a.png", 1)
    odd = Path(os.fsdecode(bytes(folder) + b"/zz\xff.png"))
    write_image(odd, 2)
    out = tmp_path / "captions.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "captioner", "caption", str(folder), "--model", str(models["attention"]), "--json", str(out), "--quiet"],
        capture_output=True,
        timeout=300,
        env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"},
    )
    assert result.returncode == 0 and b"Traceback" not in result.stderr and b"internal error" not in result.stderr, result.stderr
    assert bytes(folder) + b"/zz\xff.png\t" in result.stdout  # the name as it is on disk
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert sorted(record["source"] for record in records) == sorted([str(folder / "a.png"), str(odd)])
    again = subprocess.run(
        [sys.executable, "-m", "captioner", "caption", str(folder), "--model", str(models["attention"]), "--json", str(out), "--resume", "--quiet"], capture_output=True, timeout=300
    )
    assert again.returncode == 0 and again.stdout == b"", again.stderr  # both are done
    assert [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()] == records


def test_a_name_with_a_newline_or_tab_stays_one_line_of_two_fields_and_an_empty_argument_is_refused(models, tmp_path):
    # PATH<TAB>CAPTION: a newline, tab or backslash in a file name is escaped (as ls -b does), so
    # every caption is one line that splits at its first tab; --json keeps the names as they are
    folder = tmp_path / "names"
    names = ["new\nline.png", "tab\there.png", "back\\slash.png", "plain.png"]
    for seed, name in enumerate(names):
        write_image(folder / name, seed)
    out = tmp_path / "captions.jsonl"
    result = run(folder, "--model", models["attention"], "--json", out, "--quiet")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4 and all(line.count("\t") == 1 for line in lines), lines
    shown = sorted(line.split("\t")[0] for line in lines)
    assert shown == sorted(str(folder) + "/" + escaped for escaped in ["new\\nline.png", "tab\\there.png", "back\\\\slash.png", "plain.png"])
    assert sorted(json.loads(line)["source"] for line in out.read_text().splitlines()) == sorted(str(folder / name) for name in names)
    # "" is not the current folder (an unset variable in a script would caption everything there)
    assert_one_line_error(run("", "--model", models["attention"], cwd=folder), "argument IMAGE: an empty name (an unset variable?) names no file or folder")


def test_outputs_never_replace_an_input_image_a_device_or_a_pipe(models, tmp_path):
    # --json a.jpg would have replaced the photo; --attention into the photos' folder its PNGs; and
    # --json /dev/null the device itself (a file renamed over it): each is one line before captioning
    import os

    photo = write_image(tmp_path / "p" / "b.png", 1)
    before = photo.read_bytes()
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    for flags, fragment in [
        (["--json", photo], f"--json {photo} is one of the images to caption: choose another file"),
        (["--json", tmp_path / "p" / ".." / "p" / "b.png"], "is one of the images to caption"),
        (["--attention", photo.parent], f"--attention {photo.parent} would write the figure b.png over the image {photo}: choose another folder"),
        (["--json", pipe], f"{pipe} is not a regular file (a device, a folder or a pipe)"),
        (["--json", ""], "argument --json: an empty name (an unset variable?) names no file or folder"),
        (["--attention", ""], "argument --attention: an empty name"),
    ]:
        result = run(photo, "--model", models["attention"], *flags)
        assert_one_line_error(result, fragment)
        assert result.stdout == ""  # refused before captioning
    assert photo.read_bytes() == before and pipe.is_fifo()
    assert sorted(p.name for p in photo.parent.iterdir()) == ["b.png"]


def test_a_glob_picks_image_files_as_a_folder_does(models, photos):
    folder, good = photos
    (folder / "sub").mkdir()
    by_glob = run(str(folder / "*"), "--model", models["attention"], "--beam", 1, "--max-length", 3)
    by_folder = run(folder, "--model", models["attention"], "--beam", 1, "--max-length", 3)
    assert by_glob.returncode == by_folder.returncode == 1  # notes.jpg and empty.jpg, in both
    assert by_glob.stdout == by_folder.stdout and "readme.txt" not in by_glob.stderr and "sub" not in by_glob.stderr


def test_standard_input_is_an_image_and_a_url_is_said_to_be_one(models, photos):
    _, good = photos
    command = [sys.executable, "-m", "captioner", "caption", "-", "--model", str(models["attention"]), "--beam", "2", "--max-length", "5"]
    piped = subprocess.run(command, input=good[1].read_bytes(), capture_output=True, timeout=300)
    direct = run(good[1], "--model", models["attention"], "--beam", 2, "--max-length", 5)
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout.decode().split("\t", 1) == ["-", direct.stdout.split("\t", 1)[1]]
    empty = subprocess.run(command, input=b"", capture_output=True, timeout=300)
    assert empty.returncode == 1 and b"<standard input>: the file is empty" in empty.stderr
    url = run("https://example.com/dog.jpg", "--model", models["attention"])
    assert_one_line_error(url, "https://example.com/dog.jpg is a URL: captioner works offline and never downloads")
    mixed = run("https://example.com/dog.jpg", good[0], "--model", models["attention"], "--max-length", 3)
    assert mixed.returncode == 1 and "is a URL" in mixed.stderr and len(main_lines(mixed.stdout)) == 1


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_tags_and_required_words_with_the_shipped_model(tmp_path):
    out = tmp_path / "captions.jsonl"
    result = run(EXAMPLES / "dog.jpg", "--tags", "--require", "ball,balls", "--n-best", 2, "--json", out)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 3 and lines[1].startswith("\t2. ") and lines[2].startswith("\ttags: dog "), lines
    assert "ball" in lines[0].split("\t")[1].split(), lines[0]
    record = json.loads(out.read_text())
    assert record["tags"][0]["word"] == "dog" and 0 < record["tags"][0]["probability"] <= 1
    assert record["constraints"] == [["ball", "balls"]] and record["constraints_met"] is True
    assert record["familiar"] is True and lines[2].endswith("(a photo like its training photos: no concept required)"), lines[2]


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--require", "two words"], "--require"),
        (["--require", "xqzzy"], "xqzzy"),
        (["--require", "a" * 100_000], "--require words are at most 50 characters, not 100,000 ('aaaa"),  # not echoed whole
        (["--concepts", "9"], "--concepts must be a whole number from 0 to 3"),
        (["--concept-threshold", "0"], "--concept-threshold"),
        (["--familiar-percentile", "101"], "--familiar-percentile must be a number from 0 to 100, not 101"),
        (["--require", "a", "--require", "b", "--require", "c", "--require", "d"], "at most 3"),
    ],
)
def test_bad_constraint_flags_are_one_line_errors(flags, fragment):
    assert_one_line_error(run(EXAMPLES / "dog.jpg", *flags), fragment)
