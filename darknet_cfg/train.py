"""Darknet-faithful training driven by the cfg (``darknet detector train`` semantics).

What follows Darknet exactly:

* learning rate: ``get_current_rate`` (burn_in ``lr*(i/burn_in)^power``, then the policy: constant,
  step, steps, exp, poly, sigmoid, sgdr, random), evaluated after each iteration's
  ``seen += batch`` with ``batch_num = seen/(batch*subdivisions)`` = the iteration number;
* SGD: ``update_network`` (``v = momentum*v - grad_sum - decay*B*W;  W += rate/B * v`` with
  B = batch*subdivisions images per iteration; decay only on conv/connected/shortcut ``weights``,
  never on biases or batch-norm scales) -- the same as ``torch.optim.SGD`` with
  ``lr=rate/B, momentum, weight_decay=decay*B`` for the weights and no decay for the rest;
* Adam (``adam=1`` with ``B1``, ``B2``, ``eps``): darknet's ``adam_update_gpu`` for the tensors of
  [convolutional] and [implicit] layers (``DarknetAdam``; the other layers keep the SGD above);
* gradient accumulation over ``subdivisions`` mini-batches of ``batch/subdivisions`` images; the
  loss is darknet's (``loss.py``, its gradient is ``-l.delta`` summed over the images);
* the reported loss is ``train_network``'s ``sum over subdivisions of mean(layer costs) /
  (subdivisions*mini_batch)`` and ``avg_loss = 0.9*avg_loss + 0.1*loss``;
* multi-scale training (``random`` of the last layer, resized every 10 iterations, largest size
  first and for the last 100 iterations), checkpoints ``<cfg>_last.weights`` (every 100
  iterations), ``<cfg>_<iteration>.weights`` (every 1000, every 10000 after 10000),
  ``<cfg>_best.weights`` (best mAP with --map), ``<cfg>_final.weights``; header
  ``seen = iteration*batch*subdivisions``; resuming from a .weights file continues at
  ``seen/(batch*subdivisions)``; atomic writes.

Batch-norm in training mode: darknet normalises with the UNBIASED batch variance; PyTorch's
BatchNorm with the biased one. ``use_darknet_batchnorm(model)`` (on by default in the trainer)
calls the native kernel with the weight scaled by ``sqrt((n-1)/n)`` and eps by ``(n-1)/n`` (an
identity: that is darknet's forward), so it costs nothing extra and autograd gives the exact
gradient of that forward (darknet's own CPU BN
backward is an approximation; the oracle's variant_fixed shows the difference is ~1e-3 relative).
Running statistics: both use ``0.9*rolling + 0.1*batch`` with the unbiased variance.

Several processes (torchrun): gradients are summed and the running statistics averaged after
each iteration (``_sync_gradients_and_stats``); each process normalises with its own images'
statistics. ``sync_bn`` (``--sync-bn``, CUDA/NCCL only) converts BatchNorm to
``torch.nn.SyncBatchNorm`` after the initial broadcast: batch statistics over all processes'
images (as one process with the whole batch would compute them, darknet's unbiased variance
kept), running statistics then identical everywhere and no longer averaged.
"""
from __future__ import annotations

import math
import os
import sys
import time
import types
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .converters.weights import remove_stale_partials
from .errors import DarknetError
from .loss import RegionLossParams, YoloLossParams, region_loss, yolo_loss
from .options import CfgWarning
from .runtime import cudnn_autotune, exact_float32, keep_freed_memory

__all__ = ["get_current_rate", "darknet_param_groups", "darknet_adam_params", "DarknetAdam",
           "make_optimizer", "set_rate",
           "use_darknet_batchnorm", "convert_sync_batchnorm", "HeadLoss", "train_step_loss", "Trainer", "TrainOptions",
           "images_per_iteration", "checkpoint_names", "DarknetEMA"]


# ----------------------------------------------------------------------------- LR schedule
def get_current_rate(settings: Dict, batch_num: int, rand=None) -> float:
    """Darknet's get_current_rate for ``batch_num = seen/(batch*subdivisions)``."""
    lr = float(settings.get("learning_rate", 0.001))
    burn_in = int(settings.get("burn_in", 0) or 0)
    power = float(settings.get("power", 4.0))
    if batch_num < burn_in:
        return lr * math.pow(batch_num / burn_in, power)
    policy = settings.get("policy", "constant")
    if policy == "constant":
        return lr
    if policy == "step":
        return lr * math.pow(float(settings.get("scale", 1.0)), batch_num // int(settings.get("step", 1)))
    if policy == "steps":
        rate = lr
        for st, sc in zip(settings.get("steps") or [], settings.get("scales") or []):
            if st > batch_num:
                return rate
            rate *= sc
        return rate
    if policy == "exp":
        return lr * math.pow(float(settings.get("gamma", 1.0)), batch_num)
    if policy == "poly":
        mb = int(settings.get("max_batches", 0) or 0)
        base = 1 - batch_num / mb if mb else 0.0
        return lr * math.pow(base, power) if base > 0 or power == int(power) else 0.0
    if policy == "sigmoid":
        g, step = float(settings.get("gamma", 1.0)), int(settings.get("step", 1))
        z = g * (batch_num - step)
        return lr * (1.0 / (1.0 + math.exp(z))) if z < 700 else 0.0
    if policy == "random":
        u = (rand or np.random).random()
        return lr * math.pow(u, power)
    if policy == "sgdr":
        last = 0
        cycle = int(settings.get("sgdr_cycle") or settings.get("max_batches", 0) or 1)
        mult = int(settings.get("sgdr_mult", 2))
        while last + cycle < batch_num:
            last += cycle
            cycle *= mult
        lr_min = float(settings.get("learning_rate_min", 0.00001))
        return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos((batch_num - last) * 3.14159265 / cycle))
    return lr                                           # darknet: "Policy is weird!"


def images_per_iteration(settings: Dict) -> Tuple[int, int, int]:
    """(mini_batch, subdivisions, images per iteration) as darknet computes them."""
    batch, sub = int(settings.get("batch", 1)), int(settings.get("subdivisions", 1))
    mini = max(1, batch // sub)
    return mini, sub, mini * sub


# ------------------------------------------------------------------------------ optimizer
def darknet_param_groups(model: nn.Module) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """(decayed, not decayed) parameters: darknet applies decay to the tensors its .weights calls
    ``weights`` (conv, connected, local, shortcut, implicit), not to biases or BN scales."""
    decay, seen = [], set()
    for m in model.modules():
        if hasattr(m, "darknet_tensors"):
            for name, t in m.darknet_tensors():
                if isinstance(t, nn.Parameter) and name.split(".")[-1] == "weights" and id(t) not in seen:
                    decay.append(t)
                    seen.add(id(t))
    no_decay = [p for p in model.parameters() if id(p) not in seen and p.requires_grad]
    return decay, no_decay


def darknet_adam_params(model: nn.Module) -> List[nn.Parameter]:
    """The tensors darknet updates with Adam when ``adam=1``: weights, biases and BN scales (and
    the BN shift, darknet's ``biases`` of a BN convolution) of [convolutional] layers, and the
    weights of [implicit] layers. Other layers (connected, shortcut, batchnorm ...) keep SGD."""
    from .layers.conv import ConvBnAct
    from .layers.misc import Implicit
    out, seen = [], set()
    for m in model.modules():
        if isinstance(m, ConvBnAct) and m._shared is None:
            tensors = [m.conv.weight, m.conv.bias]
            if m.bn is not None:
                tensors += [m.bn.weight, m.bn.bias]
        elif isinstance(m, Implicit):
            tensors = [m.weight]
        else:
            continue
        for t in tensors:
            if isinstance(t, nn.Parameter) and t.requires_grad and id(t) not in seen:
                out.append(t)
                seen.add(id(t))
    return out


class DarknetAdam(torch.optim.Optimizer):
    """Darknet's ``adam=1`` update (``update_convolutional_layer_gpu`` -> ``adam_update_gpu``;
    darknet's CPU build has no Adam and silently runs SGD).

    For the groups with ``adam=True``, with ``g`` = the gradient summed over the iteration's
    images plus ``decay*B*W`` (darknet's update buffer is ``-g``) and ``t`` the iteration number
    (``get_current_batch`` at the update)::

        m = B1*m + (1-B1)*g;   v = B2*v + (1-B2)*g^2
        W -= rate * (m / (1-B1^t)) / (sqrt(v / (1-B2^t)) + eps)

    with the full ``rate`` (not ``rate/B``). Darknet passes the decay to every Adam tensor, so
    biases and BN scales are decayed too (unlike its SGD). The other groups follow darknet's SGD,
    exactly as ``torch.optim.SGD(lr=rate/B, momentum, weight_decay=decay*B)``. ``set_rate`` sets
    ``lr``, ``weight_decay`` and ``t`` of each group."""

    def __init__(self, params, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 momentum: float = 0.9):
        defaults = dict(lr=0.0, weight_decay=0.0, momentum=momentum, betas=tuple(betas), eps=eps,
                        adam=False, t=None)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            lr, wd = g["lr"], g["weight_decay"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=wd) if wd else p.grad
                st = self.state[p]
                if g["adam"]:
                    b1, b2 = g["betas"]
                    if not st:
                        st["step"] = 0
                        st["m"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                        st["v"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["step"] += 1
                    t = g["t"] if g["t"] is not None else st["step"]
                    st["m"].mul_(b1).add_(d, alpha=1 - b1)
                    st["v"].mul_(b2).addcmul_(d, d, value=1 - b2)
                    denom = (st["v"] / (1 - b2 ** t)).sqrt_().add_(g["eps"])
                    p.addcdiv_(st["m"], denom, value=-lr / (1 - b1 ** t))
                else:
                    buf = st.get("momentum_buffer")
                    if buf is None:
                        buf = st["momentum_buffer"] = d.detach().clone()
                    else:
                        buf.mul_(g["momentum"]).add_(d)
                    p.add_(buf, alpha=-lr)
        return loss


def make_optimizer(model: nn.Module, settings: Dict) -> torch.optim.Optimizer:
    """Darknet's optimizer for the cfg: SGD (``torch.optim.SGD``), or ``DarknetAdam`` when
    ``adam=1``."""
    decay, no_decay = darknet_param_groups(model)
    mom = float(settings.get("momentum", 0.9))
    if int(settings.get("adam", 0) or 0):
        adam = darknet_adam_params(model)
        ids = {id(p) for p in adam}
        groups = [dict(params=adam, darknet_decay=True, adam=True),
                  dict(params=[p for p in decay if id(p) not in ids], darknet_decay=True),
                  dict(params=[p for p in no_decay if id(p) not in ids], darknet_decay=False)]
        betas = (float(settings.get("B1", 0.9)), float(settings.get("B2", 0.999)))
        return DarknetAdam([g for g in groups if g["params"]], betas=betas,
                           eps=float(settings.get("eps", 0.000001)), momentum=mom)
    groups = [dict(params=decay, darknet_decay=True), dict(params=no_decay, darknet_decay=False)]
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(groups, lr=0.0, momentum=mom, dampening=0.0, weight_decay=0.0)


def set_rate(opt: torch.optim.Optimizer, rate: float, settings: Dict, batch: int,
             iteration: Optional[int] = None) -> None:
    """lr = rate/batch, weight_decay = decay*batch (decay group only): darknet's update_network.
    Adam groups: lr = rate, weight_decay = decay*batch, t = ``iteration`` (None: count steps)."""
    decay = float(settings.get("decay", 0.0001))
    for g in opt.param_groups:
        if g.get("adam"):
            g["lr"], g["t"] = rate, iteration
        else:
            g["lr"] = rate / batch
        g["weight_decay"] = decay * batch if g.get("darknet_decay") else 0.0


# -------------------------------------------------------------------------------- batchnorm
def _darknet_bn_forward(self, x):
    if not self.training:
        return self._torch_forward(x)
    n = x.numel() // x.shape[1]
    if n < 2:
        return self._torch_forward(x)
    # (x - m) / sqrt(v*n/(n-1) + eps) == sqrt((n-1)/n) * (x - m) / sqrt(v + eps*(n-1)/n): torch's
    # fused batch norm with a scaled weight and eps gives darknet's unbiased normalisation in
    # one pass (the running statistics do not depend on eps)
    f = (n - 1) / n
    return F.batch_norm(x, self.running_mean, self.running_var, self.weight * math.sqrt(f),
                        self.bias, True, self.momentum, self.eps * f)


def _darknet_sync_bn_forward(self, x):
    """SyncBatchNorm with darknet's unbiased normalisation over ALL processes' images: the
    same scaled weight / eps identity with n = the global count (every process trains the same
    mini-batch shape, so n = world * local n). Without a process group of 2+: as BatchNorm."""
    import torch.distributed as dist
    if not (self.training and dist.is_available() and dist.is_initialized()):
        return _darknet_bn_forward(self, x)
    group = self.process_group or dist.group.WORLD
    world = dist.get_world_size(group)
    if world == 1:
        return _darknet_bn_forward(self, x)
    if x.device.type == "cpu":
        return self._torch_forward(x)  # torch refuses CPU tensors here (ValueError)
    return _sync_bn_apply(self, x, group, world)


def _sync_bn_apply(bn, x, group, world: int):
    from torch.nn.modules._functions import SyncBatchNorm as SyncBNFunction
    n = world * (x.numel() // x.shape[1])
    if n < 2:
        return bn._torch_forward(x)
    f = (n - 1) / n
    return SyncBNFunction.apply(x, bn.weight * math.sqrt(f), bn.bias, bn.running_mean,
                                bn.running_var, bn.eps * f, bn.momentum, group, world)


def use_darknet_batchnorm(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Make every BatchNorm of ``model`` normalise with the unbiased batch variance in training
    mode (darknet's forward_batchnorm_layer); eval mode is unchanged. SyncBatchNorm modules
    (``convert_sync_batchnorm``) get the same over the whole process group."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if enabled:
                if not hasattr(m, "_torch_forward"):
                    m._torch_forward = m.forward
                fwd = _darknet_sync_bn_forward if isinstance(m, nn.SyncBatchNorm) \
                    else _darknet_bn_forward
                m.forward = types.MethodType(fwd, m)
            elif hasattr(m, "_torch_forward"):
                m.forward = m._torch_forward
    return model


def convert_sync_batchnorm(model: nn.Module, darknet_bn: bool = True) -> nn.Module:
    """Every BatchNorm of ``model`` as ``torch.nn.SyncBatchNorm`` (batch statistics over all
    processes of the group; the module is changed in place and returned); with ``darknet_bn``
    normalising with darknet's unbiased variance (``use_darknet_batchnorm``). Parameters and
    buffers are the same tensors under the same names (``.bn``), so .weights / state_dict saving
    and loading are unchanged."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # new modules, the same tensors
    if darknet_bn:
        use_darknet_batchnorm(model)
    return model


# -------------------------------------------------------------------------------------- EMA
class DarknetEMA:
    """Darknet's ``ema_alpha`` (``train_network_waitkey`` after ``update_network``, network.c).

    With ``cur`` the iteration just finished (after its update), ``start = max_batches/2`` and
    ``apply = max_batches - 1000`` (integer arithmetic)::

        if ema_alpha and cur >= start:
            if no EMA weight is non-zero: ema = 0*ema + 1*W      # ema_update(net, 0): a copy
            if cur == apply:   W = ema                          # ema_apply, once
            elif cur < apply:  ema = alpha*ema + (1-alpha)*W    # ema_update(net, alpha)

    for the [convolutional] layers only (not shared ones): ``weights``, ``biases`` (the BN shift
    of a batch-normalised one) and BN ``scales``; never the rolling mean/variance (darknet's
    comment says they would need recomputing; it does not). Nothing else reads the EMA: mAP
    during training and every checkpoint use the live weights, which ARE the average from
    ``apply`` on (training continues from it for the last 1000 iterations). So a run with
    ``max_batches < 2000`` never applies it (``apply < start``): the EMA is only initialised.
    Arithmetic in float32 as darknet's: ``alpha*ema`` and ``(1-alpha)*W`` rounded, then added.
    This is darknet's CPU build; its GPU build's ``ema_apply`` also pushes the layer's CPU copies
    of the rolling statistics and momentum buffers, pulled one iteration earlier (a one-iteration
    step back for those), which is not reproduced."""

    def __init__(self, model: nn.Module, alpha: float):
        from .layers.conv import ConvBnAct
        self.alpha = float(np.float32(alpha))
        self.one_minus = float(np.float32(1) - np.float32(alpha))  # darknet: float (1 - ema_alpha)
        self.tensors: List[torch.Tensor] = []   # weights first (is_ema_initialized reads them)
        rest: List[torch.Tensor] = []
        for m in getattr(model, "layers", []):
            if isinstance(m, ConvBnAct) and m._shared is None:
                self.tensors.append(m.conv.weight)
                rest += [m.bn.bias, m.bn.weight] if m.bn is not None else [m.conv.bias]
        self.n_weights = len(self.tensors)
        self.tensors += [t for t in rest if t is not None]
        self.ema: Optional[List[torch.Tensor]] = None

    def initialized(self) -> bool:
        """darknet's is_ema_initialized: some conv weights_ema value is non-zero."""
        return self.ema is not None and any(bool(e.ne(0).any()) for e in self.ema[:self.n_weights])

    @torch.no_grad()
    def update(self, alpha: float, one_minus: float) -> None:
        if self.ema is None:
            self.ema = [torch.zeros_like(t) for t in self.tensors]   # darknet: xcalloc
        for e, t in zip(self.ema, self.tensors):
            torch.add(e * alpha, t.detach() * one_minus, out=e)

    @torch.no_grad()
    def step(self, cur: int, max_batches: int) -> Optional[str]:
        """Darknet's EMA step after iteration ``cur``: None (nothing), "init" (the copy, then
        the first update), "update" or "apply"."""
        start, apply_at = max_batches // 2, max_batches - 1000
        if not self.alpha or cur < start:
            return None
        did = None
        if not self.initialized():
            self.update(0.0, 1.0)
            did = "init"
        if cur == apply_at:
            for e, t in zip(self.ema, self.tensors):
                t.copy_(e)
            return "apply"
        if cur < apply_at:
            self.update(self.alpha, self.one_minus)
            return did or "update"
        return did


# ------------------------------------------------------------------------------------- loss
class HeadLoss:
    """Darknet's loss of every detection layer of ``model`` (built once from the specs)."""

    def __init__(self, model):
        self.heads = []
        for spec in model.heads:
            if spec.type == "yolo":
                self.heads.append((spec, yolo_loss, YoloLossParams.from_spec(spec)))
            elif spec.type == "region":
                self.heads.append((spec, region_loss, RegionLossParams.from_spec(spec)))
            else:
                raise DarknetError(f"training a [{spec.section}] layer (layer {spec.index}) is not "
                                   "supported: only [yolo] and [region]")
        if not self.heads:
            raise DarknetError("the cfg has no [yolo]/[region] layer to train")
        self.classes = {p.classes for _, _, p in self.heads}

    def __call__(self, outs, targets, net_w: int, net_h: int, seen: int):
        """(sum of the layer losses: gradient = -delta summed over images, list of stats)."""
        total, stats = None, []
        # the loss works on small tensors (the vectorised yolo_loss too: cache-sized blocks, a
        # table of the assigned slots): one thread avoids OpenMP synchronisation costs that
        # dominate when the cores are shared (bench/loss.py on 2 shared cores: 2 threads were
        # 2-20x slower than 1); on CUDA only the small CPU-side planning runs here
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            results = [fn(x, targets, params, net_w, net_h, seen=seen)
                       for (spec, fn, params), x in zip(self.heads, outs)]
        finally:
            torch.set_num_threads(threads)
        for loss, st in results:
            for key in ("assignments", "output", "delta"):
                dict.pop(st, key, None)          # without building LossStats' lazy values
            total = loss if total is None else total + loss
            stats.append(st)
        return total, stats


def train_step_loss(model, head_loss: HeadLoss, images, targets, seen: int,
                    amp: Optional[torch.dtype] = None, scaler=None):
    """Forward + loss + backward of one mini-batch; returns darknet's network cost (mean of the
    layer costs) and the per-layer stats. ``amp``: the network runs under autocast in that
    dtype (float16 on CUDA, as Darknet's CUDNN_HALF; bfloat16 on CPU) and the loss in float32;
    ``scaler``: a GradScaler for float16 gradients."""
    with torch.autocast(images.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        outs = model(images)
    if amp is not None:
        outs = [o.float() for o in outs]
    total, stats = head_loss(outs, targets, images.shape[3], images.shape[2], seen)
    (scaler.scale(total) if scaler is not None else total).backward()
    return float(np.mean([s["cost"] for s in stats])), stats


def amp_dtype(device: torch.device, enabled: bool) -> Optional[torch.dtype]:
    """Autocast dtype of ``--amp``: float16 on CUDA (with loss scaling), bfloat16 on CPU."""
    if not enabled:
        return None
    return torch.float16 if device.type == "cuda" else torch.bfloat16


# ------------------------------------------------------------------------------ checkpoints
def checkpoint_names(backup: str, cfg_path: str) -> Dict[str, str]:
    base = os.path.splitext(os.path.basename(cfg_path))[0]
    j = lambda s: os.path.join(backup, f"{base}_{s}.weights")  # noqa: E731
    return dict(base=base, last=j("last"), final=j("final"), best=j("best"),
                iteration=os.path.join(backup, base + "_{}.weights"))


def _save(model, path: str, seen: int) -> None:
    from .converters.weights import save_weights
    model.header = dict(major=0, minor=2, revision=5, seen=int(seen))
    save_weights(model, path)


# ------------------------------------------------------------------------------ distributed
def _init_distributed(device: torch.device) -> Tuple[int, int, bool]:
    """(rank, world size, whether we created the process group). torchrun sets WORLD_SIZE."""
    import torch.distributed as dist
    if not dist.is_available():
        return 0, 1, False
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, False
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), True


def _broadcast_module(model: nn.Module) -> None:
    """Every process starts from rank 0's parameters and buffers."""
    import torch.distributed as dist
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, 0)


def _sync_gradients_and_stats(model: nn.Module, cost: float, stats: bool = True) -> float:
    """Sum the gradients over the processes (darknet sums over the images of an iteration),
    average the batch-norm running statistics (every process then holds the same model) and sum
    the reported cost. One all_reduce of a flat buffer. ``stats=False`` (--sync-bn: every
    process already computed the same running statistics from the global batch) skips them."""
    import torch.distributed as dist
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    stats = [b for n, b in model.named_buffers()
             if n.endswith(("running_mean", "running_var"))] if stats else []
    dev = grads[0].device if grads else (stats[0].device if stats else torch.device("cpu"))
    world = dist.get_world_size()
    flat = torch.cat([g.reshape(-1) for g in grads] + [b.reshape(-1) / world for b in stats]
                     + [torch.tensor([cost], dtype=torch.float32, device=dev)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    k = 0
    for t in grads + stats:
        n = t.numel()
        t.copy_(flat[k:k + n].view_as(t))
        k += n
    return float(flat[k].item())


# ---------------------------------------------------------------------------------- trainer
def _worker_init(_worker_id: int) -> None:
    """Data workers decode and resize single-threaded (the cores belong to the training step)."""
    try:
        import cv2
        cv2.setNumThreads(1)
    except ImportError:
        pass
    torch.set_num_threads(1)


UNSUPPORTED_NET = {"cutmix": 0, "contrastive": 0, "track": 0, "dynamic_minibatch": 0,
                   "adversarial_lr": 0.0, "attention": 0, "unsupervised": 0}
# why a key is ignored, where darknet ignores it too
_UNSUPPORTED_WHY = {"cutmix": "darknet's detector ignores it too: CutMix is for classifiers "
                              "(with mosaic=1 the mosaic runs)"}


def _unsupported_warnings(model) -> List[str]:
    """One message per training key the cfg sets that this trainer does not implement."""
    cfg, msgs = model.graph.cfg, []
    net = cfg.sections[0]
    for key, default in UNSUPPORTED_NET.items():
        opt = net.get(key)
        if opt is not None:
            try:
                v = float(opt.value.split("#")[0] or 0)
            except ValueError:
                v = 1.0
            if v != default:
                why = f" ({_UNSUPPORTED_WHY[key]})" if key in _UNSUPPORTED_WHY else ""
                msgs.append(f"{cfg.path}:{opt.line}: [net] {key}={opt.value} is not supported by "
                            f"the trainer and is ignored{why}")
    for spec in model.graph.layers:
        sec = cfg.sections[spec.index + 1]
        for key in ("stopbackward", "train_only_bn", "learning_rate", "map", "embedding_layer"):
            opt = sec.get(key)
            if opt is None:
                continue
            if key == "learning_rate" and _num(opt.value) == 1.0:
                continue
            if key in ("stopbackward", "train_only_bn") and _num(opt.value) == 0:
                continue
            msgs.append(f"{cfg.path}:{opt.line}: [{sec.name}] {key}={opt.value} is not supported by "
                        "the trainer and is ignored")
    return msgs


def _num(v: str) -> float:
    try:
        return float(v.split("#")[0])
    except ValueError:
        return float("nan")


@dataclass
class TrainOptions:
    data: str
    cfg: str
    weights: Optional[str] = None
    clear: bool = False
    device: str = "cpu"
    workers: Optional[int] = None  # None: auto (see Trainer.workers)
    max_batches: Optional[int] = None
    calc_map: bool = False
    map_every: Optional[int] = None
    backup: Optional[str] = None
    seed: int = 0
    progress: bool = True
    threads: Optional[int] = None
    darknet_bn: bool = True
    sync_bn: bool = False            # multi-process CUDA: BatchNorm over all processes' images
    channels_last: Optional[bool] = None  # None: on for CPU (oneDNN's NHWC kernels are faster)
    #                                       and for --amp on CUDA (tensor cores)
    winograd: Optional[bool] = None  # wide 3x3 convolutions and their gradients by Winograd
    #                                  (None: on for CPU, where it is 1.1-1.2x faster)
    amp: bool = False                # mixed precision: float16 + loss scaling on CUDA (Darknet's
    #                                  CUDNN_HALF), bfloat16 autocast on CPU; default float32
    augment: bool = True
    sets: Tuple[str, ...] = ()            # --set key=value overrides of the cfg (overrides.py)
    finetune_at: Optional[float] = None   # staged augmentation: <= 1 a fraction of max_batches,
    #                                       > 1 an iteration; then finetune_cfg/finetune_sets apply
    finetune_sets: Tuple[str, ...] = ()
    finetune_cfg: Optional[str] = None
    log: Optional[object] = None          # callable(str) for messages; default: print to stderr
    on_iteration: Optional[object] = None  # callable(trainer, info dict) after each iteration
    history: List[Dict] = field(default_factory=list)


class Trainer:
    """``darknet detector train`` in PyTorch. ``Trainer(TrainOptions(...)).run()``."""

    def __init__(self, opts: TrainOptions):
        from . import build_model, load_weights
        from .data import (AugmentParams, DataError, DetectionDataset, read_data_file, read_list,
                           scan_dataset)
        self.o = o = opts
        if o.threads:
            torch.set_num_threads(o.threads)
        self.device = torch.device(o.device)
        self.rank, self.world, self._own_pg = _init_distributed(self.device)
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        log = o.log or (lambda m: print(m, file=sys.stderr))
        self.log = log if self.rank == 0 else (lambda m: None)
        self.sync_bn = self._check_sync_bn()
        torch.manual_seed(o.seed)
        self.data = read_data_file(o.data)
        from .overrides import apply_sets
        from .reader import read_cfg
        model = build_model(apply_sets(read_cfg(o.cfg), o.sets))
        self.net = model.graph.net
        self.settings = dict(self.net.settings)
        if o.max_batches is not None:
            self.settings["max_batches"] = int(o.max_batches)
        self.max_batches = int(self.settings.get("max_batches") or 0)
        if self.max_batches <= 0:
            raise DataError(f"{o.cfg}: max_batches is 0: set max_batches in [net] or --max-batches")
        self.head_loss = HeadLoss(model)
        classes = sorted(self.head_loss.classes)
        if len(classes) != 1 or classes[0] != self.data.classes:
            raise DataError(f"classes mismatch: {o.data} has classes={self.data.classes} but the "
                            f"detection layers of {o.cfg} have classes={','.join(map(str, classes))}")
        for m in (_unsupported_warnings(model) if self.rank == 0 else []):
            warnings.warn(m, CfgWarning)
        if o.weights:
            report = load_weights(model, o.weights, strict=False)
            self.log(f"loaded {o.weights}: {report.layers_loaded} layers, seen={model.header['seen']}")
        self.mini, self.sub, self.B_local = images_per_iteration(self.settings)
        self.B = self.B_local * self.world        # images per iteration, all processes together
        self.iteration = 0 if (o.clear or not o.weights) else int(model.header.get("seen", 0)) // self.B
        if o.darknet_bn:
            use_darknet_batchnorm(model)
        self.model = model.to(self.device)
        if self.world > 1:
            _broadcast_module(self.model)
        if self.sync_bn:  # after the broadcast: the same tensors, now synchronised in training
            self.model = convert_sync_batchnorm(self.model, darknet_bn=o.darknet_bn)
        if self.device.type == "cpu":
            keep_freed_memory()  # see runtime.py: no page faults for the batch's activations
        # channels_last: oneDNN's NHWC kernels on CPU; tensor cores with --amp on CUDA
        cl = o.channels_last if o.channels_last is not None else \
            (self.device.type == "cpu" or (self.device.type == "cuda" and o.amp))
        self.memory_format = torch.channels_last if cl else torch.contiguous_format
        if cl:
            self.model.to(memory_format=torch.channels_last)
        if (o.winograd if o.winograd is not None else True) and self.device.type == "cpu":
            self.model.winograd_training()
        self.opt = make_optimizer(self.model, self.settings)
        self.amp = amp_dtype(self.device, o.amp)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp == torch.float16 else None
        self.ema = DarknetEMA(self.model, float(self.settings.get("ema_alpha") or 0.0))
        # data
        if not self.data.train:
            raise DataError(f"{o.data}: no train= list")
        scan = scan_dataset(read_list(self.data.train), self.data.classes,
                            report=self._warn if self.rank == 0 else (lambda m: None))
        self.log(scan.summary("train"))
        if not scan.images:
            raise DataError(f"{self.data.train}: no usable image")
        self.scan = scan
        self.val_scan = None
        if o.calc_map:
            vlist = self.data.valid or self.data.train
            self.val_scan = scan_dataset(read_list(vlist), self.data.classes, report=self._warn)
            self.log(self.val_scan.summary("valid"))
        self.aug = AugmentParams.from_model(model, augment=o.augment)
        self.dataset = DetectionDataset(scan.images, scan.labels, self.aug)
        self.backup = o.backup or self.data.backup or "backup/"
        os.makedirs(self.backup, exist_ok=True)
        stale = remove_stale_partials(self.backup) if self.rank == 0 else []
        for name in stale:  # leftovers of a checkpoint write that was killed
            self.log(f"removed {os.path.join(self.backup, name)} (an interrupted write)")
        self.names = checkpoint_names(self.backup, o.cfg)
        last = model.graph.layers[-1]
        self.random = float((getattr(last, "train", None) or {}).get("random", 0) or 0)
        self.init_w, self.init_h = self.net.width, self.net.height
        self.start_iteration = self.iteration
        self.avg_loss = -1.0
        self.best_map = -1.0
        self.map_history: List[Tuple[int, float]] = []
        self.loss_history: List[Tuple[int, float]] = []
        self.finetune_iteration: Optional[int] = None
        self.switched_at: Optional[int] = None
        if o.finetune_at is not None or o.finetune_cfg or o.finetune_sets:
            self._prepare_finetune()

    def _check_sync_bn(self) -> bool:
        """--sync-bn: on with several CUDA processes; 1 process: a warning, ignored; CPU
        processes: an error (torch's SyncBatchNorm takes GPU tensors only)."""
        if not self.o.sync_bn:
            return False
        if self.world <= 1:
            if self.rank == 0:
                warnings.warn("--sync-bn ignored: one training process (start several with "
                              "torchrun --nproc_per_node=N for it to apply)", RuntimeWarning)
            return False
        if self.device.type != "cuda":
            if self._own_pg:
                import torch.distributed as dist
                dist.destroy_process_group()
            raise DarknetError(f"--sync-bn: SyncBatchNorm needs CUDA processes (NCCL); these "
                               f"{self.world} processes train on {self.device.type} (gloo). Use "
                               f"--device cuda, or drop --sync-bn (the processes then average "
                               f"the running statistics after each iteration)")
        return True

    def _warn(self, msg: str) -> None:
        self.log(f"warning: {msg}")

    # ------------------------------------------------------------- staged augmentation
    def _prepare_finetune(self) -> None:
        """Parse and check the fine-tuning stage's cfg before anything is written: the stage-1
        cfg (or ``finetune_cfg``) with ``finetune_sets`` on top. Only training settings may
        change ([net] hyper-parameters and augmentation, [yolo] loss/augmentation keys): the
        layers, their shapes and the batch must stay the same."""
        from .graph import build_graph
        from .overrides import apply_sets
        from .reader import read_cfg
        o = self.o
        if o.finetune_at is None:
            raise DarknetError("--finetune-set/--finetune-cfg need --finetune-at")
        at = float(o.finetune_at)
        it = int(round(at * self.max_batches)) if at <= 1 else int(at)
        if not 0 < it < self.max_batches:
            raise DarknetError(f"--finetune-at {o.finetune_at}: iteration {it} is not inside the "
                               f"run (1..{self.max_batches - 1})")
        base = read_cfg(o.finetune_cfg) if o.finetune_cfg else apply_sets(read_cfg(o.cfg), o.sets)
        g2 = build_graph(apply_sets(base, o.finetune_sets))
        g1, where = self.model.graph, o.finetune_cfg or "--finetune-set"
        if len(g1.layers) != len(g2.layers):
            raise DarknetError(f"{where}: the fine-tuning cfg has {len(g2.layers)} layers, the "
                               f"training cfg {len(g1.layers)}: only training settings may change")
        for a, b in zip(g1.layers, g2.layers):
            if (a.type, a.out_shape, a.inputs, a.weight_floats) != (b.type, b.out_shape, b.inputs,
                                                                    b.weight_floats):
                raise DarknetError(f"{where}: layer {a.index} differs ([{a.section}] "
                                   f"{a.out_shape.as_list()} vs [{b.section}] "
                                   f"{b.out_shape.as_list()}): only training settings may change")
        for k in ("batch", "subdivisions", "adam"):   # the loader and the optimizer stay
            if g1.net.settings.get(k) != g2.net.settings.get(k):
                raise DarknetError(f"{where}: {k} must stay {g1.net.settings.get(k)} for the "
                                   "fine-tuning stage")
        self.finetune_iteration, self.finetune_graph = it, g2
        if self.iteration >= it:               # resumed inside stage 2
            self._switch_stage(save=False)

    def _switch_stage(self, save: bool = True) -> None:
        """Enter the fine-tuning stage: ``<cfg>_stage1.weights`` (the weights stage 1 ended
        with) and ``<cfg>_finetune.cfg`` go to the backup folder; the [net] settings, the loss
        parameters, the augmentation and the multi-scale flag become the fine-tuning cfg's.
        The caller restarts the data loader."""
        from .data import AugmentParams
        from .reader import write_cfg
        g2 = self.finetune_graph
        if save:
            self.save(os.path.join(self.backup, f"{self.names['base']}_stage1.weights"))
        if self.rank == 0:
            from .converters.weights import atomic_write
            atomic_write(os.path.join(self.backup, f"{self.names['base']}_finetune.cfg"),
                         [write_cfg(g2.cfg).encode()])
        settings = dict(g2.net.settings)
        settings["max_batches"] = self.max_batches
        self.settings = settings
        for g in self.opt.param_groups:
            g["momentum"] = float(settings.get("momentum", 0.9))
        self.head_loss = HeadLoss(types.SimpleNamespace(
            heads=[l for l in g2.layers if l.index in self.model.output_indices]))
        self.aug = AugmentParams.from_model(types.SimpleNamespace(graph=g2), augment=self.o.augment)
        self.dataset.params = self.aug
        self.random = float((getattr(g2.layers[-1], "train", None) or {}).get("random", 0) or 0)
        self.switched_at = self.iteration
        self.log(f"iteration {self.iteration}: fine-tuning stage: {self.aug}")

    # --------------------------------------------------------------- multi-scale
    def size_for(self, it: int) -> Tuple[int, int]:
        """Network size for iteration ``it`` (darknet: new random size every 10 iterations)."""
        if not self.random:
            return self.init_w, self.init_h
        block = (it - self.start_iteration) // 10
        first = self.start_iteration + block * 10
        step = float(self.settings.get("resize_step", 32.0)) or 32.0
        coef = 1.4 if self.random == 1.0 else self.random
        rng = np.random.default_rng([self.o.seed, 7, first])
        lo, hi = (1.0, coef) if coef >= 1 else (coef, 1.0)
        val = rng.uniform(lo, hi)
        val = val if rng.integers(2) else 1.0 / val
        dw = int(round(val * self.init_w / step + 1) * step)
        dh = int(round(val * self.init_h / step + 1) * step)
        if val < 1 and (dw > self.init_w or dh > self.init_h):
            dw, dh = self.init_w, self.init_h
        if block == 0 or first > self.max_batches - 100:
            dw = int(round(coef * self.init_w / step + 1) * step)
            dh = int(round(coef * self.init_h / step + 1) * step)
        return max(dw, int(step)), max(dh, int(step))

    @property
    def workers(self) -> int:
        """Data worker processes: ``TrainOptions.workers``, or when None the cores the training
        step leaves free (at most 4; GPU: up to 4). 0: ``data.ThreadedBatches`` loads each batch
        in this process on the step's threads, between steps (faster where no core is free)."""
        if self.o.workers is not None:
            return self.o.workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if self.device.type != "cpu":
            return min(4, max(1, (cores or 2) - 1))
        return min(4, max(0, (cores or 1) - torch.get_num_threads()))

    def loader(self):
        from torch.utils.data import DataLoader
        from .data import ScaleBatchSampler, ThreadedBatches, collate
        sampler = ScaleBatchSampler(len(self.dataset), self.mini, self.sub, self.iteration,
                                    self.max_batches, self.size_for, seed=self.o.seed,
                                    rank=self.rank, world=self.world)
        workers = self.workers
        if workers == 0 and self.device.type == "cpu":
            return ThreadedBatches(self.dataset, sampler, torch.get_num_threads())
        kw = dict(num_workers=workers, collate_fn=collate, batch_sampler=sampler,
                  pin_memory=self.device.type == "cuda", worker_init_fn=_worker_init)
        if workers > 0:
            kw.update(persistent_workers=self.device.type == "cuda",
                      prefetch_factor=4 if self.device.type == "cuda" else 2)
            # fork() from a process that already runs threads (OpenMP, OpenCV, onnxruntime ...)
            # can deadlock the child on a lock held by a thread that does not exist there;
            # forkserver starts workers from a clean single-threaded server
            import multiprocessing as mp
            if "forkserver" in mp.get_all_start_methods():
                kw["multiprocessing_context"] = "forkserver"
        return DataLoader(self.dataset, **kw)

    # ------------------------------------------------------------------- loop
    def train_iteration(self, batches) -> float:
        """One darknet iteration over ``subdivisions`` mini-batches; returns the reported loss."""
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        cuda = self.device.type == "cuda"
        # CUDA: float32 without TF32 (Darknet's numbers) unless --amp; cuDNN autotuning; both
        # only for the step, so the process-wide settings stay the user's
        with exact_float32(cuda and self.amp is None), cudnn_autotune(cuda):
            for s, (x, t) in enumerate(batches):
                x = x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
                seen = self.iteration * self.B + (s + 1) * self.mini * self.world
                cost, _ = train_step_loss(self.model, self.head_loss, x, t, seen, self.amp,
                                          self.scaler)
                total += cost
        if self.world > 1:
            total = _sync_gradients_and_stats(self.model, total, stats=not self.sync_bn) / self.world
        self.iteration += 1
        rate = get_current_rate(self.settings, self.iteration)
        set_rate(self.opt, rate, self.settings, self.B, self.iteration)
        if self.scaler is not None:  # skips the update when a float16 gradient overflowed
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            self.opt.step()
        did = self.ema.step(self.iteration, self.max_batches)
        if did in ("init", "apply"):
            what = "initialised (a copy)" if did == "init" else "applied to the weights"
            self.log(f"iteration {self.iteration}: EMA {what}")
        self.rate = rate
        loss = total / (self.sub * self.mini)
        self.avg_loss = loss if self.avg_loss < 0 else self.avg_loss * 0.9 + loss * 0.1
        return loss

    def save(self, path: str) -> None:
        if self.rank == 0:
            _save(self.model, path, self.iteration * self.B)

    def evaluate(self):
        from .evaluate import evaluate_model
        res = evaluate_model(self.model, self.val_scan.images, self.val_scan.labels,
                             self.data.classes, device=self.device)
        self.model.train()
        return res

    def run(self) -> Dict:
        o = self.o
        from tqdm import tqdm
        if self.iteration >= self.max_batches:
            self.log(f"iteration {self.iteration} >= max_batches {self.max_batches}: nothing to do")
            self.save(self.names["final"])
            return dict(iteration=self.iteration)
        map_every = o.map_every or max(100, 4 * len(self.dataset) // self.B)
        next_map = max(int(self.settings.get("burn_in", 0) or 0), self.iteration + map_every)
        iter_save = iter_save_last = self.iteration
        it_batches = iter(self.loader())
        bar = tqdm(total=self.max_batches, initial=self.iteration, disable=not o.progress or self.rank != 0,
                   dynamic_ncols=True, unit="it", file=sys.stderr)
        t0 = time.time()
        done_images = 0
        last_map = None
        try:
            while self.iteration < self.max_batches:
                batches = [next(it_batches) for _ in range(self.sub)]
                tic = time.time()
                loss = self.train_iteration(batches)
                if not math.isfinite(loss):
                    self._warn(f"iteration {self.iteration}: loss is {loss}")
                done_images += self.B
                ips = done_images / max(time.time() - t0, 1e-9)
                self.loss_history.append((self.iteration, loss))
                info = dict(iteration=self.iteration, loss=loss, avg_loss=self.avg_loss,
                            rate=self.rate, images_per_s=ips, size=tuple(batches[0][0].shape[2:]),
                            iter_time=time.time() - tic)
                it = self.iteration
                if o.calc_map and self.rank == 0 and (it >= next_map or it == self.max_batches):
                    next_map = it + map_every
                    res = self.evaluate()
                    last_map = res["map"]
                    info["map"] = last_map
                    self.map_history.append((it, last_map))
                    self.log(f"\niteration {it}: mAP@{res['iou_thresh']:.2f} = {last_map:.4f} "
                             f"(best {max(self.best_map, last_map):.4f})")
                    if last_map >= self.best_map:
                        self.best_map = last_map
                        self.save(self.names["best"])
                    self.draw_chart()
                step = 1000 if it <= 10000 else 10000
                if it % step == 0 or it >= iter_save + step:
                    iter_save = it
                    self.save(self.names["iteration"].format(it))
                if it >= iter_save_last + 100 or (it % 100 == 0 and it > 1):
                    iter_save_last = it
                    self.save(self.names["last"])
                if self.switched_at is None and self.finetune_iteration is not None \
                        and it >= self.finetune_iteration and it < self.max_batches:
                    self._switch_stage()
                    it_batches = iter(self.loader())   # the new augmentation, from this iteration
                bar.update(1)
                post = dict(loss=f"{loss:.3f}", avg=f"{self.avg_loss:.3f}", lr=f"{self.rate:.2e}",
                            img_s=f"{ips:.1f}")
                if last_map is not None:
                    post["mAP"] = f"{last_map:.3f}"
                bar.set_postfix(post, refresh=False)
                o.history.append(info)
                if o.on_iteration is not None:
                    o.on_iteration(self, info)
        finally:
            bar.close()
        self.save(self.names["final"])
        self.save(self.names["last"])
        if (o.calc_map or self.finetune_iteration is not None) and self.rank == 0:
            self.draw_chart()
        if self._own_pg:
            import torch.distributed as dist
            dist.barrier()
            dist.destroy_process_group()
            self._own_pg = False
        return dict(iteration=self.iteration, avg_loss=self.avg_loss, best_map=self.best_map,
                    map_history=self.map_history, final=self.names["final"])

    def draw_chart(self) -> Optional[str]:
        """chart.png in the backup folder: loss (blue) and mAP (red) against iteration, and the
        start of the fine-tuning stage (a vertical line)."""
        try:
            from .evaluate import draw_chart
            path = os.path.join(self.backup, "chart.png")
            marks = [(self.switched_at, "fine-tuning")] if self.switched_at is not None else []
            draw_chart(path, self.loss_history, self.map_history, self.max_batches, marks=marks)
            return path
        except Exception as e:  # a chart must never stop training
            self._warn(f"chart not drawn: {e}")
            return None
