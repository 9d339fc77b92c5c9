"""The baseline for `bench/speed.py --mode process`: the same job as
`python -m src.train data=fashion_mnist` written as one plain PyTorch script, with no
framework: load, preprocess, 5 epochs, test, checkpoint, training curves, confusion matrix.
"""

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torchvision.datasets import FashionMNIST  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--data", default="data")
parser.add_argument("--out", default="plain-run")
args = parser.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(42)


def load(train: bool):
    ds = FashionMNIST(args.data, train=train, download=False)
    return ds.data.reshape(len(ds.data), 784).float() / 255, F.one_hot(ds.targets, 10).float()


(x, y), (x_test, y_test) = load(True), load(False)
print(f"train images {tuple(x.shape)}, train labels {tuple(y.shape)}")
model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 10))
for layer in (model[0], model[2]):
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
history = []
for epoch in range(args.epochs):
    start, total, correct = time.perf_counter(), 0.0, 0
    order = torch.randperm(len(x))
    for i in range(0, len(x), 128):
        index = order[i : i + 128]
        logits = model(x[index])
        loss = F.cross_entropy(logits, y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += loss.item() * len(index)
        correct += (logits.argmax(1) == y[index].argmax(1)).sum().item()
    history.append((total / len(x), correct / len(x)))
    print(f"epoch {epoch + 1}: loss {history[-1][0]:.4f} acc {history[-1][1]:.4f} ({time.perf_counter() - start:.1f} s)")
torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, out / "last.ckpt")

with torch.no_grad():
    logits = model(x_test)
    labels = y_test.argmax(1)
    test_loss, predicted = F.cross_entropy(logits, y_test).item(), logits.argmax(1)
confusion = torch.bincount(labels * 10 + predicted, minlength=100).reshape(10, 10)
print(f"test_loss: {test_loss:.4f} test_acc: {(predicted == labels).float().mean().item():.4f}")

fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
for ax, values, name in zip(axes, zip(*history), ("loss", "acc")):
    ax.plot(range(1, len(values) + 1), values, marker="o")
    ax.set(title=name, xlabel="epoch")
fig.savefig(out / "training_curves.png")
fig, ax = plt.subplots(figsize=(7, 6))
ax.imshow(confusion, cmap="Blues")
fig.savefig(out / "confusion_matrix.png")
