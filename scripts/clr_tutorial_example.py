# USAGE
# python scripts/clr_tutorial_example.py --plot clr_plot.png --epochs 4
#
# The PyImageSearch "Cyclical Learning Rates with Keras and Deep Learning" recipe on Keras 3: compile
# with SGD, add `CyclicLR(mode=..., base_lr=..., max_lr=..., step_size=...)` to `model.fit`, then plot
# `clr.history["lr"]`. The classic script imported the callback from `clr_callback` (bckenstler/CLR);
# that import is the only line that changes, because the classic callback uses `optimizer.lr` and
# `K.set_value`, both gone in Keras 3. The data are the offline 8x8 digits (clrlab.data.load), so
# the script runs in seconds without a download.

# set the matplotlib backend so figures can be saved in the background
import matplotlib

matplotlib.use("Agg")

# import the necessary packages
import argparse

import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import classification_report
from tensorflow.keras.layers import Activation, Conv2D, Dense, Flatten, Input
from tensorflow.keras.models import Sequential
from tensorflow.keras.optimizers import SGD
from tensorflow.keras.utils import to_categorical

from clrlab.callbacks import CyclicLR
from clrlab.data import load

# initialize the CLR settings (the tutorial keeps them in config.py)
MIN_LR = 1e-3
MAX_LR = 1e-1
BATCH_SIZE = 64
STEP_SIZE = 2          # epochs in HALF a cycle
CLR_METHOD = "triangular"


def main(argv=None):
    # construct the argument parser and parse the arguments
    ap = argparse.ArgumentParser()
    ap.add_argument("-p", "--plot", default="clr_plot.png", help="path to the output learning rate plot")
    ap.add_argument("-e", "--epochs", type=int, default=4, help="number of epochs to train for")
    args = vars(ap.parse_args(argv))

    # load the training and testing data
    print("[INFO] loading digits...")
    splits = load("digits")
    (trainX, trainY) = (splits.x_train, splits.y_train)
    (testX, testY) = (splits.x_test, splits.y_test)

    # convert the labels from integers to vectors
    trainY = to_categorical(trainY, 10)
    testY = to_categorical(testY, 10)
    labelNames = [str(name) for name in splits.class_names]

    # initialize the optimizer and model
    print("[INFO] compiling model...")
    opt = SGD(learning_rate=MIN_LR, momentum=0.9)
    model = Sequential([
        Input(shape=trainX.shape[1:]),
        Conv2D(32, (3, 3), padding="same"), Activation("relu"),
        Flatten(),
        Dense(64), Activation("relu"),
        Dense(10), Activation("softmax"),
    ])
    model.compile(loss="categorical_crossentropy", optimizer=opt, metrics=["accuracy"])

    # initialize the cyclical learning rate callback
    print(f"[INFO] using '{CLR_METHOD}' method")
    stepSize = STEP_SIZE * (trainX.shape[0] // BATCH_SIZE)
    clr = CyclicLR(
        mode=CLR_METHOD,
        base_lr=MIN_LR,
        max_lr=MAX_LR,
        step_size=stepSize)

    # train the network
    print("[INFO] training network...")
    H = model.fit(
        x=trainX, y=trainY,
        batch_size=BATCH_SIZE,
        validation_data=(testX, testY),
        epochs=args["epochs"],
        callbacks=[clr],
        verbose=1)

    # evaluate the network and show a classification report
    print("[INFO] evaluating network...")
    predictions = model.predict(x=testX, batch_size=BATCH_SIZE)
    print(classification_report(testY.argmax(axis=1), predictions.argmax(axis=1), target_names=labelNames))

    # plot the learning rate history
    N = np.arange(0, len(clr.history["lr"]))
    plt.figure()
    plt.plot(N, clr.history["lr"])
    plt.title("Cyclical Learning Rate (CLR)")
    plt.xlabel("Training Iterations")
    plt.ylabel("Learning Rate")
    plt.savefig(args["plot"])
    plt.close()
    return H, clr


if __name__ == "__main__":
    main()
