"""EMA of the trained adapter weights: diffusers' `EMAModel` over the LoRA parameters.

`EMAModel` keeps a shadow copy of each parameter and moves it toward the live value after every
optimizer step with decay min(ema_decay, (1 + n) / (10 + n)) at its n-th update (its default warm-up:
early shadows follow the weights closely instead of staying at the zero init). `exported()` swaps
the shadow values into the live parameters for the duration of an export (or a sample), then puts
the trained values back; the shadows' `state_dict()` goes into a resumable state.
"""

from __future__ import annotations

import contextlib


class AdapterEMA:
    """Shadows of `params` (LoRA, LoCon, DoRA, LoHa, LoKr tensors: any list of parameters)."""

    def __init__(self, params, decay: float = 0.999, update_every: int = 1):
        from diffusers.training_utils import EMAModel

        if not 0 < decay < 1:
            raise ValueError(f"ema_decay must be between 0 and 1, got {decay}")
        if update_every < 1:
            raise ValueError(f"ema_update_every must be at least 1, got {update_every}")
        self.params = list(params)
        self.update_every = update_every
        self.ema = EMAModel(self.params, decay=decay)
        self._steps = 0

    def step(self) -> None:
        """Call after each optimizer step; updates the shadows every `update_every` steps."""
        self._steps += 1
        if self._steps % self.update_every == 0:
            self.ema.step(self.params)

    @contextlib.contextmanager
    def exported(self):
        """The EMA values in the live parameters inside the block (export, sample), trained ones after."""
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def shadow(self) -> list:
        return [s.detach().clone() for s in self.ema.shadow_params]

    def state_dict(self) -> dict:
        return {"ema": self.ema.state_dict(), "steps": self._steps}

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state["ema"])
        self.ema.to(device=self.params[0].device)  # a state is read onto the CPU
        self._steps = int(state["steps"])
