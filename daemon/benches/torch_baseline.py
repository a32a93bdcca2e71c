"""Engine benchmark, PyTorch's side: the same workloads, data and initial
weights as benches/engine.rs, on PyTorch CPU. Run by deploy/bench.sh.

usage: torch_baseline.py DIR THREADS
"""
import json
import resource
import sys
import time

import numpy as np
import torch

ROWS, COLS, BATCH, INFER_BATCH, LR = 200_000, 64, 512, 8192, 1e-3


def load(path, shape):
    return torch.from_numpy(np.fromfile(path, dtype="<f4").reshape(shape))


def mlp(d, name, dims):
    layers = []
    for l, (i, o) in enumerate(zip(dims, dims[1:])):
        lin = torch.nn.Linear(i, o)
        with torch.no_grad():
            lin.weight.copy_(load(f"{d}/{name}.w{l}", (o, i)))
            lin.bias.copy_(load(f"{d}/{name}.b{l}", (o,)))
        layers.append(lin)
        if l + 2 < len(dims):
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def train_epoch(model, x, y, loss_fn=None):
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = loss_fn or (lambda out, yb: torch.nn.functional.binary_cross_entropy_with_logits(out.squeeze(1), yb))
    started = time.perf_counter()
    for s in range(0, ROWS, BATCH):
        xb, yb = x[s:s + BATCH], y[s:s + BATCH]
        opt.zero_grad(set_to_none=True)
        loss_fn(model(xb), yb).backward()
        opt.step()
    return time.perf_counter() - started


class Fused(torch.nn.Module):
    """K models of shape 64-32-1 by hand: one wide first layer, then a
    batched (block-diagonal) second layer."""

    def __init__(self, d, k):
        super().__init__()
        singles = [mlp(d, f"c{i}", [COLS, 32, 1]) for i in range(k)]
        self.w0 = torch.nn.Parameter(torch.cat([m[0].weight for m in singles]).detach().clone())
        self.b0 = torch.nn.Parameter(torch.cat([m[0].bias for m in singles]).detach().clone())
        self.w1 = torch.nn.Parameter(torch.stack([m[2].weight.t() for m in singles]).detach().clone())
        self.b1 = torch.nn.Parameter(torch.cat([m[2].bias for m in singles]).detach().clone())
        self.k = k

    def forward(self, x):
        h = torch.relu(torch.nn.functional.linear(x, self.w0, self.b0))
        h = h.view(x.shape[0], self.k, 32).transpose(0, 1)
        return torch.bmm(h, self.w1).squeeze(2).t() + self.b1


def main():
    d, threads = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x, y = load(f"{d}/x.f32", (ROWS, COLS)), load(f"{d}/y.f32", (ROWS,))
    results = []

    def report(workload, models, seconds):
        results.append({"side": "pytorch", "workload": workload, "models": models, "seconds": seconds,
                        "samples_per_s": ROWS * models / seconds})

    train_epoch(mlp(d, "b", [COLS, 32, 1]), x[:BATCH * 20], y[:BATCH * 20])  # warm-up
    report("a_mlp_64_256_256_1", 1, train_epoch(mlp(d, "a", [COLS, 256, 256, 1]), x, y))
    report("b_mlp_64_32_1", 1, train_epoch(mlp(d, "b", [COLS, 32, 1]), x, y))
    for k in (8, 32):
        seq = sum(train_epoch(mlp(d, f"c{i}", [COLS, 32, 1]), x, y) for i in range(k))
        report(f"c_k{k}_mlp_64_32_1", k, seq)
        fused_loss = lambda out, yb: torch.nn.functional.binary_cross_entropy_with_logits(
            out, yb.unsqueeze(1).expand_as(out), reduction="none").mean(0).sum()
        report(f"c_k{k}_mlp_64_32_1_fused", k, train_epoch(Fused(d, k), x, y, fused_loss))

    model = mlp(d, "a", [COLS, 256, 256, 1]).eval()
    with torch.no_grad():
        started = time.perf_counter()
        for s in range(0, ROWS, INFER_BATCH):
            model(x[s:s + INFER_BATCH])
        report("inference_b8192_mlp_64_256_256_1", 1, time.perf_counter() - started)
    for r in results:
        print(json.dumps(r))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"side": "pytorch", "workload": "peak_rss_mib", "value": peak}))


if __name__ == "__main__":
    main()
