"""What a run reports while it trains: the progress bar and tracker log, and the counts of skipped samples."""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from typing import Any

from .checkpoint import TrainState
from .config import TrainConfig

log = logging.getLogger("lookalike.train")


class Progress:
    """The tqdm bar (loss, samples/s, lr, skipped), the tracker log and the per-step timings."""

    def __init__(self, acc: Any, config: TrainConfig, state: TrainState) -> None:
        from tqdm.auto import tqdm

        self.acc, self.per_step = acc, config.batch_size * acc.num_processes * config.grad_accum
        self.bar = tqdm(total=config.steps, initial=state.step, disable=not acc.is_main_process, desc="train",
                        unit="step")
        self.start, self.start_step, self.recent = time.perf_counter(), state.step, deque(maxlen=20)

    def update(self, state: TrainState, loss: float, lr: float, skipped: int) -> None:
        self.recent.append(loss)
        rate = (state.step - self.start_step) * self.per_step / (time.perf_counter() - self.start)
        self.bar.set_postfix(loss=f"{sum(self.recent) / len(self.recent):.4f}", samples_s=f"{rate:.2f}",
                             lr=f"{lr:.2e}", skipped=skipped)
        self.bar.update(1)
        self.acc.log({"loss": loss, "lr": lr, "samples_per_s": rate}, step=state.step)


def sum_skips(accelerator: Any, state: TrainState, new: Counter) -> None:
    """Add every process's new skip counts into the shared state (a collective call)."""
    from accelerate.utils import gather_object

    total = Counter(state.skipped)
    for counts in gather_object([dict(new)]):
        total.update(counts)
    state.skipped = dict(total)
    new.clear()


def note_skips(skipped: list[tuple[str, str, str]], new: Counter, seen: set) -> None:
    """Count a batch's skipped samples by reason; warn once per record."""
    for reason, key, detail in skipped:
        new[reason] += 1
        if key not in seen:
            seen.add(key)
            log.warning("skipped %s: %s", key, detail)
