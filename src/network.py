"""The Keras network and its optimizers in plain PyTorch, free of Lightning (predict uses it alone)."""

from __future__ import annotations

import torch
from torch import nn

from src.config import OPTIMIZERS, OptimizerConfig


class KerasRMSprop(torch.optim.Optimizer):
    """RMSprop as Keras computes it: w -= lr * g / sqrt(v + eps), v = rho * v + (1 - rho) * g^2.

    torch.optim.RMSprop adds eps outside the square root (sqrt(v) + eps); with Keras's eps of
    1e-7 that is a different optimiser wherever v is small, so it is written out here. It is
    also lighter: one reused buffer per weight, and rsqrt-and-multiply instead of sqrt and
    divide (equal to within float rounding), which makes the step about half as costly.
    """

    def __init__(self, params, lr: float = 1e-3, rho: float = 0.9, eps: float = 1e-7):
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps))
        self._scratch: dict[torch.Tensor, torch.Tensor] = {}  # a work buffer per weight; not state, not saved

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, rho, eps = group["lr"], group["rho"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "velocity" not in state:
                    state["velocity"] = torch.zeros_like(p)
                if p not in self._scratch:  # also after a resume, which restores only the state
                    self._scratch[p] = torch.empty_like(p)
                velocity, grad = state["velocity"], p.grad
                velocity.mul_(rho).addcmul_(grad, grad, value=1 - rho)
                scale = torch.add(velocity, eps, out=self._scratch[p]).rsqrt_()
                p.addcmul_(grad, scale, value=-lr)
        return loss


def keras_dense_init(layer: nn.Linear) -> nn.Linear:
    """Keras Dense defaults: glorot-uniform kernel, zero bias (torch's Linear init differs)."""
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class Probabilities(nn.Module):
    """The network and its softmax: images (n, 784) in [0, 1] -> class probabilities (n, 10), as exported."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images).softmax(dim=1)


def build_mlp(input_size: int = 28 * 28, hidden: int = 512, num_classes: int = 10) -> nn.Sequential:
    """Dense(hidden, relu, input input_size) -> Dense(num_classes); softmax is applied at inference."""
    return nn.Sequential(
        keras_dense_init(nn.Linear(input_size, hidden)),
        nn.ReLU(),
        keras_dense_init(nn.Linear(hidden, num_classes)),
    )


# Keras's optimizers by the names of config.OPTIMIZERS (the conf/optimizer/ files), with the settings of
# config.OptimizerConfig in Keras's names: rmsprop's rho is torch's alpha, adam's beta1/beta2 its betas.
_BUILD = {
    "rmsprop": lambda params, s: KerasRMSprop(params, lr=s.lr, rho=s.rho, eps=s.eps),
    "adam": lambda params, s: torch.optim.Adam(params, lr=s.lr, betas=(s.beta1, s.beta2), eps=s.eps),
    "sgd": lambda params, s: torch.optim.SGD(params, lr=s.lr, momentum=s.momentum),
}
assert tuple(_BUILD) == OPTIMIZERS


def keras_optimizer(params, settings: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer `settings.name` over `params`, with Keras's update and defaults."""
    return _BUILD[settings.name](params, settings)
