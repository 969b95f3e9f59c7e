"""Helpers shared by the storage tests (models with random adapters, an HTTP handler)."""

from __future__ import annotations

import http.server
import os
import re
from typing import Any

import torch
from torch import nn

import adapterkit

LORA = {"adapter": {"kind": "lora", "targets": ["0", "2"], "r": 4}, "seed": 3}
BOTTLENECK = {"adapter": {"kind": "bottleneck", "targets": ["0", "2"], "r": 8, "dropout": 0.0, "norm": True}, "seed": 5}


def base_model(d_in: int = 8, hidden: int = 16, d_out: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def trained(recipe: dict[str, Any], seed: int = 1, **dims: int) -> nn.Module:
    """An attached model whose adapter tensors hold random values (as after training),
    so that a round trip of zero-initialised B matrices proves nothing by accident."""
    model = adapterkit.attach(base_model(**dims), recipe)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in adapterkit.adapter_state_dict(model).values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=gen))
    return model


def assert_same_adapter(a: nn.Module, b: nn.Module) -> None:
    sa, sb = adapterkit.adapter_state_dict(a), adapterkit.adapter_state_dict(b)
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(9))
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single ``Range: bytes=a-b`` support (http.server lacks it); ``sent``
    gets each body chunk's size before the chunk goes out, so it is complete once the client
    has read a response."""

    sent: list[int]

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        path = self.translate_path(self.path)
        if os.path.isdir(path):
            super().do_GET()
            return
        try:
            file = open(path, "rb")
        except OSError:
            self.send_error(404)
            return
        with file:
            size = os.fstat(file.fileno()).st_size
            start, end = 0, size - 1
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
            if match:
                start = int(match.group(1))
                end = min(int(match.group(2)) if match.group(2) else size - 1, size - 1)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            else:
                self.send_response(200)
            length = max(0, end - start + 1)
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            file.seek(start)
            remaining = length
            while remaining:
                chunk = file.read(min(remaining, 1 << 20))
                # counted before it is written: a client holding these bytes finds them in
                # ``sent`` (counted after, the client could return first and see less)
                self.sent.append(len(chunk))
                self.wfile.write(chunk)
                remaining -= len(chunk)
