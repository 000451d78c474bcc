"""Conditions as batches of rows: what travels through the data stream, the model, the sampler
and the scripts, whatever the condition kind. Every kind is a left-aligned batch with
`with_null(null)`, which appends as many null rows (the embedder's `null`) for the
unconditional rows of classifier-free guidance."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ClassCondition:
    labels: torch.Tensor  # (B,) int64 class ids; the null id means "no class"

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def device(self) -> torch.device:
        return self.labels.device

    def to(self, device: torch.device | str) -> ClassCondition:
        return ClassCondition(self.labels.to(device, non_blocking=True))

    def with_null(self, null: int) -> ClassCondition:
        """The rows of a CFG batch: these conditions first, then as many null ones."""
        return ClassCondition(torch.cat([self.labels, torch.full_like(self.labels, null)]))

    def __getitem__(self, index) -> ClassCondition:
        return ClassCondition(self.labels[index])

    def repeat_rows(self, times: int) -> ClassCondition:
        """Each row `times` times in a row (a grid row's images share their condition)."""
        return ClassCondition(self.labels.repeat_interleave(times))


@dataclass
class TextCondition:
    text: torch.Tensor  # (B, T) int64 caption tokens, left-padded | (B, T, C) encoder features

    def __len__(self) -> int:
        return self.text.shape[0]

    @property
    def device(self) -> torch.device:
        return self.text.device

    def to(self, device: torch.device | str) -> TextCondition:
        return TextCondition(self.text.to(device, non_blocking=True))

    def with_null(self, null: torch.Tensor) -> TextCondition:
        """These captions first, then as many empty ones (`null`: one row, (T,) or (T, C))."""
        empty = null.to(self.text.device, self.text.dtype).expand_as(self.text)
        return TextCondition(torch.cat([self.text, empty]))

    def __getitem__(self, index) -> TextCondition:
        return TextCondition(self.text[index])

    def repeat_rows(self, times: int) -> TextCondition:
        return TextCondition(self.text.repeat_interleave(times, dim=0))


Condition = ClassCondition | TextCondition
