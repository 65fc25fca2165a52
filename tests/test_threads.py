"""Threads per phase: the free cores, never more than PyTorch's setting, overridable, restored after."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captioner import threads
from captioner.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_other_tasks_are_the_machine_s_running_count_less_our_own(tmp_path):
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("2.01 1.79 1.59 5/81 15510\n")
    assert threads.other_runnable_tasks(str(loadavg)) in (3, 4)  # 5 less this thread (and a torch worker still spinning)
    loadavg.write_text("0.00 0.00 0.00 1/81 15510\n")
    assert threads.other_runnable_tasks(str(loadavg)) == 0  # only us
    loadavg.write_text("garbage")
    assert threads.other_runnable_tasks(str(loadavg)) is None
    assert threads.other_runnable_tasks(str(tmp_path / "missing")) is None


@pytest.mark.parametrize(("others", "ceiling", "expected"), [(0, 2, 2), (1, 2, 1), (7, 2, 1), (0, 1, 1), (None, 2, 2)])
def test_a_phase_gets_the_free_cores_at_least_one_at_most_torch_s(monkeypatch, others, ceiling, expected):
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "other_runnable_tasks", lambda: others)
    assert threads.threads_now(ceiling) == expected


def test_captioner_threads_fixes_the_count_or_leaves_torch_alone(monkeypatch):
    monkeypatch.setattr(threads, "other_runnable_tasks", lambda: 50)  # a very busy machine
    monkeypatch.setenv(threads.ENV, "3")
    assert threads.threads_now(2) == 3
    monkeypatch.setenv(threads.ENV, "torch")
    assert threads.threads_now(2) == 2
    for bad in ("0", "-1", "two", "1e3", "100000"):
        monkeypatch.setenv(threads.ENV, bad)
        with pytest.raises(ConfigError, match="CAPTIONER_THREADS must be a whole number from 1 to 1024"):
            threads.threads_now(2)


def test_torch_s_setting_is_put_back_after_a_phase(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setattr(threads, "other_runnable_tasks", lambda: 50)
    before = torch.get_num_threads()
    with threads.phase_threads() as inside:
        assert inside == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), threads.phase_threads():
        raise RuntimeError("a failing phase")
    assert torch.get_num_threads() == before


def test_a_bad_captioner_threads_is_one_line_from_the_command_line():
    env = {"CAPTIONER_THREADS": "zero", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "captioner", "caption", "examples/dog.jpg"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert done.stderr.strip() == "captioner caption: error: CAPTIONER_THREADS must be a whole number from 1 to 1024, or 'torch', not 'zero'"


def test_phases_look_at_the_load_again_only_once_their_interval_has_passed(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    load, looks = {"others": 50}, []

    def others():
        looks.append(load["others"])
        return load["others"]

    monkeypatch.setattr(threads, "other_runnable_tasks", others)
    before = torch.get_num_threads()
    with threads.phases_threads(every_s=3600) as next_phase:
        assert next_phase() == 1 == torch.get_num_threads()  # busy: one thread
        load["others"] = 0
        assert next_phase() == 1 and len(looks) == 2  # not looked at again yet (the two looks were the first phase's)
    assert torch.get_num_threads() == before
    looks.clear()
    with threads.phases_threads(every_s=0) as next_phase:
        assert next_phase() == min(2, before)
        load["others"] = 50
        assert next_phase() == 1 == torch.get_num_threads()  # follows the load phase by phase
        assert len(looks) == 3
    assert torch.get_num_threads() == before


def test_a_loop_on_the_free_cores_puts_torch_s_setting_back_when_it_breaks_or_raises(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.setattr(threads, "other_runnable_tasks", lambda: 50)
    before = torch.get_num_threads()
    seen = []
    for item in threads.on_free_cores(range(5), every_s=0):
        seen.append(torch.get_num_threads())
        if item == 2:
            break
    assert seen == [1, 1, 1] and torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        for _ in threads.on_free_cores(range(5)):
            raise RuntimeError("a failing step")
    assert torch.get_num_threads() == before
