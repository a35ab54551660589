"""python -m bn_ext (or bn-ext-check): check bn_ext against torch.nn.BatchNorm2d on this machine.

1. gradcheck and gradgradcheck in float64, training and eval;
2. parity with torch.nn.BatchNorm2d over a few training steps and an eval step, float32, NCHW and
   channels_last: outputs, gradients, running statistics, num_batches_tracked;
3. a short speed comparison with torch on one ResNet-50 shape.
Exits non-zero if a check fails. The full benchmark is bench/bench.py (see README.md).
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.utils.benchmark as tb

import bn_ext


def _device(requested: str | None) -> str:
    if requested:
        return requested
    return "cuda" if torch.cuda.is_available() and bn_ext.has_cuda_kernels() else "cpu"


def check_gradients(device: str) -> None:
    for training in (True, False):
        x = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
        w = (torch.rand(3, dtype=torch.float64, device=device) + 0.5).requires_grad_()
        b = torch.randn(3, dtype=torch.float64, device=device, requires_grad=True)
        rm = torch.randn(3, dtype=torch.float64, device=device)
        rv = torch.rand(3, dtype=torch.float64, device=device) + 0.5

        def f(x, w, b):
            return bn_ext.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5)
        torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-6)
        torch.autograd.gradgradcheck(f, (x, w, b), eps=1e-6, atol=1e-5)
        print(f"  gradcheck + gradgradcheck ({'train' if training else 'eval'}): ok")


def check_parity(device: str) -> None:
    for layout in (torch.contiguous_format, torch.channels_last):
        ref = torch.nn.BatchNorm2d(16, device=device)
        ours = bn_ext.BatchNorm2d(16, device=device)
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
        ours.load_state_dict(ref.state_dict())
        worst = 0.0
        for step in range(4):
            train = step < 3
            ref.train(train)
            ours.train(train)
            x = (torch.randn(8, 16, 12, 12, device=device) * 2 + step).to(memory_format=layout)
            xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
            yr, yo = ref(xr), ours(xo)
            g = torch.randn_like(yr)
            yr.backward(g)
            yo.backward(g)
            pairs = [(yo, yr), (xo.grad, xr.grad), (ours.weight.grad, ref.weight.grad),
                     (ours.bias.grad, ref.bias.grad), (ours.running_mean, ref.running_mean),
                     (ours.running_var, ref.running_var)]
            for a, b in pairs:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
                worst = max(worst, (a - b).abs().max().item())
            assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()
            ref.zero_grad()
            ours.zero_grad()
        name = "NCHW" if layout == torch.contiguous_format else "channels_last"
        print(f"  parity with torch.nn.BatchNorm2d ({name}, 3 train steps + eval): ok, "
              f"max abs difference {worst:.1e}")


def _median_ms(stmt, device: str) -> float:
    timer = tb.Timer(stmt="f()", globals={"f": stmt}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=0.3).median * 1e3


def compare_speed(device: str, shape) -> None:
    x = torch.randn(shape, device=device)
    results = []
    for name, fresh in (("torch", torch.nn.BatchNorm2d), ("bn_ext", bn_ext.BatchNorm2d)):
        m = fresh(shape[1], device=device)
        xr = x.clone().requires_grad_()
        y = m(xr)
        g = torch.randn_like(y)

        def sync():
            if device == "cuda":
                torch.cuda.synchronize()

        def fwd():
            m(xr)
            sync()

        def bwd():
            torch.autograd.grad(y, xr, g, retain_graph=True)
            sync()

        m.train()
        t_fwd, t_bwd = _median_ms(fwd, device), _median_ms(bwd, device)
        m.eval()
        with torch.no_grad():
            t_eval = _median_ms(fwd, device)
        results.append((name, t_fwd, t_bwd, t_eval))
    (_, tf, tb_, te), (_, of, ob, oe) = results
    print(f"  shape {tuple(shape)} float32 on {device}, {torch.get_num_threads()} threads "
          f"(median ms, torch / bn_ext = speedup):")
    for label, t, o in (("train forward", tf, of), ("train backward", tb_, ob),
                        ("eval forward", te, oe)):
        print(f"    {label:15s} torch {t:8.3f}   bn_ext {o:8.3f}   {t / o:5.2f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bn_ext", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument("--no-speed", action="store_true", help="skip the speed comparison")
    args = p.parse_args(argv)
    device = _device(args.device)
    print(f"bn_ext {bn_ext.__version__}, torch {torch.__version__}, device {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device == 'cuda' else ''}, "
          f"CUDA kernels built: {bn_ext.has_cuda_kernels()}")
    if not bn_ext.ops.built_with_openmp():
        print("warning: the CPU kernels were built without OpenMP (the compiler refused "
              "-fopenmp) and run on one thread")
    torch.manual_seed(0)
    print("correctness:")
    check_gradients(device)
    check_parity(device)
    if not args.no_speed:
        print("speed:")
        compare_speed(device, (32, 64, 56, 56) if device == "cuda" else (16, 64, 56, 56))
    print("all checks passed. The full benchmark against torch eager, cuDNN and torch.compile: "
          "python bench/bench.py --help (results in bench/results/).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
