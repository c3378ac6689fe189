#!/usr/bin/env python3
"""Hostile TorchScript "vendor models" for the worker-pool tests (tests/it/pool.rs).

Made once with torch 2.11.0 (CPU) in a throwaway venv and committed; the tests need no
Python. Re-create with:  python make_pool_fixtures.py  (writes next to this file).

All three segment like a simple vendor model: [N,1,H,W] CT windowed (level 40, width 400)
to [0,1] -> [N,3,H,W] logits (background, thyroid ~120 HU, nodule ~-20 HU), after a 3x3
mean. They differ when a forward batch is "bright" (mean > 0.9, i.e. nearly everything
>= 200 HU, which no phantom is, but a test case filled with 1000 HU is):

- pool_hang.pt:  loops forever (a TorchScript while loop that never ends);
- pool_raise.pt: raises ValueError("fixture model refuses bright input: mean intensity
                 above 0.9");
- pool_slow.pt:  never misbehaves, but every forward spends time in a scalar loop
                 (60,000 iterations, a fraction of a second), so a test can kill a worker
                 in the middle of a case.
"""
import os

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))


def seg(x: torch.Tensor) -> torch.Tensor:
    s = F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)
    t = 1.0 - ((s - 0.7) / 0.1125) ** 2
    n = 1.0 - ((s - 0.35) / 0.07) ** 2
    return torch.cat([torch.zeros_like(s), t, n], 1)


class Hang(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.mean() > 0.9):
            i = 0
            while i >= 0:
                i += 1
        return seg(x)


class Raise(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.mean() > 0.9):
            raise ValueError("fixture model refuses bright input: mean intensity above 0.9")
        return seg(x)


class Slow(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = torch.zeros(1)
        for _ in range(self.n):
            acc = acc + 1.0
        return seg(x) + acc * 0.0


def main():
    x = torch.rand(2, 1, 16, 16) * 0.8
    for name, m in [("pool_hang.pt", Hang()), ("pool_raise.pt", Raise()), ("pool_slow.pt", Slow(60000))]:
        s = torch.jit.script(m.eval())
        y = s(x)
        assert y.shape == (2, 3, 16, 16), y.shape
        s.save(os.path.join(HERE, name))
        print(name, os.path.getsize(os.path.join(HERE, name)), "bytes")
    try:
        torch.jit.load(os.path.join(HERE, "pool_raise.pt"))(torch.ones(1, 1, 8, 8))
    except Exception as e:  # noqa: BLE001
        print("raise model says:", str(e).splitlines()[-1])


if __name__ == "__main__":
    main()
