"""The terminal progress bar (ckptflow/progress.py)."""
import sys

from tests.test_readme import _on_a_terminal


def test_a_bar_always_draws_its_last_state_even_right_after_the_one_before():
    """tqdm draws at most every 0.1 s; two quick steps used to leave '0/2' as the last thing drawn."""
    code = ("from ckptflow import progress\n"
            "with progress.bar(2, 'train', unit='step') as b:\n"
            "    b(1, loss='1.0000')\n"
            "    b(1, loss='0.5000')\n")
    rc, shown = _on_a_terminal([sys.executable, "-c", code])
    assert rc == 0, shown
    assert "2/2" in shown and "loss=0.5000" in shown, shown
