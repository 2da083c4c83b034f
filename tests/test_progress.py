"""The training progress display: plain lines in a log file, a tqdm bar on a terminal, nothing on other ranks."""

from __future__ import annotations

import io
import re

from meanflow.platform.progress import TrainingProgress, format_duration

STATS = {"loss": 0.5, "mse": 12.3, "jvp_norm": 2.3, "grad_norm": 0.41}
NO_COUNTS = {"skip": 0, "rollback": 0}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_after_a_rollback_counts_attempts_not_steps():
    """A rollback moves the step back (40 → 31), never the work done: steps/s and the ETA stay positive."""
    out = io.StringIO()
    progress = TrainingProgress(100, start_step=0, start_attempt=0, stream=out)
    progress.update(40, 40, STATS, NO_COUNTS)
    assert progress.update(31, 45, STATS, {"skip": 0, "rollback": 1}) > 0
    line = out.getvalue().splitlines()[-1]
    rate = float(re.search(r"\| ([0-9.e+-]+) steps/s \|", line).group(1))
    eta = re.search(r"\| ETA (\S+)", line).group(1)
    assert rate > 0 and "-" not in eta and eta != "?"


def test_a_log_line_shows_the_keys_in_order_then_rate_eta_and_nonzero_counts():
    out = io.StringIO()
    progress = TrainingProgress(3000, start_step=0, stream=out)
    assert not progress.interactive   # StringIO is no terminal
    progress.tick(100, STATS, NO_COUNTS)   # nothing when not interactive
    assert out.getvalue() == ""
    progress.update(100, 100, STATS, NO_COUNTS)
    progress.update(200, 203, STATS, {"skip": 2, "rollback": 1})
    first, second = out.getvalue().splitlines()
    fields = first.split(" | ")
    assert fields[:4] == ["step 100/3000", "mse 12.3", "jvp_norm 2.3", "grad_norm 0.41"]
    assert fields[4].endswith(" steps/s") and fields[5].startswith("ETA ") and len(fields) == 6
    assert "loss" not in first and "skips" not in first and "rollbacks" not in first
    assert second.startswith("step 200/3000 | mse 12.3 |") and second.endswith(" | skips 2, rollbacks 1")

    custom = io.StringIO()
    TrainingProgress(10, 0, stream=custom, keys=("grad_norm", "loss")).update(5, 5, STATS, NO_COUNTS)
    assert custom.getvalue().startswith("step 5/10 | grad_norm 0.41 | loss 0.5 | ")


def test_a_terminal_gets_a_bar_with_the_latest_stats_and_no_log_lines():
    out = Terminal()
    progress = TrainingProgress(100, start_step=0, stream=out)
    assert progress.interactive
    for step in range(1, 51):
        progress.tick(step, STATS if step != 50 else None, {"skip": int(step == 50), "rollback": 0})
    assert progress.update(50, 50, STATS, {"skip": 1, "rollback": 0}) > 0
    progress.close()
    progress.close()   # safe twice
    text = out.getvalue()
    last = text.rsplit("\r", 1)[-1]   # tqdm redraws the line after a carriage return
    assert "50/100" in last and "step/s" in last
    assert "mse=12.3, jvp_norm=2.3, grad_norm=0.41, skips=1" in last and "loss" not in last
    assert not re.search(r"step \d+/\d+ \|", text)


def test_a_rollback_moves_the_bar_back():
    out = Terminal()
    progress = TrainingProgress(100, start_step=20, stream=out)
    for step in range(21, 51):
        progress.tick(step, STATS, NO_COUNTS)
    assert progress.bar.n == 50
    progress.tick(31, None, {"skip": 0, "rollback": 1})
    progress.close()
    last = out.getvalue().rsplit("\r", 1)[-1]
    assert "31/100" in last and "mse=12.3" in last and "rollbacks=1" in last


def test_other_ranks_print_nothing_but_still_get_the_rate():
    progress = TrainingProgress(100, start_step=0, stream=None, interactive=True)
    progress.tick(10, STATS, NO_COUNTS)
    assert progress.bar is None and progress.update(10, 10, STATS, NO_COUNTS) > 0
    progress.close()


def test_format_duration():
    assert format_duration(70) == "1m10s" and format_duration(3725) == "1h02m05s"
    assert format_duration(float("inf")) == "?"
