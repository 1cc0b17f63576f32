"""Weight averaging while training: airbench's lookahead and an exponential moving average."""

from __future__ import annotations

import copy

import torch

from cifarlab.modelfile import (
    Classifier,
)

# The EMA folds in the weights every EMA_EVERY steps (and at each epoch's end). Its horizon
# is 1/(1 - decay) steps, 100+ for any useful decay, and the weights barely move in 5 steps,
# so the average is practically the same as with per-step updates, while its memory
# traffic (two reads and a write of every weight) drops to a fifth: on a GPU, where an
# airbench step takes milliseconds, a full pass over the weights every step would show.
EMA_EVERY = 5

# airbench's lookahead and whitening-bias timing, as fractions of the run: the whitening
# layer's bias trains for the first 30% of epochs, the lookahead average starts after them.
WARMUP_FRACTION = 0.3
LOOKAHEAD_EVERY = 5


class Lookahead:
    """airbench's lookahead: every few steps, average the weights and reset them to the average.

    The average's decay grows from 0 to 0.95^5 over training (cubic in progress), so it
    barely holds the network back early and smooths strongly at the end, where it works
    like a weight average without a second model for evaluation. BatchNorm running
    statistics are averaged with the weights. At every epoch's end the live weights are the
    average, so a run resumed from a checkpoint restarts it exactly from the loaded weights.
    """

    def __init__(self, model: torch.nn.Module):
        state = model.state_dict()
        self._live = [v for v in state.values() if v.is_floating_point()]
        self._average = [v.detach().clone() for v in self._live]

    @torch.no_grad()
    def update(self, progress: float) -> None:
        decay = 0.95 ** LOOKAHEAD_EVERY * progress ** 3
        torch._foreach_lerp_(self._average, self._live, 1 - decay)
        self.reset_live()

    @torch.no_grad()
    def reset_live(self) -> None:
        torch._foreach_copy_(self._live, self._average)


class WeightEMA:
    """A debiased exponential moving average of a model's weights, held in a second model.

    BatchNorm running statistics are averaged like the weights (as timm's ModelEmaV2 does),
    not copied: the live statistics describe the live weights' activations, while averages
    over the same horizon as the weights approximately describe the averaged weights'.
    Recomputing them with a pass over the training data would be exact but costs an epoch's
    forward passes. Integer buffers (BatchNorm's batch counter) are copied.
    """

    def __init__(self, model: Classifier, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        # state_dict tensors share storage with the parameters, so these lists stay live.
        live, average = model.state_dict(), self.model.state_dict()
        floats = [k for k, v in live.items() if v.is_floating_point()]
        ints = [k for k in live if k not in floats]
        self._live, self._average = [live[k] for k in floats], [average[k] for k in floats]
        self._live_ints, self._average_ints = [live[k] for k in ints], [average[k] for k in ints]

    @torch.no_grad()
    def update(self, steps: int, total_steps: int) -> None:
        """Fold in the live weights after `steps` more steps, `total_steps` in all.

        The weight (1 - d^steps) / (1 - d^total) makes the result the decay-weighted mean of
        the weights seen so far, without the initial weights' bias (the first update copies);
        it depends only on the step count, so a resumed run averages exactly the same way.
        """
        weight = (1 - self.decay ** steps) / (1 - self.decay ** total_steps)
        torch._foreach_lerp_(self._average, self._live, weight)
        if self._live_ints:  # _foreach ops refuse empty lists
            torch._foreach_copy_(self._average_ints, self._live_ints)
