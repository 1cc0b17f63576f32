"""The seed's Keras CNN, ported layer for layer as the baseline.

Keras original (channels-last, glorot_uniform kernels, zero biases):
    Conv2D(32, 3, padding="same"), ReLU, Conv2D(32, 3), ReLU, MaxPool(2), Dropout(0.25)
    Conv2D(64, 3, padding="same"), ReLU, Conv2D(64, 3), ReLU, MaxPool(2), Dropout(0.25)
    Flatten, Dense(1024, tanh), Dropout(0.5), Dense(N)  (softmax lives in the loss)
32x32 input -> 30 -> 15 -> 13 -> 6, so the flattened size is 64*6*6 = 2304.
Its preprocessing was `x / 255`, which is what "scale" bundles into the model file.
"""

from __future__ import annotations

from torch import nn

from cifarlab.models.registry import ModelSpec, register_model


class KerasCNN(nn.Module):
    def __init__(self, num_classes: int, hidden: int = 1024, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 32, 3), nn.ReLU(),
            nn.MaxPool2d(2), nn.Dropout(0.25),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.Conv2d(64, 64, 3), nn.ReLU(),
            nn.MaxPool2d(2), nn.Dropout(0.25),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 6 * 6, hidden), nn.Tanh(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        self._keras_init()

    def _keras_init(self) -> None:
        # Keras' defaults, so the port trains like the original: glorot_uniform, zero bias.
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, x):
        # Keras flattens NHWC; our features are NCHW. The order differs but the function
        # class is the same; weights are never exchanged with Keras, so this is harmless.
        return self.classifier(self.features(x))


register_model(ModelSpec(
    name="keras-cnn",
    builder=KerasCNN,
    preprocessing="scale",
    description="The seed's Keras CNN (conv32x2-conv64x2-dense1024 tanh), baseline",
    # The seed's recipe: Adam, batch 32, 50 epochs, 10% shifts (3 px) and flips, /255.
    recipe=dict(optimizer="adam", lr=1e-3, weight_decay=0.0, batch_size=32, epochs=50,
                schedule="constant", label_smoothing=0.0, translate=3, fill="edge"),
))
