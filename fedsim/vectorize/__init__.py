"""Vectorised clients: K clients' local training at once on one device.

The K clients' parameters and buffers are stacked along a new leading dimension, and
every step runs every client's forward and backward on its own minibatch, in one of two
engines:

* "stacked" (:mod:`fedsim.vectorize.plan`, the default where the model allows it): the model
  traced with torch.fx and run layer by layer on stacked weights with plain autograd,
  one backward for all clients, then torch.optim's fused SGD or Adam kernel on the
  stacks (their single-tensor update written out when settings differ per client);
* "vmap" (any model): PyTorch's model-ensembling recipe, one ``vmap`` of
  ``functional_call`` under ``torch.func.grad_and_value``, with functional optimisers.

Either way each client takes exactly the steps :meth:`fedsim.trainer.ClientTrainer.fit`
would take alone (up to floating-point rounding: the tests pin 1e-5):

* each client's batches are :func:`fedsim.training.batches` drawn from its own
  generator, epoch after epoch, as the sequential loop draws them (so the generators end
  in the same state); a BatchNorm1d model skips a batch of one sample, as ``fit`` does;
* SGD is ``torch.optim.SGD`` (weight decay added to the gradient, momentum buffer equal
  to the first gradient, no dampening, no Nesterov), Adam is ``torch.optim.Adam``'s
  default (betas 0.9, 0.999, eps 1e-8, L2 weight decay added to the gradient, no
  amsgrad), with per-client step counts;
* FedProx adds (mu / 2) * ||w - w_start||^2 with each client's own start and mu;
* a trainer's declared gradient clipping (``gradient_clipping``, FedWon's adaptive
  clipping, :mod:`fedsim.clipping`) clips each client's gradients unit-wise, on every
  parameter but the classifier's, before the optimiser step;
* BatchNorm in train mode updates each client's own running statistics: the buffers
  are passed to ``functional_call`` as fresh per-client copies that BatchNorm updates in
  place, and come back as the auxiliary output of ``grad_and_value``.

Clients with fewer steps (fewer samples, fewer epochs, larger batches) stop when their
batches run out: a step involves only the clients that still have a batch, and the
others' parameters, buffers and optimiser state are not touched. Minibatches of unequal
size at one step (a client's last, short batch) are handled in one of two ways:

* models without BatchNorm: padded to the largest batch with a per-sample mask; the
  loss is the masked mean, so its gradient is the unpadded mean's. This assumes that
  samples do not interact in the forward pass, which holds for every layer but
  BatchNorm among fedsim's models (GroupNorm and LayerNorm normalise per sample);
* models with BatchNorm: a padded sample would enter the batch statistics, so the
  clients of a step are grouped by batch size and each group takes its own vmapped step
  (no padding at all). A step where every client has a full batch, most of them, is one
  call; a step with short batches costs one more call per distinct size.

Not covered: models whose forward draws random numbers (dropout: the sequential trainer
draws from the global generator, which cannot be reproduced per client), BatchNorm with
``momentum=None`` (a cumulative average that reads ``num_batches_tracked`` as a Python
number), a parameter the loss does not use (``torch.optim`` skips a parameter whose
gradient is None, so it gets no weight decay there; here its gradient is zero and weight
decay and momentum still apply), trainers that change the loss, the step or the loop in
ways this package does not know (:func:`vectorizable`).

The package, by the order a reader meets it:

* :mod:`~fedsim.vectorize.fit`: :func:`fit_clients` and :func:`train_clients`, the
  stacking of the clients' states, and :func:`vectorizable`;
* :mod:`~fedsim.vectorize.batches`: each client's batches and the groups that step together;
* :mod:`~fedsim.vectorize.vmap_step` and :mod:`~fedsim.vectorize.stacked_step`: the two
  engines' training loops;
* :mod:`~fedsim.vectorize.optimizers`: SGD, Adam and FedWon's clipping on stacks;
* :mod:`~fedsim.vectorize.plan` and :mod:`~fedsim.vectorize.layers`: the stacked forward;
* :mod:`~fedsim.vectorize.memory`: how many clients fit at once (``"auto"``).
"""

from fedsim.vectorize.fit import KNOWN_METHODS, ClientFit, fit_clients, train_clients, vectorizable
from fedsim.vectorize.memory import auto_k, available_bytes, choose_k, estimate_bytes_per_client

__all__ = [
    "KNOWN_METHODS",
    "ClientFit",
    "auto_k",
    "available_bytes",
    "choose_k",
    "estimate_bytes_per_client",
    "fit_clients",
    "train_clients",
    "vectorizable",
]
