"""Which weights the loop's outputs show: what trains is not always what is written.

- `use_ema`: an exponential moving average of the adapter weights (shared/ema.py's `AdapterEMA` over
  diffusers' `EMAModel`), updated after each optimizer step and written in place of the last weights;
- a schedule-free optimizer: the average of its iterates (shared/training/optim.py `averaged_weights`).

`exported_weights` puts them in the parameters for a block (a checkpoint, an evaluation, samples) and
the trained values back after it; `final_weights` puts them in for good once training is over. The
EMA's shadows go into the resumable state (`state_dict` / `load_state_dict`).
"""

from __future__ import annotations

import contextlib

from shared.training.optim import averaged_weights


def build_ema(cfg, params):
    """The EMA of `params` when the config asks for one, else None."""
    if not getattr(cfg, "use_ema", False):
        return None
    from shared.ema import AdapterEMA

    return AdapterEMA(params, cfg.ema_decay, cfg.ema_update_every)


@contextlib.contextmanager
def exported_weights(optimizer, ema):
    """The weights the outputs show in the parameters for the block; the trained ones after it."""
    with averaged_weights(optimizer), (ema.exported() if ema is not None else contextlib.nullcontext()):
        yield


def final_weights(optimizer, ema) -> None:
    """After the last step: the weights the outputs show, for good (the final evaluation, the published
    adapter and what is made from it)."""
    if "train_mode" in optimizer.param_groups[0]:
        optimizer.eval()
    if ema is not None:
        ema.ema.copy_to(ema.params)
