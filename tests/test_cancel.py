"""Issue 12/13: long work stops soon after it is no longer wanted (Cancel pressed, session closed), at its next
progress report, and leaves the session as it was. Driven at the session level (no gradio); the HTTP side
(a disconnected client, the app's Cancel button) is in tests/test_hostile_http.py."""
import threading

import pytest

from esm_core import studio as S


@pytest.fixture
def sess(pool):
    s = S.new_session("cpu", live_per_task=16, alpha_per_task=12)
    S.load_demo(s, loader=lambda: pool)
    S.merge(s, "ta", {"alpha": 0.4})
    yield s
    S.close(s)


def _snapshot(s) -> tuple:
    """What a cancelled operation must leave as it was (the caches of finished work may grow)."""
    return ([r["id"] for r in s.merges], id(s.current), dict(s.curves), id(s.esmpp), id(s.routing),
            s.spectra_rows is None)


OPERATIONS = {
    "merge": lambda s, p: S.merge(s, "esm", {"alpha": 0.7, "eig_exp": 0.3}, progress=p),
    "alpha_curve": lambda s, p: S.alpha_curve(s, "ties", {"k": 30.0}, progress=p),
    "full_evaluation": lambda s, p: S.full_evaluation(s, progress=p),
    "routing": lambda s, p: S.run_routing(s, rank=4, per_task=2, progress=p),
    "spectra": lambda s, p: S.spectra(s, progress=p),
}


@pytest.mark.parametrize("op", list(OPERATIONS))
def test_cancel_stops_at_the_next_report_and_changes_nothing(sess, op):
    before = _snapshot(sess)
    seen = []

    def report(frac, desc):
        seen.append(desc)
        if len(seen) == 2:
            S.cancel(sess)                          # the user presses Cancel while the work runs

    with pytest.raises(S.Cancelled, match="cancelled"):
        OPERATIONS[op](sess, S.guarded(sess, report))
    assert len(seen) == 2                           # not one progress report after the Cancel
    assert _snapshot(sess) == before                # no half-written merge, curve, ESM++ model or routing run
    done = OPERATIONS[op](sess, S.guarded(sess))    # a Cancel stops only the work started before it
    assert done is not None
    if op == "merge":
        assert [r["id"] for r in sess.merges] == [1, 2]


def test_closing_a_busy_session_does_not_wait_and_stops_its_work(sess):
    """gradio calls close (the gr.State delete callback) from its event loop: it must return at once, stop the
    running work at its next report and free the session when that work lets go of it."""
    workdir = sess.workdir
    closer = []

    def report(frac, desc):
        if not closer:
            t = threading.Thread(target=S.close, args=(sess,))   # another thread, as gradio's event loop
            t.start()
            t.join(60)
            closer.append(t)

    with pytest.raises(S.Cancelled, match="session was closed"):
        S.merge(sess, "esm", {"alpha": 0.9}, progress=S.guarded(sess, report))
    assert not closer[0].is_alive()                 # close returned while the merge still held the session
    sess._closer.join(60)
    assert sess.pool is None and not sess.merges and not workdir.exists()


def test_a_client_that_left_stops_the_work(sess):
    gone = threading.Event()
    seen = []

    def report(frac, desc):
        seen.append(frac)
        gone.set()                                   # the client disconnects after the first report

    with pytest.raises(S.Cancelled, match="disconnected"):
        S.merge(sess, "ties", {"alpha": 0.5, "k": 40.0}, progress=S.guarded(sess, report, lambda: not gone.is_set()))
    assert len(seen) == 1 and len(sess.merges) == 1
