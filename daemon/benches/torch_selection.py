"""Model selection benchmark, PyTorch's side: the 16 candidates of
benches/selection.rs trained one after another, as a data scientist would
loop over a grid, on the rows Cerebro encoded (so only training is
compared). Like cerebrod, each candidate shuffles its training rows every
epoch, scores the validation rows after each epoch and keeps its best
weights. Run by deploy/bench.sh.

usage: torch_selection.py DIR THREADS
"""
import copy
import json
import sys
import time

import numpy as np
import torch


def auc(scores, labels):
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    pos = labels == 1
    n_pos, n_neg = pos.sum(), (~pos).sum()
    return (ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def candidate(x, y, train_idx, valid_idx, width, hidden, lr, weight_decay, batch, epochs, seed):
    torch.manual_seed(seed)
    dims = [width, *hidden, 1]
    layers = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i + 2 < len(dims):
            layers.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    xv, yv = x[valid_idx], y[valid_idx]
    best, best_state = float("inf"), None
    for _ in range(epochs):
        model.train()
        order = train_idx[torch.randperm(len(train_idx))]
        for s in range(0, len(order), batch):
            rows = order[s:s + batch]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[rows]).squeeze(1), y[rows]).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            valid_loss = loss_fn(model(xv).squeeze(1), yv).item()
        if valid_loss < best:
            best, best_state = valid_loss, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    with torch.no_grad():
        scores = torch.sigmoid(model(xv).squeeze(1)).numpy()
    return auc(scores, yv.numpy())


def main():
    d, threads = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(threads)
    meta = json.load(open(f"{d}/telco.json"))
    rows, width = meta["rows"], meta["width"]
    x = torch.from_numpy(np.fromfile(f"{d}/telco_x.f32", dtype="<f4").reshape(rows, width))
    y = torch.from_numpy(np.fromfile(f"{d}/telco_y.f32", dtype="<f4"))
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(rows, generator=g)
    n_valid = round(rows * meta["validation_fraction"])
    valid_idx, train_idx = order[:n_valid], order[n_valid:]
    grid = [(h, lr, wd) for h in meta["hidden"] for lr in meta["lr"] for wd in meta["weight_decay"]]
    # Warm up the allocator and kernels once, as the Rust side does.
    candidate(x, y, train_idx, valid_idx, width, grid[0][0], grid[0][1], grid[0][2], meta["batch_size"], 1, 0)
    started = time.perf_counter()
    best = max(
        candidate(x, y, train_idx, valid_idx, width, h, lr, wd, meta["batch_size"], meta["epochs"], i)
        for i, (h, lr, wd) in enumerate(grid)
    )
    seconds = time.perf_counter() - started
    print(json.dumps({"side": "pytorch", "workload": "selection16_sequential", "candidates": len(grid),
                      "seconds": round(seconds, 6), "best_auc": round(float(best), 4)}))


if __name__ == "__main__":
    main()
