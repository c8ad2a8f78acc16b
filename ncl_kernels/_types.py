"""Type aliases of the public signatures (the package ships ``py.typed``)."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

#: ``scale``: a positive number, or a 0-dim floating tensor (which may require grad)
Scale = Union[float, torch.Tensor]
#: an optional tensor argument (targets, masses, biases)
OptTensor = Optional[torch.Tensor]
#: ``weights``: ``(w_row, w_col)``
Weights = Sequence[float]
