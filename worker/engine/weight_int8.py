"""Weight-only int8 in plain torch (gpt-fast style): ``nn.Linear`` and the embedding become
int8 weights with one scale per output row, computed in the model's dtype.

- A few rows (decode at small batches): ``torch.ops.aten._weight_int8pack_mm``, which reads
  the int8 weights directly (a quarter of fp32's bytes, half of bf16's).
- More rows: the weights are dequantized to the compute dtype for one ordinary matmul and
  the row scales applied to its output; there arithmetic, not memory, is the bound.
- A tied embedding and lm_head share one int8 table (rows scaled the same way), so tying
  keeps its memory saving.

The two paths round differently, so a row's logits can differ in the last bits between a
step with few rows and one with many (bitsandbytes modes have the same property).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODE = "int8-torch"
# Up to this many rows the int8pack kernel beats dequantize + matmul (measured on an
# AVX-512 EPYC; the kernel's cost grows linearly with rows, the matmul's barely).
INT8PACK_MAX_ROWS = 4


def quantize_rows(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``weight ~= q * scale[:, None]``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.to(dtype)


class Int8Linear(torch.nn.Module):
    # model_runner._apply: run 1-3 rows as they are (int8pack's cost grows with the rows, so
    # padding a single-request step to 4 rows would cost what bf16 costs; measured)
    unpadded_rows = True

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = qweight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.shape[0] <= INT8PACK_MAX_ROWS and x2.dtype != torch.float32:
            out = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scale)
        else:
            out = F.linear(x2, self.qweight.to(x2.dtype)) * self.scale.to(x2.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)


class Int8Embedding(torch.nn.Module):
    def __init__(self, table: Int8Linear, padding_idx: int | None = None) -> None:
        super().__init__()
        self.table = table  # the same module as a tied lm_head, or its own
        self.padding_idx = padding_idx

    @property
    def weight(self) -> torch.Tensor:
        """Dequantized rows (only for code that reads ``embed_tokens.weight.dtype/device``)."""
        return self.table.qweight[:1].to(self.table.scale.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.table.qweight).to(self.table.scale.dtype)
        return rows * F.embedding(ids, self.table.scale.unsqueeze(1))


def _swap_linears(module: torch.nn.Module, dtype: torch.dtype, skip: set[int]) -> None:
    for name, child in list(module.named_children()):
        if type(child) is torch.nn.Linear and id(child) not in skip:
            q, s = quantize_rows(child.weight, dtype)
            bias = None if child.bias is None else child.bias.detach().to(dtype)
            setattr(module, name, Int8Linear(q, s, bias))
        else:
            _swap_linears(child, dtype, skip)


def _mark_unpadded(module: torch.nn.Module) -> None:
    """Set ``unpadded_rows`` on every module whose linears are all ``Int8Linear`` (the MLP
    the runner calls as one), so model_runner does not pad their rows."""
    linears = [m for m in module.modules() if isinstance(m, (Int8Linear, torch.nn.Linear))]
    for child in module.children():
        _mark_unpadded(child)
    if linears and all(isinstance(m, Int8Linear) for m in linears) \
            and not isinstance(module, Int8Linear):
        module.unpadded_rows = True


def quantize_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Replace every ``nn.Linear`` and the input embedding with int8 weights, in place.

    ``dtype`` is the compute dtype (bf16 where the CPU has it natively)."""
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    q, s = quantize_rows(embed.weight, dtype)
    table = Int8Linear(q, s, None)
    skip = {id(head)} if tied else set()
    _swap_linears(model, dtype, skip)
    _mark_unpadded(model)
    model.set_input_embeddings(Int8Embedding(table, getattr(embed, "padding_idx", None)))
    if tied:
        model.lm_head = table
    return model


def is_int8_model(model: torch.nn.Module) -> bool:
    return isinstance(model.get_input_embeddings(), Int8Embedding)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, each shared tensor counted once."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
