"""PyTorch re-implementations of the two networks of the original ear-EEG KD project, for timing.

Written from scratch for eegkd-jax so that our JAX training step can be timed side by side with
a PyTorch step of the *same* architecture on the same machine. The layer structure, layer order,
initialisation defaults and parameter counts follow the original project (which uses U-Sleep as
braindecode implements it and the epoch cross-modal transformer of Pradeepkumar et al. 2022);
nothing here is imported from or copied out of those projects.

Tensors here are PyTorch's (batch, channels, time), unlike the JAX library's (time, channels):
this module only exists to be compared with torch's own kernels.

Expected sizes, asserted by :func:`check_parameter_counts`:
  U-Sleep (3 channels, 200 Hz, depth 12, kernel 9, 5 filters, complexity 1.67): 3,114,391
  cross-modal transformer (d_model 256, FFN 1024, window 50, 8 heads):          2,958,853
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

# U-Sleep's decoder uses a width-2 conv with padding="same", exactly as the original does; torch
# warns that this costs a padded copy of the input. That copy is part of what the original pays
# for, so we keep the layer as it is and silence only this one message.
warnings.filterwarnings(
    "ignore", message=r"Using padding='same' with even kernel lengths", category=UserWarning)

USLEEP_PARAMETERS = 3_114_391
CMT_PARAMETERS = 2_958_853
USLEEP_CHANNELS = (6, 9, 11, 15, 20, 28, 40, 55, 77, 108, 152, 214, 302)


# --------------------------------------------------------------------------------------------
# U-Sleep
# --------------------------------------------------------------------------------------------


def usleep_channels(initial_filters: int, complexity_factor: float, depth: int) -> list[int]:
    """Filters of the encoder levels 1..depth+1 (the last one is the bottom).

    U-Sleep grows the filter count by sqrt(2) per level and scales each level's width by
    sqrt(complexity_factor); both products are truncated to int, the growth one *before* it is
    scaled, which is why 5 filters with factor 1.67 give 6 9 11 15 ... rather than a smooth curve.
    """
    widths = []
    base = initial_filters
    for _ in range(depth + 1):
        widths.append(int(base * math.sqrt(complexity_factor)))
        base = int(base * math.sqrt(2))
    return widths


def _conv_elu_bn(in_channels: int, out_channels: int, kernel_size: int,
                 padding: int | str) -> nn.Sequential:
    # U-Sleep normalises *after* the non-linearity, unlike the usual conv-BN-act order.
    return nn.Sequential(
        nn.Conv1d(in_channels, out_channels, kernel_size, padding=padding),
        nn.ELU(),
        nn.BatchNorm1d(out_channels),
    )


class USleepDown(nn.Module):
    """One encoder level: conv-ELU-BN, keep the result as the skip, then halve the time axis."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.features = _conv_elu_bn(in_channels, out_channels, kernel_size, "same")
        self.pool = nn.MaxPool1d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C_in, T) -> ((B, C_out, ceil-ish(T / 2)), skip (B, C_out, T))."""
        skip = self.features(x)
        pooled = skip
        if pooled.shape[-1] % 2 == 1:
            # An odd length gets one zero on *each* side before pooling (so T -> (T + 2) // 2);
            # the decoder later crops back to the skip's length.
            pooled = nn.functional.pad(pooled, (1, 1), mode="constant", value=0.0)
        return self.pool(pooled), skip


class USleepUp(nn.Module):
    """One decoder level: nearest x2 upsampling, a width-2 conv, crop, concat skip, conv."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.after_upsample = _conv_elu_bn(in_channels, out_channels, 2, "same")
        self.after_skip = _conv_elu_bn(2 * out_channels, out_channels, kernel_size, "same")

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """(B, C_in, T'), skip (B, C_out, T) -> (B, C_out, min(2 T', T))."""
        x = self.after_upsample(self.upsample(x))
        # Both are cut to the shorter length from the start, which undoes the odd-length padding.
        length = min(x.shape[-1], skip.shape[-1])
        x = torch.cat([x[..., :length], skip[..., :length]], dim=1)
        return self.after_skip(x)


class USleep(nn.Module):
    """U-Sleep (Perslev et al. 2021) as braindecode builds it and the original KD project uses it.

    Args:
      in_channels: EEG derivations (3 in the original).
      sampling_rate: Hz; with kernel_seconds sets the conv width (9 / 200 s at 200 Hz -> 9).
      depth: encoder levels, each halving time (12).
      initial_filters: 5. complexity_factor: 1.67.
      num_classes: 5 sleep stages.
      epoch_seconds: 30; the head averages over each epoch's samples.

    forward(x) takes x (B, C, L * S) with S = epoch samples and returns
    (logits, features): logits (B, num_classes) when L == 1, else (B, num_classes, L);
    features are the decoder output (B, channels[0]=6, L * S), what the original distils.
    """

    def __init__(self, in_channels: int = 3, sampling_rate: float = 200.0, depth: int = 12,
                 initial_filters: int = 5, complexity_factor: float = 1.67,
                 num_classes: int = 5, epoch_seconds: float = 30.0,
                 kernel_seconds: float | None = None):
        super().__init__()
        if kernel_seconds is None:
            kernel_seconds = 9.0 / sampling_rate
        kernel_size = int(round(kernel_seconds * sampling_rate))
        if kernel_size % 2 == 0:
            # The decoder's crop-to-skip only lines up with an odd, centred kernel.
            raise ValueError(f"U-Sleep needs an odd kernel, got {kernel_size} samples")
        self.epoch_samples = int(math.ceil(epoch_seconds * sampling_rate))
        widths = usleep_channels(initial_filters, complexity_factor, depth)
        self.channels = widths
        levels = [in_channels] + widths  # input of level i is levels[i], output levels[i + 1]

        self.encoder = nn.ModuleList(
            USleepDown(levels[i], levels[i + 1], kernel_size) for i in range(depth))
        # The bottom keeps the time length (explicit symmetric padding of (k - 1) / 2).
        self.bottom = _conv_elu_bn(levels[depth], levels[depth + 1], kernel_size,
                                   (kernel_size - 1) // 2)
        reverse = levels[::-1]  # bottom width first, input width last
        self.decoder = nn.ModuleList(
            USleepUp(reverse[i], reverse[i + 1], kernel_size) for i in range(depth))

        top = widths[0]
        # Per-sample dense+tanh, then one average per epoch, then a small 2-layer classifier.
        self.head = nn.Sequential(
            nn.Conv1d(top, top, kernel_size=1),
            nn.Tanh(),
            nn.AvgPool1d(self.epoch_samples),
            nn.Conv1d(top, num_classes, kernel_size=1),
            nn.ELU(),
            nn.Conv1d(num_classes, num_classes, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skips = []
        for down in self.encoder:
            x, skip = down(x)
            skips.append(skip)
        x = self.bottom(x)
        for up, skip in zip(self.decoder, reversed(skips)):
            x = up(x, skip)
        logits = self.head(x)  # (B, classes, L)
        if logits.shape[-1] == 1:
            logits = logits[..., 0]
        return logits, x


# --------------------------------------------------------------------------------------------
# Cross-modal transformer (epoch version)
# --------------------------------------------------------------------------------------------


def sinusoidal_positions(length: int, d_model: int) -> torch.Tensor:
    """Fixed transformer positions (length, d_model): sin on even features, cos on odd ones."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32)
                          * (-math.log(10000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


class MultiScaleTokenizer(nn.Module):
    """Turns one 30-s channel into CLS + 120 tokens with three parallel strided conv stacks.

    The three stacks all stride by `window` samples in total (50 at 200 Hz -> 120 tokens):
    one wide conv (window) giving d/4 features; 5-5-2 strides giving (d - d/4) / 2; 25-2 strides
    giving (d - d/4) / 2. Their concatenation (d features) is mixed by a 1x1 conv. Each stack ends
    in BatchNorm after LeakyReLU, as the original does.
    """

    def __init__(self, d_model: int = 256, window: int = 50, dropout: float = 0.1,
                 max_tokens: int = 5000):
        super().__init__()
        quarter = d_model // 4
        rest = (d_model - quarter) // 2
        self.wide = nn.Sequential(
            nn.Conv1d(1, quarter, kernel_size=window, stride=window),
            nn.LeakyReLU(),
            nn.BatchNorm1d(quarter),
        )
        self.fine = nn.Sequential(
            nn.Conv1d(1, d_model // 8, kernel_size=5, stride=5),
            nn.LeakyReLU(),
            nn.Conv1d(d_model // 8, quarter, kernel_size=5, stride=5),
            nn.LeakyReLU(),
            nn.Conv1d(quarter, rest, kernel_size=2, stride=2),
            nn.LeakyReLU(),
            nn.BatchNorm1d(rest),
        )
        self.medium = nn.Sequential(
            nn.Conv1d(1, quarter, kernel_size=25, stride=25),
            nn.LeakyReLU(),
            nn.Conv1d(quarter, rest, kernel_size=2, stride=2),
            nn.LeakyReLU(),
            nn.BatchNorm1d(rest),
        )
        self.mix = nn.Sequential(
            nn.Conv1d(quarter + 2 * rest, d_model, kernel_size=1),
            nn.LeakyReLU(),
            nn.BatchNorm1d(d_model),
        )
        self.cls = nn.Parameter(torch.randn(1, 1, d_model))
        self.register_buffer("positions", sinusoidal_positions(max_tokens, d_model),
                             persistent=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, S) -> tokens (B, 1 + S / window, d_model), CLS first."""
        scales = torch.cat([self.wide(x), self.fine(x), self.medium(x)], dim=1)
        tokens = self.mix(scales).transpose(1, 2)  # (B, N, d)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.dropout(tokens + self.positions[: tokens.shape[1]])


class PostNormAttention(nn.Module):
    """LayerNorm(x + Dropout(MultiHeadSelfAttention(x))): the original's post-norm block."""

    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.attention = nn.MultiheadAttention(d_model, num_heads, dropout=dropout,
                                               batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, d) -> (B, N, d)."""
        # need_weights left at torch's default (True) as in the original: it routes attention
        # through the explicit softmax-and-average path instead of the fused kernel, and the
        # reference must time what the original actually ran.
        attended, _ = self.attention(x, x, x)
        return self.norm(x + self.dropout(attended))


class PostNormFeedForward(nn.Module):
    """LayerNorm(x + Dropout(W2 Dropout(ReLU(W1 x))))."""

    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.inner = nn.Linear(d_model, d_ff)
        self.outer = nn.Linear(d_ff, d_model)
        self.dropout_inner = nn.Dropout(dropout)
        self.dropout_outer = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, d) -> (B, N, d)."""
        hidden = self.dropout_inner(torch.relu(self.inner(x)))
        return self.norm(x + self.dropout_outer(self.outer(hidden)))


class CrossModalTransformer(nn.Module):
    """Epoch cross-modal transformer (Pradeepkumar et al. 2022) as the original KD project uses it.

    Three branches, one per derivation, each: multi-scale tokenizer -> CLS + 120 tokens ->
    self-attention. The three branch CLS tokens plus a learned cross-modal CLS go through one
    more self-attention ("cross-modal attention"); its CLS output replaces each branch's CLS, each
    branch then has its own feed-forward block, and the three branch CLS outputs (3 x 256 = 768)
    are the feature vector fed to a linear 5-way head.

    `third_branch_reads_first_channel` reproduces the original's forward pass, in which the third
    branch is fed the *first* channel again (its third input goes unused); it costs exactly the
    same compute as feeding the third channel, so timing does not depend on it.

    forward(x) takes x (B, 3, S) and returns (logits (B, 5), features (B, 768)).
    """

    def __init__(self, d_model: int = 256, d_ff: int = 1024, num_heads: int = 8,
                 window: int = 50, dropout: float = 0.1, num_classes: int = 5,
                 third_branch_reads_first_channel: bool = True):
        super().__init__()
        self.third_branch_reads_first_channel = third_branch_reads_first_channel
        self.tokenizers = nn.ModuleList(
            MultiScaleTokenizer(d_model, window, dropout) for _ in range(3))
        self.self_attention = nn.ModuleList(
            PostNormAttention(d_model, num_heads, dropout) for _ in range(3))
        self.cross_cls = nn.Parameter(torch.randn(1, 1, d_model))
        self.cross_attention = PostNormAttention(d_model, num_heads, dropout)
        self.feed_forward = nn.ModuleList(
            PostNormFeedForward(d_model, d_ff, dropout) for _ in range(3))
        self.head = nn.Linear(3 * d_model, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = [x[:, 0:1], x[:, 1:2], x[:, 2:3]]
        if self.third_branch_reads_first_channel:
            inputs[2] = inputs[0]
        branches = [attend(tokenize(signal)) for tokenize, attend, signal
                    in zip(self.tokenizers, self.self_attention, inputs)]
        # The original orders the cross-modal sequence [CLS, branch 1, branch 3, branch 2].
        summary = torch.stack([branches[0][:, 0], branches[2][:, 0], branches[1][:, 0]], dim=1)
        summary = torch.cat([self.cross_cls.expand(x.shape[0], -1, -1), summary], dim=1)
        shared_cls = self.cross_attention(summary)[:, :1]  # (B, 1, d)
        outputs = [ff(torch.cat([shared_cls, tokens[:, 1:]], dim=1))[:, 0]
                   for ff, tokens in zip(self.feed_forward, branches)]
        features = torch.cat(outputs, dim=1)  # (B, 3 d)
        return self.head(features), features


# --------------------------------------------------------------------------------------------


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters (BatchNorm running statistics are buffers and are not counted)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def build(name: str) -> nn.Module:
    """The original's configuration of `name` ("usleep" | "cmt"), parameter count asserted."""
    if name == "usleep":
        model = USleep(in_channels=3, sampling_rate=200.0, depth=12, initial_filters=5,
                       complexity_factor=1.67, num_classes=5, epoch_seconds=30.0)
        assert tuple(model.channels) == USLEEP_CHANNELS, model.channels
        expected = USLEEP_PARAMETERS
    elif name == "cmt":
        model = CrossModalTransformer(d_model=256, d_ff=1024, num_heads=8, window=50)
        expected = CMT_PARAMETERS
    else:
        raise ValueError(f"unknown model {name!r}; expected 'usleep' or 'cmt'")
    found = count_parameters(model)
    assert found == expected, f"{name}: {found:,} parameters, the original has {expected:,}"
    return model


def check_parameter_counts() -> dict[str, int]:
    """Builds both models (asserting their sizes) and returns {name: parameters}."""
    return {name: count_parameters(build(name)) for name in ("usleep", "cmt")}
