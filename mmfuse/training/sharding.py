"""How the trained model is spread over processes: ``ddp`` (replicated) or ``fsdp`` (sharded).

- ``ddp``: every process holds the whole model; accelerate wraps it in torch's
  ``DistributedDataParallel`` (``Accelerator.prepare_model``), which all-reduces the
  gradients in buckets during backward.
- ``fsdp``: torch's FSDP2 (``fully_shard``): each decoder layer of the LM is one unit
  (the classes transformers lists in ``_no_split_modules``), the rest (embeddings,
  norm, head, projectors) the root unit. Parameters, gradients and optimiser state
  live as 1/P shards; a layer's weights are gathered only while it runs. accelerate's
  own FSDP plugin calls the same ``fully_shard``, but accelerate enables it only on
  accelerator devices (``AcceleratorState`` keeps ``MULTI_CPU`` for CPU runs), so the
  CPU/gloo runs that the tests make would never reach it: the wrapping is done here,
  once, for every device.

What both strategies share, and why:

- The forward that DDP/FSDP wrap is ``TokenLoss``: the model *and* the token-loss sum, so
  the loss is computed inside the wrapped module's forward. FSDP needs the root's
  parameters gathered for anything that touches them, and DDP/FSDP both need every
  trainable parameter to take part in every backward: a projector whose modality is
  absent from one process's rows would otherwise have no gradient there and the
  collectives would differ across processes (FSDP2: a reduce-scatter of different sizes,
  a crash; DDP: a hang, or ``find_unused_parameters``' extra graph walk each step).
  ``TokenLoss`` adds ``0 * sum(p)`` for such projectors: an exact zero gradient.
- Every process runs the same number of forward/backward passes per step (DDP's and
  FSDP's collectives run inside them): a process without rows for a micro-step runs a
  *filler* batch whose loss is multiplied by 0.
- The exact token-weighted loss (the mean over the response tokens of the global batch):
  each process back-propagates ``loss_sum * P / global_tokens``. DDP and FSDP average
  gradients over the P processes (divide by P after summing), so the result is
  ``sum over processes of loss_sum / global_tokens``. Neither library has a hook that
  divides by a *token count* known only at step time (DDP's comm hooks and FSDP2's
  ``set_gradient_divide_factor`` take a fixed divisor), so the scale goes into the loss;
  for P a power of two the extra ``* P / P`` is exact in floating point.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .encode import Batch
from .evaluation import token_loss_sum


class TokenLoss(nn.Module):
    """The training forward: the summed token loss of a batch (``evaluation.token_loss_sum``), as a module."""

    def __init__(self, model: nn.Module, autocast=contextlib.nullcontext):
        super().__init__()
        self.model = model
        self.autocast = autocast

    def forward(self, batch: Batch) -> torch.Tensor:
        loss = token_loss_sum(self.model, batch, self.autocast)
        for name, proj in self.model.mm_projectors.items():
            if name not in batch.items:  # see the module docstring: every trainable parameter joins the backward
                for p in proj.parameters():
                    if p.requires_grad:
                        loss = loss + 0.0 * p.sum()
        return loss


def _layer_units(lm: nn.Module) -> list[nn.Module]:
    """The LM's decoder layers (transformers' ``_no_split_modules`` classes): one FSDP unit each."""
    names = set(getattr(lm, "_no_split_modules", None) or [])
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"fsdp: {type(lm).__name__} names no decoder layer class (_no_split_modules)")
    return layers


class Parallel:
    """The model as this process trains it: ``module`` (wrapped ``TokenLoss``) and its trainable parameters."""

    def __init__(self, model: nn.Module, strategy: str, accelerator, autocast=contextlib.nullcontext):
        self.model, self.strategy, self.acc = model, strategy, accelerator
        self.processes = accelerator.num_processes
        self.distributed = self.processes > 1
        self.sharded = self.distributed and strategy == "fsdp"
        loss = TokenLoss(model, autocast)
        if self.sharded:
            from torch.distributed.fsdp import fully_shard

            # FSDP2 hooks a layer's gradient reduce-scatter to its *inputs*' backward: a batch without items
            # under a frozen embedding would feed layer 0 inputs that need no gradient, its reduce-scatter would
            # move to the end of backward on that process only, and the processes' collectives would differ
            model.lm.enable_input_require_grads()
            # process 0's weights, whole (the tensors themselves, no copy); under `accelerate launch` with an FSDP
            # config transformers loads the LM on local process 0 only (`fsdp_cpu_ram_efficient_loading`, on by
            # default) and gives the others zeros, expecting them to be sent from process 0 after wrapping
            whole = loss.state_dict() if accelerator.is_main_process else {}
            for layer in _layer_units(model.lm):
                fully_shard(layer)
            fully_shard(loss)  # the root: embeddings, norm, head and projectors
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(loss, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
            del whole
            self.module = loss
        elif self.distributed:
            self.module = accelerator.prepare_model(loss)  # DistributedDataParallel
        else:
            self.module = loss
        # after fully_shard: FSDP replaces each parameter by its DTensor shard (same names); DDP keeps them
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    @property
    def loss_scale(self) -> float:
        """Multiplies each process's loss before backward: DDP and FSDP average gradients over processes."""
        return float(self.processes) if self.distributed else 1.0

    def sync(self, last: bool):
        """Context for one micro-step's backward: DDP all-reduces only on the step's last micro-step (the sum
        is the same, the traffic 1/grad_accum); FSDP reduce-scatters every micro-step, so only shards of
        the gradients are ever kept (as accelerate does for FSDP)."""
        if self.distributed and not self.sharded and not last:
            return self.acc.no_sync(self.module)
        return contextlib.nullcontext()

    def clip_grad_norm(self, max_norm: float) -> None:
        # over DTensor shards torch computes the norm of the whole gradient (a reduction across processes)
        torch.nn.utils.clip_grad_norm_([p for _, p in self.params], max_norm)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trained parameters, whole, fp32 on CPU, keyed by ``model.named_parameters()`` names. Every process
        must call this (with FSDP each parameter is all-gathered from its shards); only the main process keeps
        them (the others get an empty dict), one parameter at a time."""
        out = {}
        for n, p in self.params:
            t = p.detach().full_tensor() if self.sharded else p.detach()
            if self.acc.is_main_process:
                out[n] = t.to("cpu", torch.float32).contiguous()
        return out

    @torch.no_grad()
    def load_trainable(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the trained parameters from whole tensors (each process keeps its own shard under FSDP)."""
        from torch.distributed.tensor import distribute_tensor

        for n, p in self.params:
            t = tensors[n].to(p.dtype)
            p.copy_(distribute_tensor(t.to(p.device), p.device_mesh, p.placements) if self.sharded else t)

    def optimizer_state(self, optimizer) -> dict:
        """``optimizer.state_dict()``'s format (states keyed by the parameter's index in ``params``) whatever the
        strategy, so a state saved under one strategy resumes under the other. Every process must call this;
        with FSDP only the main process gets the gathered states (the others an empty dict)."""
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        full = get_optimizer_state_dict(self.module, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not full:
            return {}
        index = {name: i for i, name in enumerate(self._fqns())}
        return {"state": {index[k]: v for k, v in full["state"].items()},
                "param_groups": [g | {"params": [index[k] for k in g["params"]]} for g in full["param_groups"]]}

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        """The counterpart of ``optimizer_state`` (the same whole state on every process)."""
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        names = self._fqns()
        by_name = {"state": {names[i]: v for i, v in state["state"].items()},
                   "param_groups": [g | {"params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
        set_optimizer_state_dict(self.module, optimizer, by_name, options=StateDictOptions(full_state_dict=True))

    def _fqns(self) -> list[str]:
        """The trained parameters' names as seen from ``module`` (TokenLoss holds the model as ``model``)."""
        return [f"model.{n}" for n, _ in self.params]

    @torch.no_grad()
    def copy_into(self, target: nn.Module | None) -> None:
        """Every weight and buffer of the trained model, whole, into ``target`` (a model of the same structure,
        on the main process; None elsewhere). Every process must call this: FSDP gathers one tensor at a time
        (DTensor ``full_tensor``), so the main process never holds a second whole copy beside ``target``."""
        from torch.distributed.tensor import DTensor

        own = target.state_dict() if target is not None else None
        for name, t in self.model.state_dict().items():  # the same order on every process
            whole = t.full_tensor() if isinstance(t, DTensor) else t
            if own is not None:
                own[name].copy_(whole)
