"""The embedded default run (``adapterkit train`` with no config, or ``--default``).

MoSA on a frozen, pretrained EfficientNet-Lite0, trained on scikit-learn's handwritten
digits: both ship inside pip packages, so it needs no network. A bottleneck adapter
after each of the 16 MBConv blocks is split into 4 sparse modules; one module per layer
trains at each step; the merge averages them into one plain adapter (``W0 + D/4``).
Under a minute on 2 CPU cores (measured 49 s on a busy machine). ``adapterkit train --show-default`` prints it.
"""

from __future__ import annotations

DEFAULT_CONFIG = """\
# adapterkit's default run: MoSA adapters on EfficientNet-Lite0, scikit-learn digits.
[model]
backbone = "efficientnet-lite0"
image_size = 32

[data]
dataset = "digits"             # 1,437 train / 360 test 8x8 images, 10 classes

[recipe]
seed = 0

[recipe.adapter]
kind = "bottleneck"
targets = ["_blocks.*"]        # every MBConv block
placement = "sequential"       # adapter after each block
channel_dim = 1                # NCHW feature maps
r = 8

[recipe.splitter]
name = "mosa"
n_cells = 4                    # N sparse modules
share = "down"                 # split the up projection

[recipe.sampler]
name = "mosa"

[recipe.merger]
name = "mosa"                  # W0 + D/N: one plain adapter

[optim]
lr = 1e-2
weight_decay = 0.01
warmup = 0.1
schedule = "cosine"

[train]
epochs = 3
batch_size = 32
threads = 1                    # small batches: one thread per process is as fast and immune to oversubscription
seed = 0

[eval]
every_epoch = true

[output]
adapter = "adapterkit-default/adapter.safetensors"
merged = "adapterkit-default/merged.safetensors"
"""
