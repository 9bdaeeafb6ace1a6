"""PredRNN (v2) with the spatio-temporal LSTM and its zigzag memory.

Written from Wang et al., "PredRNN: A Recurrent Neural Network for Spatiotemporal Predictive Learning" (TPAMI 2022).
Each ST-LSTM cell keeps the usual temporal cell state ``c`` and a spatio-temporal memory ``m`` that flows upwards
through the layers and then from the top layer at step t to the bottom layer at step t+1 (the causal memory).
The memory-decoupling loss pushes the increments of ``c`` and ``m`` apart (|cosine| after a shared 1x1 adapter);
its unweighted value is left in ``aux_loss`` and its weight in ``aux_weight`` after every forward, for the training
module to add (relative to the pixel loss, see ``BaselineForecastModule``).

As in the paper, every step emits a forecast of the next frame (``next_frames``): with a k-frame history the
first k - 1 outputs forecast the teacher-forced input frames 2..k, the last one the target, so training can
supervise all k outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SpatioTemporalLSTMCell(nn.Module):
    """One ST-LSTM cell: returns the new hidden, cell and memory states and the increments of cell and memory."""

    def __init__(self, in_channels: int, hidden_channels: int, kernel_size: int, forget_bias: float = 1.0):
        super().__init__()
        self.hidden_channels = hidden_channels
        self.forget_bias = forget_bias
        padding = kernel_size // 2
        self.conv_x = nn.Conv2d(in_channels, 7 * hidden_channels, kernel_size, padding=padding, bias=False)
        self.conv_h = nn.Conv2d(
            hidden_channels, 4 * hidden_channels, kernel_size, padding=padding, bias=False
        )
        self.conv_m = nn.Conv2d(
            hidden_channels, 3 * hidden_channels, kernel_size, padding=padding, bias=False
        )
        self.conv_o = nn.Conv2d(
            2 * hidden_channels, hidden_channels, kernel_size, padding=padding, bias=False
        )
        self.conv_fuse = nn.Conv2d(2 * hidden_channels, hidden_channels, 1, bias=False)

    def forward(
        self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, m: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        i_x, f_x, g_x, i_xm, f_xm, g_xm, o_x = self.conv_x(x).chunk(7, dim=1)
        i_h, f_h, g_h, o_h = self.conv_h(h).chunk(4, dim=1)
        i_m, f_m, g_m = self.conv_m(m).chunk(3, dim=1)

        delta_c = torch.sigmoid(i_x + i_h) * torch.tanh(g_x + g_h)
        c_new = torch.sigmoid(f_x + f_h + self.forget_bias) * c + delta_c

        delta_m = torch.sigmoid(i_xm + i_m) * torch.tanh(g_xm + g_m)
        m_new = torch.sigmoid(f_xm + f_m + self.forget_bias) * m + delta_m

        memory = torch.cat([c_new, m_new], dim=1)
        output_gate = torch.sigmoid(o_x + o_h + self.conv_o(memory))
        h_new = output_gate * torch.tanh(self.conv_fuse(memory))
        return h_new, c_new, m_new, delta_c, delta_m


class PredRNN(nn.Module):
    """PredRNN-V2: k frames ``(B, k, C, H, W)`` -> next frame ``(B, C, H, W)``.

    Frames are cut into ``patch_size`` x ``patch_size`` patches stacked as channels (as in the paper), so H and W
    must be divisible by ``patch_size``. After each forward ``aux_loss`` holds the memory-decoupling loss (mean
    |cosine|, a scalar in the graph) and ``aux_weight`` its weight ``decouple_weight``. The paper's 0.1 was
    tuned against MNIST-scale MSE; ``BaselineForecastModule`` applies it relative to the pixel loss by default,
    so at reflectance scale (MSE ~1e-3) the decoupling term cannot outweigh the forecast.
    """

    def __init__(
        self,
        channels: int = 3,
        hidden_channels: int = 128,
        num_layers: int = 4,
        kernel_size: int = 5,
        patch_size: int = 4,
        forget_bias: float = 1.0,
        decouple_weight: float = 0.1,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.hidden_channels = hidden_channels
        self.aux_weight = decouple_weight
        patch_channels = channels * patch_size**2
        self.cells = nn.ModuleList(
            SpatioTemporalLSTMCell(
                patch_channels if i == 0 else hidden_channels, hidden_channels, kernel_size, forget_bias
            )
            for i in range(num_layers)
        )
        self.readout = nn.Conv2d(hidden_channels, patch_channels, 1, bias=False)
        self.decouple_adapter = nn.Conv2d(hidden_channels, hidden_channels, 1, bias=False)
        self.aux_loss = torch.zeros(())

    def decoupling(self, delta_c: torch.Tensor, delta_m: torch.Tensor) -> torch.Tensor:
        """Mean |cosine| between adapted cell and memory increments, per channel over pixels."""
        delta_c = F.normalize(self.decouple_adapter(delta_c).flatten(2), dim=2)
        delta_m = F.normalize(self.decouple_adapter(delta_m).flatten(2), dim=2)
        return (delta_c * delta_m).sum(dim=2).abs().mean()

    def next_frames(self, image: torch.Tensor) -> torch.Tensor:
        """Forecast after every input frame: ``(B, k, C, H, W)``, entry t forecasting frame t+1 (the last: target)."""
        batch, frames, _, height, width = image.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"PredRNN needs H and W divisible by patch_size={self.patch_size}, got {height}x{width}"
            )
        grid = (height // self.patch_size, width // self.patch_size)
        zeros = image.new_zeros(batch, self.hidden_channels, *grid)
        hidden = [zeros] * len(self.cells)
        cell = [zeros] * len(self.cells)
        memory = zeros
        decouple_terms = []
        forecasts = []
        for t in range(frames):
            x = F.pixel_unshuffle(image[:, t], self.patch_size)
            for layer, lstm in enumerate(self.cells):
                hidden[layer], cell[layer], memory, delta_c, delta_m = lstm(
                    x, hidden[layer], cell[layer], memory
                )
                decouple_terms.append(self.decoupling(delta_c, delta_m))
                x = hidden[layer]
            forecasts.append(F.pixel_shuffle(self.readout(hidden[-1]), self.patch_size))
        self.aux_loss = torch.stack(decouple_terms).mean()
        return torch.stack(forecasts, dim=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.next_frames(image)[:, -1]
