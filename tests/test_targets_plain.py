"""The targets themselves, with no checkpoint at all: each must PASS when left alone and
must FAIL when its state is deliberately damaged (ZDTM_CORRUPT), which shows that its
checker can actually fail."""
import signal
import time

import pytest

from conftest import ALL_TARGETS


@pytest.mark.parametrize("name", ALL_TARGETS)
def test_target_passes(launch, name):
    t = launch(name)
    time.sleep(0.3)
    assert t.alive(), t.log()
    t.expect_pass()


@pytest.mark.parametrize("name", ALL_TARGETS)
def test_target_detects_corruption(launch, name):
    t = launch(name, env={"ZDTM_CORRUPT": "1"})
    res = t.run_to_result(delay=0.1)
    assert res.verdict is not None and res.verdict.startswith("FAIL: "), t.describe(res)
    assert res.status == 1, t.describe(res)


def test_target_waits_for_sigusr1(launch):
    """Without SIGUSR1 a target keeps running and says nothing more than READY."""
    t = launch("blocked")
    time.sleep(0.5)
    assert t.alive()
    assert t.log() == "READY\n"


def test_target_killed_has_no_verdict(launch):
    """A target that dies (as a broken restore might make it) gives no verdict and its
    signal status, rather than hanging the harness."""
    t = launch("counter")
    t.signal(signal.SIGKILL)
    res = t.wait_result(timeout=5)
    assert res.verdict is None
    assert res.status == -signal.SIGKILL
