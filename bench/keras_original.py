"""The original Keras program (Deep Learning with Python, chapter 2), for `bench/speed.py --mode
process --keras-python PYTHON` and `bench/faithfulness.py`: the same steps, reading the IDX files from a
folder because `mnist.load_data()` needs the internet. Needs TensorFlow and matplotlib
(`pip install tensorflow-cpu keras matplotlib`).

`--seed S` seeds Python, NumPy and TensorFlow with `keras.utils.set_random_seed(S)` before the model is
built (the book's program is not seeded); `--history FILE` writes fit()'s per-epoch loss and accuracy and
the test figures to FILE as JSON."""

import argparse
import gzip
import json
from pathlib import Path

import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("--epochs", type=int, default=5)
parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
parser.add_argument("--out", default="keras-run")
parser.add_argument("--seed", type=int, help="keras.utils.set_random_seed(SEED) first (default: not seeded)")
parser.add_argument("--history", help="write the per-epoch loss and accuracy and the test figures here (JSON)")
args = parser.parse_args()


def idx(name: str) -> np.ndarray:
    with gzip.open(Path(args.data) / f"{name}.gz") as f:
        raw = f.read()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape)


import tensorflow as tf  # noqa: E402
from tensorflow import keras  # noqa: E402

(train_images, train_labels) = idx("train-images-idx3-ubyte"), idx("train-labels-idx1-ubyte")
(test_images, test_labels) = idx("t10k-images-idx3-ubyte"), idx("t10k-labels-idx1-ubyte")
print("Num GPUs Available: ", len(tf.config.list_physical_devices("GPU")))
if args.seed is not None:
    keras.utils.set_random_seed(args.seed)

network = keras.Sequential([keras.Input((28 * 28,)), keras.layers.Dense(512, activation="relu"),
                            keras.layers.Dense(10, activation="softmax")])
network.compile(optimizer="rmsprop", loss="categorical_crossentropy", metrics=["accuracy"])
train_images = train_images.reshape((60000, 28 * 28)).astype("float32") / 255
test_images = test_images.reshape((10000, 28 * 28)).astype("float32") / 255
train_labels = keras.utils.to_categorical(train_labels)
test_labels = keras.utils.to_categorical(test_labels)
history = network.fit(train_images, train_labels, epochs=args.epochs, batch_size=128, verbose=2)
test_loss, test_acc = network.evaluate(test_images, test_labels, verbose=0)
print(f"test_loss: {test_loss:.4f} test_acc: {test_acc:.4f}")
if args.history:
    Path(args.history).write_text(json.dumps({"loss": history.history["loss"], "accuracy": history.history["accuracy"],
                                              "test_loss": test_loss, "test_acc": test_acc}))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
result = network.predict(train_images[3].reshape((1, 28 * 28)), verbose=0)[0]
plt.figure(figsize=(5, 2))
plt.bar(range(10), result)
plt.title("prediction result")
plt.savefig(out / "prediction.png")
plt.figure(figsize=(1, 1))
plt.imshow(train_images[3].reshape(28, 28))
plt.axis("off")
plt.savefig(out / "image.png")
