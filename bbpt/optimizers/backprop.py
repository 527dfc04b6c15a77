"""Gradient descent (Adam) on z, behind the same ask/tell protocol: ask returns the current z, tell takes
its loss and gradient. With the full space z is P itself (PEFT's prompt tuning); with the projected space
it is the same low-dimensional z the black-box optimizers search, so the two can be compared directly."""

from __future__ import annotations

import io

import numpy as np

from bbpt.optimizers._base import OptimizerSettings


class Backprop:
    needs_gradient = True

    def __init__(self, s: OptimizerSettings):
        import torch

        self.torch = torch
        torch.manual_seed(s.seed)
        self.z = torch.nn.Parameter(torch.as_tensor(np.asarray(s.x0), dtype=torch.float32).clone())
        self.adam = torch.optim.Adam([self.z], lr=s.lr)

    def ask(self) -> np.ndarray:
        return self.z.detach().numpy()[None].astype(np.float64)

    def tell(self, zs, losses, grads=None, scores=None) -> None:
        if grads is None:
            raise ValueError("backprop needs gradients; the study loop passes them for needs_gradient=True")
        self.z.grad = self.torch.as_tensor(np.asarray(grads[0]), dtype=self.torch.float32)
        self.adam.step()
        self.adam.zero_grad()

    def stop(self) -> dict:
        return {}

    def state(self) -> bytes:
        buf = io.BytesIO()
        self.torch.save({"z": self.z.detach().clone(), "adam": self.adam.state_dict()}, buf)
        return buf.getvalue()

    def load_state(self, blob: bytes) -> None:
        st = self.torch.load(io.BytesIO(blob), weights_only=True)
        with self.torch.no_grad():
            self.z.copy_(st["z"])
        self.adam.load_state_dict(st["adam"])


