import pytest

from ckptavg.train.schedules import cyclic_lr, epoch_lr, sgd_lr, swa_lr_at


def test_sgd_schedule_matches_the_formula():
    # epochs=100, lr 0.1: flat to t=0.5, linear to 0.01*lr at t=0.9, flat after
    assert sgd_lr(0, 0.1, 100) == 0.1
    assert sgd_lr(50, 0.1, 100) == 0.1
    assert sgd_lr(70, 0.1, 100) == pytest.approx(0.1 * (1 - 0.99 * 0.2 / 0.4))
    assert sgd_lr(90, 0.1, 100) == pytest.approx(0.001)
    assert sgd_lr(99, 0.1, 100) == pytest.approx(0.001)


def test_swa_schedule_reaches_swa_lr_at_0_9_swa_start():
    # PreResNet-164 preset: lr 0.1, swa_start 126, swa_lr 0.01
    assert swa_lr_at(63, 0.1, 126, 0.01) == 0.1  # t = 0.5
    t = 90 / 126
    assert swa_lr_at(90, 0.1, 126, 0.01) == pytest.approx(0.1 * (1 - 0.9 * (t - 0.5) / 0.4))
    assert swa_lr_at(114, 0.1, 126, 0.01) == pytest.approx(0.01)  # t > 0.9
    assert swa_lr_at(200, 0.1, 126, 0.01) == pytest.approx(0.01)
    assert epoch_lr(114, schedule="swa", lr_init=0.1, epochs=225, swa_start=126, swa_lr=0.01) \
        == swa_lr_at(114, 0.1, 126, 0.01)
    with pytest.raises(ValueError):
        epoch_lr(1, schedule="swa", lr_init=0.1, epochs=10)


def test_cyclic_schedule_per_iteration():
    c = 4
    got = [cyclic_lr(i, c, 0.05, 0.01) for i in range(1, 9)]
    expected = [0.04, 0.03, 0.02, 0.01] * 2  # t = 1/4 .. 1, restarting each cycle
    assert got == pytest.approx(expected)


@pytest.mark.parametrize("strategy", ["linear", "cos"])
def test_annealing_matches_torch_swalr(strategy):
    """Reference: torch.optim.swa_utils.SWALR stepped once per epoch from the SWA phase on."""
    import torch
    from torch.optim.swa_utils import SWALR

    lr, swa_lr, start, n, epochs = 0.1, 0.02, 5, 3, 12
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = None
    for epoch in range(epochs):
        if epoch >= start - 1 and sched is None:  # the first epoch of the SWA phase
            sched = SWALR(opt, swa_lr=swa_lr, anneal_epochs=n, anneal_strategy=strategy)
        want = opt.param_groups[0]["lr"]
        got = swa_lr_at(epoch, lr, start, swa_lr, anneal_epochs=n, anneal=strategy)
        assert got == pytest.approx(want, rel=1e-12), epoch
        opt.step()
        if sched is not None:
            sched.step()
