"""Learning-rate schedules: decay curves, plateau halving, and a restart for a new training phase."""

import pytest
import torch

from captioner.training.schedule import LearningRateSchedule


def make(kind, **kwargs):
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return LearningRateSchedule(optimizer, kind, total_epochs=10, min_lr=0.0, **kwargs)


def test_step_decay_and_its_restart_count_epochs_from_the_phase_start():
    schedule = make("step", step_epochs=2, gamma=0.5)
    rates = []
    for epoch in range(6):
        schedule.after_epoch(epoch)
        rates.append(schedule.rates[0])
    assert rates == [1.0, 0.5, 0.5, 0.25, 0.25, 0.125]
    schedule.restart([0.1], epoch=6)  # a new phase starts at (0-based) epoch 6 with its own rate
    assert schedule.rates == [0.1]
    schedule.after_epoch(6)
    assert schedule.rates == [pytest.approx(0.1)]  # one epoch into the phase: no decay yet
    schedule.after_epoch(7)
    assert schedule.rates == [pytest.approx(0.05)]


def test_cosine_restart_anneals_over_the_remaining_epochs():
    schedule = make("cosine")
    schedule.after_epoch(4)
    assert schedule.rates[0] == pytest.approx(0.5 * (1 + torch.cos(torch.tensor(torch.pi * 5 / 10)).item()))
    schedule.restart([0.2], epoch=5)
    schedule.after_epoch(9)  # the last epoch of the run: the phase's curve has reached zero
    assert schedule.rates[0] == pytest.approx(0.0, abs=1e-12)


def test_plateau_halves_after_patience_and_restart_forgets_the_history():
    schedule = make("plateau", patience=2, factor=0.5)
    for epoch, metric in enumerate([1.0, 2.0, 1.5, 1.9]):
        schedule.after_epoch(epoch, metric)
    assert schedule.rates == [0.5]
    schedule.restart([0.1], epoch=4)
    schedule.after_epoch(4, 0.3)  # worse than the old phase's best, but the first of this phase
    schedule.after_epoch(5, 0.2)
    assert schedule.rates == [pytest.approx(0.1)]


def test_state_round_trip_keeps_the_phase():
    schedule = make("step", step_epochs=1, gamma=0.5)
    schedule.restart([0.4], epoch=3)
    restored = make("step", step_epochs=1, gamma=0.5)
    restored.load_state_dict(schedule.state_dict())
    schedule.after_epoch(4)
    restored.after_epoch(4)
    assert restored.rates == schedule.rates == [pytest.approx(0.1)]
